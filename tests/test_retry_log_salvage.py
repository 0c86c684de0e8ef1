"""A corrupt retry log at start-up: moved aside, every readable row salvaged into a fresh log, the loss
counted, and the service starts. The damage is real: a retry log written by RetryLog with pending jobs,
dead letters and free blocks, then truncated, bit-flipped, emptied or replaced by something else.

Where the damage lands decides what must come back, and the file's own layout says where that is
(DuckDB's storage and metadata info): a flip in a free block changes nothing; a broken data block costs
exactly the 2,048-row vectors that read it; a broken header or metadata block costs everything, uncounted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_bridge.metrics import EdgeMetrics
from edge_bridge.retry_log import RetryLog
from edge_bridge.retry_log_salvage import (
    EVENT_TABLES,
    ROW_GROUP_ROWS,
    VECTOR_ROWS,
    SalvageReport,
    check,
    check_at_start,
    moved_aside,
)
from tests.conftest import PROJECT_ROOT, publish, receive_all, sample_envelope, wait_until

HEADER_BYTES = 3 * 4096  # DuckDB's main header and its two database headers
PENDING, DEAD = 3000, 40


@dataclass
class Template:
    """A healthy retry log's bytes, its rows, and where in the file each part of it lies."""

    data: bytes
    rows: dict[str, list[tuple]]  # table -> every live row, all columns
    rowids: dict[str, list[int]]  # table -> the rowid of every live row
    block_bytes: int
    total_blocks: int
    metadata_blocks: set[int]
    segments: dict[str, list[tuple[int, int, int, int]]]  # table -> (row group, start, count, block)

    def block_offset(self, block: int) -> int:
        return HEADER_BYTES + block * self.block_bytes

    @property
    def data_blocks(self) -> dict[int, set[str]]:
        blocks: dict[int, set[str]] = {}
        for table, segments in self.segments.items():
            for *_, block in segments:
                blocks.setdefault(block, set()).add(table)
        return blocks

    @property
    def free_blocks(self) -> set[int]:
        return set(range(self.total_blocks)) - self.metadata_blocks - set(self.data_blocks)

    def expected(self, broken: set[int], header_broken: bool = False) -> dict[str, int] | None:
        """Rows per table a salvage must bring back with `broken` blocks unreadable; None: nothing opens."""
        if header_broken or broken & self.metadata_blocks:
            return None
        result = {}
        for table in EVENT_TABLES:
            lost_vectors: set[int] = set()
            for group, start, count, block in self.segments[table]:
                if block in broken:
                    first = group * ROW_GROUP_ROWS + start
                    lost_vectors |= set(range(first // VECTOR_ROWS, (first + count - 1) // VECTOR_ROWS + 1))
            result[table] = sum(1 for rowid in self.rowids[table] if rowid // VECTOR_ROWS not in lost_vectors)
        return result


def envelope_body(i: int, prefix: str) -> tuple[str, str]:
    env = sample_envelope(
        event_id=f"{prefix}-{i}",
        device_id=f"door-{i}",
        timestamp=datetime(2026, 11, 1, tzinfo=UTC) + timedelta(seconds=i),
        payload={"door": str(i), "result": "granted", "note": "x" * 300},
    )
    return env.event_id, env.to_json()


def build_retry_log(path: Path) -> None:
    """Pending jobs, dead letters, and free blocks (left by a DLQ that was replayed and delivered)."""
    log = RetryLog(path, backoff_s=0.0, max_attempts=1)
    log.add([(*envelope_body(i, "early"), "refused") for i in range(3000)], now=0.0)
    log.record([], [(j.job_id, "refused") for j in log.due(5000, now=0.0)], now=0.0)
    log.close()
    log = RetryLog(path, backoff_s=0.0, max_attempts=1)
    for start in range(0, PENDING, 1000):
        log.add([(*envelope_body(i, "ev"), "ConnectionRefused") for i in range(start, start + 1000)], now=1.0)
    log.close()
    log = RetryLog(path, backoff_s=0.0, max_attempts=1)
    log.replay_dlq(now=2.0)
    log.record([j.job_id for j in log.due(10_000, now=2.0) if j.event_id.startswith("early-")], [], now=2.0)
    # Dead letters from the middle of the pending jobs.
    failing = [j for j in log.due(10_000, now=2.0) if j.event_id.startswith("ev-")][1000 : 1000 + DEAD]
    log.record([], [(j.job_id, "refused three times") for j in failing], now=3.0)
    assert (log.pending, log.dlq_size) == (PENDING - DEAD, DEAD)
    log.close()


def table_rows(path: Path) -> dict[str, list[tuple]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall()) for t in EVENT_TABLES}
    finally:
        con.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Template:
    path = tmp_path_factory.mktemp("template") / "retry_log.duckdb"
    build_retry_log(path)
    con = duckdb.connect(str(path), read_only=True)
    try:
        size = con.execute("SELECT block_size, total_blocks FROM pragma_database_size()").fetchall()[0]
        metadata = {row[0] for row in con.execute("SELECT block_id FROM pragma_metadata_info()").fetchall()}
        segments = {
            t: con.execute(
                f"""SELECT row_group_id, start, count, block_id FROM pragma_storage_info('{t}')
                    WHERE persistent AND block_id >= 0"""
            ).fetchall()
            for t in EVENT_TABLES
        }
        rowids = {t: [r[0] for r in con.execute(f"SELECT rowid FROM {t}").fetchall()] for t in EVENT_TABLES}
    finally:
        con.close()
    data = path.read_bytes()
    made = Template(data, table_rows(path), rowids, size[0], size[1], metadata, segments)
    assert len(data) == made.block_offset(made.total_blocks), "the file is not laid out as this test reads it"
    assert made.free_blocks, "the template must have free blocks to flip bytes in"
    assert {t for tables in made.data_blocks.values() for t in tables} == set(EVENT_TABLES)
    return made


def start_on(directory: Path, data: bytes) -> tuple[Path, SalvageReport]:
    """Put `data` where the service keeps its retry log and run the start-up check on it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "retry_log.duckdb"
    path.write_bytes(data)
    return path, check_at_start(path)


def assert_sound(path: Path, report: SalvageReport, damaged: bytes, template: Template) -> dict[str, int]:
    """What every start on a damaged file must give; returns the rows salvaged per table."""
    if report.status == "ok":
        # The damage is where nothing reads (a free block): the file stays, whole.
        assert path.read_bytes() == damaged and moved_aside(path) == []
        assert table_rows(path) == template.rows
        return {t: len(template.rows[t]) for t in EVENT_TABLES}
    assert report.status == "salvaged", report
    [aside] = moved_aside(path)
    assert Path(report.moved_to) == aside and aside.read_bytes() == damaged
    assert aside.name.startswith("retry_log.duckdb.corrupt-") and aside.name.endswith("Z")
    salvaged = table_rows(path)
    for table in EVENT_TABLES:
        # Every row that came back is a row that was there, unchanged; none twice.
        assert not Counter(salvaged[table]) - Counter(template.rows[table]), table
        assert report.salvaged[table] == len(salvaged[table])
        lost = report.lost[table]
        if lost is not None:
            assert report.salvaged[table] + lost == len(template.rows[table])
    assert check(path).status == "ok"
    # The fresh log works: it resumes the salvaged rows and takes new jobs after them.
    log = RetryLog(path, backoff_s=0.0)
    try:
        assert (log.pending, log.dlq_size) == (len(salvaged["jobs"]), len(salvaged["dlq"]))
        log.add([("after-salvage", "{}", "x")], now=10.0)
        assert "after-salvage" in {j.event_id for j in log.due(10_000, now=10.0)}
        assert [h.state for h in log.find("after-salvage")] == ["pending"]
    finally:
        log.close()
    # And the loss is on /metrics as the service exports it.
    metrics = EdgeMetrics()
    metrics.watch_retry_log_salvage(report, path)
    sample = metrics.registry.get_sample_value
    for table in EVENT_TABLES:
        assert sample("edge_retry_log_salvaged_total", {"table": table}) == report.salvaged[table]
        assert sample("edge_retry_log_lost_total", {"table": table}) == (report.lost[table] or 0)
    assert sample("edge_retry_log_salvage_loss_unknown") == int(report.loss_unknown)
    assert sample("edge_retry_log_corrupt_files") == 1
    return {t: len(salvaged[t]) for t in EVENT_TABLES}


def assert_expected(report: SalvageReport, got: dict[str, int], expected: dict[str, int] | None, template) -> None:
    if expected is None:
        assert got == dict.fromkeys(EVENT_TABLES, 0) and report.loss_unknown
    else:
        assert got == expected
        assert report.lost == {t: len(template.rows[t]) - expected[t] for t in EVENT_TABLES}


def flipped(data: bytes, offset: int) -> bytes:
    damaged = bytearray(data)
    damaged[offset] ^= 0xFF
    return bytes(damaged)


# --- truncation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0005, 0.002, 0.005, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.999])
def test_a_truncated_retry_log_is_moved_aside_and_every_row_before_the_cut_is_salvaged(tmp_path, template, fraction):
    cut = int(len(template.data) * fraction)
    damaged = template.data[:cut]
    path, report = start_on(tmp_path / "state", damaged)
    got = assert_sound(path, report, damaged, template)
    broken = {b for b in range(template.total_blocks) if template.block_offset(b + 1) > cut}
    assert_expected(report, got, template.expected(broken, header_broken=cut < HEADER_BYTES), template)
    assert report.status == "salvaged"


# --- flipped bytes -------------------------------------------------------------------------------


def test_a_byte_flipped_in_a_free_block_leaves_the_file_in_place_with_every_row(tmp_path, template):
    for block in sorted(template.free_blocks):
        for at in (64, template.block_bytes // 2, template.block_bytes - 1):
            damaged = flipped(template.data, template.block_offset(block) + at)
            path, report = start_on(tmp_path / f"free-{block}-{at}", damaged)
            assert report.status == "ok", (block, at, report)
            assert assert_sound(path, report, damaged, template) == {t: len(template.rows[t]) for t in EVENT_TABLES}


def test_a_byte_flipped_in_a_data_block_costs_exactly_the_vectors_that_read_that_block(tmp_path, template):
    for block, tables in sorted(template.data_blocks.items()):
        damaged = flipped(template.data, template.block_offset(block) + 4096)
        path, report = start_on(tmp_path / f"data-{block}", damaged)
        got = assert_sound(path, report, damaged, template)
        assert_expected(report, got, template.expected({block}), template)
        for table in set(EVENT_TABLES) - tables:
            assert got[table] == len(template.rows[table]), f"block {block} holds no {table} row"


@pytest.mark.parametrize("where", ["magic", "main header", "database header 1", "database header 2", "metadata"])
def test_a_byte_flipped_in_a_header_or_the_metadata_loses_the_log_uncounted_and_the_log_starts_fresh(
    tmp_path, template, where
):
    offset = {
        "magic": 8,
        "main header": 100,
        "database header 1": 4096 + 200,
        "database header 2": 8192 + 200,
        "metadata": template.block_offset(min(template.metadata_blocks)) + 1000,
    }[where]
    damaged = flipped(template.data, offset)
    path, report = start_on(tmp_path / "state", damaged)
    assert report.status == "salvaged" and report.loss_unknown and report.salvaged == {"jobs": 0, "dlq": 0}
    assert assert_sound(path, report, damaged, template) == {"jobs": 0, "dlq": 0}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=st.sampled_from(["flip", "truncate"]), where=st.floats(0, 1, exclude_max=True))
def test_wherever_a_byte_flips_or_the_file_ends_the_start_salvages_exactly_what_is_readable(template, damage, where):
    offset = int(where * len(template.data))
    if damage == "flip":
        damaged = flipped(template.data, offset)
        block = (offset - HEADER_BYTES) // template.block_bytes
        broken = {block} if offset >= HEADER_BYTES else set()
    else:
        damaged = template.data[:offset]
        broken = {b for b in range(template.total_blocks) if template.block_offset(b + 1) > offset}
    with tempfile.TemporaryDirectory() as directory:
        path, report = start_on(Path(directory), damaged)
        got = assert_sound(path, report, damaged, template)
        if damage == "flip" and broken & template.free_blocks:
            assert report.status == "ok"
        else:
            assert_expected(report, got, template.expected(broken, header_broken=offset < HEADER_BYTES), template)


# --- not a retry log at all ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"", b'{"event_id": "e-1"}\n' * 1000, os.urandom(300_000), b"DUCK" * 5000],
    ids=["zero bytes", "json lines", "random bytes", "a repeated word"],
)
def test_a_file_that_is_not_duckdb_is_moved_aside_and_the_service_gets_an_empty_log(tmp_path, template, content):
    path, report = start_on(tmp_path / "state", content)
    assert report.status == "salvaged" and report.loss_unknown and report.reason
    assert assert_sound(path, report, content, template) == {"jobs": 0, "dlq": 0}


def test_the_write_ahead_log_is_moved_aside_with_its_file_and_its_rows_are_salvaged(tmp_path, template):
    # A service killed before a checkpoint leaves rows only in the WAL; the file beside it is damaged.
    state = tmp_path / "state"
    state.mkdir()
    path = state / "retry_log.duckdb"
    path.write_bytes(template.data)
    writer = (
        "import os, sys; from pathlib import Path; from edge_bridge.retry_log import RetryLog\n"
        "log = RetryLog(Path(sys.argv[1]))\n"
        "log._con.execute(\"SET checkpoint_threshold = '1GB'\")\n"
        "log.add([('only-in-wal', '{}', 'x')])\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", writer, str(path)], cwd=PROJECT_ROOT, check=True)
    assert path.with_name("retry_log.duckdb.wal").exists()
    [data_block] = [b for b, tables in sorted(template.data_blocks.items()) if tables == {"dlq"}][:1]
    damaged = flipped(path.read_bytes(), template.block_offset(data_block) + 4096)
    path.write_bytes(damaged)
    report = check_at_start(path)
    assert report.status == "salvaged"
    [aside] = moved_aside(path)
    assert aside.with_name(aside.name + ".wal").exists() and not path.with_name("retry_log.duckdb.wal").exists()
    log = RetryLog(path)
    try:
        assert [h.state for h in log.find("only-in-wal")] == ["pending"]
        assert report.salvaged == {
            "jobs": len(template.rows["jobs"]) + 1,
            "dlq": template.expected({data_block})["dlq"],
        }
    finally:
        log.close()


def test_a_file_the_running_service_holds_is_never_taken_for_corrupt(tmp_path, template):
    path = tmp_path / "retry_log.duckdb"
    path.write_bytes(template.data)
    holder = RetryLog(path)  # the writer's lock, as the running service holds it
    try:
        assert check(path).status == "locked"
        report = check_at_start(path, lock_wait_s=0.5)
        assert report.status == "ok" and "lock" in report.reason
        assert moved_aside(path) == []
        assert holder.pending == PENDING - DEAD
    finally:
        holder.close()


# --- find ---------------------------------------------------------------------------------------


def test_find_returns_an_events_pending_job_and_dead_letter_with_their_bodies(tmp_path, template):
    path = tmp_path / "retry_log.duckdb"
    path.write_bytes(template.data)
    log = RetryLog(path)
    try:
        [dead] = log.find("ev-1000")
        assert (dead.state, dead.last_error, dead.failed_at) == ("dlq", "refused three times", 3.0)
        assert json.loads(dead.body)["event_id"] == "ev-1000"
        [job] = log.find("ev-5")
        assert (job.state, job.attempts, job.last_error, job.priority) == ("pending", 0, "ConnectionRefused", "low")
        assert job.job_id is not None and job.next_attempt_at == 1.0
        assert log.find("ev-999999") == []
    finally:
        log.close()


# --- the CLI ------------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_bridge.cli", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_cli_check_reports_a_healthy_log_ok_with_its_counts_and_a_corrupt_one_with_exit_1(tmp_path, template):
    state = tmp_path / "state"
    state.mkdir()
    (state / "retry_log.duckdb").write_bytes(template.data)
    healthy = cli("retry-log", "check", env={"EDGE_STATE_DIR": str(state)})
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert f"{state / 'retry_log.duckdb'}: ok" in healthy.stdout
    assert f"pending jobs: {PENDING - DEAD}, DLQ rows: {DEAD}" in healthy.stdout
    assert f"size: {len(template.data)} bytes" in healthy.stdout

    [block] = [b for b, tables in sorted(template.data_blocks.items()) if tables == {"jobs"}][:1]
    corrupt = tmp_path / "copy.duckdb"
    corrupt.write_bytes(flipped(template.data, template.block_offset(block) + 4096))
    found = cli("retry-log", "check", "--path", str(corrupt))
    assert found.returncode == 1, found.stdout + found.stderr
    assert f"{corrupt}: corrupt: jobs:" in found.stdout and "checksum" in found.stdout
    assert corrupt.read_bytes() == flipped(template.data, template.block_offset(block) + 4096), "check changed it"

    garbage = tmp_path / "garbage.duckdb"
    garbage.write_bytes(b"")
    assert cli("retry-log", "check", "--path", str(garbage)).returncode == 1


def test_cli_check_says_when_the_running_service_holds_the_file(tmp_path, template):
    path = tmp_path / "retry_log.duckdb"
    path.write_bytes(template.data)
    holder = RetryLog(path)
    try:
        held = cli("--admin-url", "http://127.0.0.1:9", "retry-log", "check", "--path", str(path))
    finally:
        holder.close()
    assert held.returncode == 2, held.stdout + held.stderr
    assert ": locked: " in held.stdout and "held by a running edge service" in held.stdout
    assert "admin API is unreachable" in held.stdout


# --- the real service ---------------------------------------------------------------------------


def metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{labels} not on /metrics")


def test_the_edge_service_starts_on_a_corrupt_retry_log_delivers_what_was_salvaged_and_reports_the_loss(
    tmp_path, template, edge_factory, mosquitto, aws
):
    # A block of job bodies: some jobs are lost with it, the others and every dead letter come back.
    [block] = [
        b
        for b, tables in sorted(template.data_blocks.items())
        if tables == {"jobs"} and 0 < template.expected({b})["jobs"] < len(template.rows["jobs"])
    ][:1]
    expected = template.expected({block})
    assert expected["dlq"] == DEAD
    state = tmp_path / "edge_state"  # where edge_factory points EDGE_STATE_DIR
    state.mkdir()
    (state / "retry_log.duckdb").write_bytes(flipped(template.data, template.block_offset(block) + 4096))

    edge = edge_factory(EDGE_RETRY_BACKOFF_S="0.2")

    status = requests.get(edge.admin_url + "/status", timeout=10).json()
    assert status["retry_log_check"]["status"] == "salvaged"
    assert status["retry_log_check"]["salvaged"] == expected
    page = requests.get(edge.admin_url + "/metrics", timeout=10).text
    assert metric(page, "edge_retry_log_salvaged_total", '{table="jobs"}') == expected["jobs"]
    assert metric(page, "edge_retry_log_salvaged_total", '{table="dlq"}') == DEAD
    assert metric(page, "edge_retry_log_lost_total", '{table="jobs"}') == len(template.rows["jobs"]) - expected["jobs"]
    assert metric(page, "edge_retry_log_salvage_loss_unknown") == 0
    assert metric(page, "edge_retry_log_corrupt_files") == 1
    assert "moved aside to" in edge.log() and "retry log salvage:" in edge.log()

    # It serves: the salvaged jobs go out to SQS, and so does a new event.
    new = sample_envelope(event_id="after-restart", device_id="door-new")
    publish(mosquitto.port, new.topic, [new.to_json()])
    queue = aws.provisioned.queues["events"]
    arrived: set[str] = set()
    wait_until(
        lambda: (
            arrived.update(m["event_id"] for m in receive_all(queue, timeout=0.5)) or len(arrived) > expected["jobs"]
        ),
        timeout=90,
        message="the salvaged jobs and the new event in SQS",
    )
    assert "after-restart" in arrived and len(arrived) == expected["jobs"] + 1
    assert all(e.startswith("ev-") for e in arrived - {"after-restart"})
    wait_until(lambda: edge.admin().status()["jobs_pending"] == 0, timeout=30, message="the retry log to empty")
    assert edge.admin().status()["dlq_size"] == DEAD
