"""The edge quarantine file: bounded per entry and in bytes, rotated, and what rotation deletes is counted."""

from __future__ import annotations

import base64
import json

from edge_bridge.config import EdgeConfig
from edge_bridge.quarantine import MAX_DETAIL_CHARS, MAX_PAYLOAD_BYTES, MAX_TOPIC_CHARS, Quarantine


def entries(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def bad(i: int) -> tuple[str, bytes, str, str]:
    return ("sites/site-1/events/ajax/door", f"bad-{i:04d}".encode() + b"x" * 200, "bad_json", f"entry {i}")


def test_the_file_rotates_at_its_byte_bound_keeping_n_files_and_counts_the_entries_it_deletes(tmp_path):
    dropped = []
    quarantine = Quarantine(tmp_path / "quarantine.jsonl", max_bytes=4096, keep_files=2, on_dropped=dropped.append)
    for i in range(100):
        quarantine.put(*bad(i))
    quarantine.put_many([bad(i) for i in range(100, 200)])
    quarantine.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["quarantine.jsonl", "quarantine.jsonl.1", "quarantine.jsonl.2"]
    assert all(f.stat().st_size <= 4096 for f in files)
    kept = [e["detail"] for f in (files[2], files[1], files[0]) for e in entries(f)]
    # The newest entries are kept in order; every older one is counted as dropped, none vanishes uncounted.
    assert kept == [f"entry {i}" for i in range(200 - len(kept), 200)]
    assert sum(dropped) == quarantine.dropped == 200 - len(kept) > 0


def test_with_no_rotated_files_kept_the_full_file_itself_is_dropped_and_counted(tmp_path):
    dropped = []
    quarantine = Quarantine(tmp_path / "quarantine.jsonl", max_bytes=2048, keep_files=0, on_dropped=dropped.append)
    quarantine.put_many([bad(i) for i in range(30)])
    quarantine.close()
    assert [f.name for f in tmp_path.iterdir()] == ["quarantine.jsonl"]
    assert sum(dropped) + len(entries(tmp_path / "quarantine.jsonl")) == 30


def test_a_reopened_quarantine_counts_the_bytes_already_in_its_file(tmp_path):
    Quarantine(tmp_path / "quarantine.jsonl", max_bytes=4096).put_many([bad(i) for i in range(10)])
    quarantine = Quarantine(tmp_path / "quarantine.jsonl", max_bytes=4096, keep_files=1)
    quarantine.put_many([bad(i) for i in range(10, 20)])
    quarantine.close()
    assert (tmp_path / "quarantine.jsonl.1").exists()
    assert all(f.stat().st_size <= 4096 for f in tmp_path.iterdir())


def test_each_entry_is_bounded_whatever_the_message(tmp_path):
    quarantine = Quarantine(tmp_path / "quarantine.jsonl")
    quarantine.put("t" * 70_000, b"p" * 5_000_000, "r" * 1000, "d" * 100_000)
    quarantine.close()
    [line] = (tmp_path / "quarantine.jsonl").read_bytes().splitlines()
    entry = json.loads(line)
    assert len(line) < 100_000
    assert (
        len(entry["topic"]) == MAX_TOPIC_CHARS
        and len(entry["detail"]) == MAX_DETAIL_CHARS
        and len(entry["reason"]) == 64
    )
    assert len(base64.b64decode(entry["payload_b64"])) == MAX_PAYLOAD_BYTES and entry["payload_bytes"] == 5_000_000


def test_an_entry_that_cannot_be_written_as_given_is_kept_as_a_processing_error_and_its_batch_is_written(tmp_path):
    quarantine = Quarantine(tmp_path / "quarantine.jsonl")
    quarantine.put_many([bad(1), ("sites/site-1/events/ajax/door", "not bytes", "bad_json", ""), bad(2)])
    quarantine.close()
    first, odd, last = entries(tmp_path / "quarantine.jsonl")
    assert (first["detail"], last["detail"]) == ("entry 1", "entry 2")
    assert odd["reason"] == "processing_error" and odd["detail"].startswith(
        "quarantine entry (reason 'bad_json'): TypeError"
    )
    assert odd["topic"] == "sites/site-1/events/ajax/door"


def test_the_edge_service_rotates_its_quarantine_by_its_settings_and_exports_what_was_dropped(tmp_path):
    from edge_bridge.service import EdgeService

    config = EdgeConfig(
        state_dir=tmp_path / "edge",
        admin_port=-1,
        queue_url_override="http://127.0.0.1:9/unused",
        quarantine_max_bytes=2048,
        quarantine_keep_files=1,
    )
    service = EdgeService(config)
    try:
        service.quarantine.put_many([bad(i) for i in range(40)])
        dropped = service.metrics.registry.get_sample_value("edge_quarantine_dropped_total")
        assert dropped == service.quarantine.dropped > 0
        assert service.status()["quarantine_dropped"] == dropped
        assert sorted(f.name for f in (tmp_path / "edge").glob("quarantine.jsonl*")) == [
            "quarantine.jsonl",
            "quarantine.jsonl.1",
        ]
    finally:
        service.retry_log.close()
        service.quarantine.close()
