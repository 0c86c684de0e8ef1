"""An operator lists what the cloud quarantined, and releases a message once its cause is fixed."""

import json

from dagster import materialize

import edge_bridge.envelope as envelope_module
from pipeline import quarantine
from pipeline.archive import hour_key, read_archive_hour
from pipeline.assets import events_archive
from pipeline.jobs import drain_events_job
from pipeline.stack import s3_filesystem
from tests.conftest import queue_counts, sample_envelope
from tests.test_drain_and_archive import resources, send_bodies


def drain_all(events_url):
    while sum(queue_counts(events_url)):
        assert drain_events_job.execute_in_process(resources=resources()).success


def test_a_quarantined_message_is_listed_with_its_reason_and_drains_normally_once_released(aws, monkeypatch, capsys):
    events_url = aws.provisioned.queues["events"]
    good = sample_envelope(device_id="good")
    newer = json.loads(sample_envelope(device_id="from-the-future-firmware").to_json())
    newer["schema_version"] = "2.0"
    send_bodies(events_url, [good.to_json(), json.dumps(newer)])
    drain_all(events_url)

    assert quarantine.main(["list", "--reason", "unsupported_major"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1
    ref, stage, reason, who, state = rows[0][:5]
    assert (reason, state) == ("unsupported_major", "held")
    assert quarantine.main(["show", ref]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert json.loads(shown["body"])["event_id"] == newer["event_id"] and shown["released"] is None

    # The fix ships (this code learns major 2); the operator puts the message back.
    monkeypatch.setattr(envelope_module, "SUPPORTED_MAJORS", frozenset({1, 2}))
    assert quarantine.main(["release", ref]) == 0
    drain_all(events_url)
    assert materialize([events_archive], partition_key=hour_key(good.timestamp), resources=resources()).success
    archived = (
        read_archive_hour(s3_filesystem(), "events-archive", hour_key(good.timestamp)).column("event_id").to_pylist()
    )
    assert sorted(archived) == sorted([good.event_id, newer["event_id"]])

    capsys.readouterr()
    assert quarantine.main(["list"]) == 0
    out = capsys.readouterr().out
    assert [line.split("\t")[4].split(" ")[0] for line in out.splitlines()] == ["released"], out
    assert quarantine.main(["release", ref]) == 1, "a line is released once"
    assert "released already" in capsys.readouterr().err


def test_release_refuses_a_reference_that_names_no_line(aws, capsys):
    assert quarantine.main(["release", "quarantine/2024-01-01/nothing.jsonl:1", "not-a-ref"]) == 1
    err = capsys.readouterr().err
    assert err.count("not released") == 2
