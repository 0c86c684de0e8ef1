"""Reconciliation in three legs: a real edge service, Mosquitto, the SQS/S3 emulator, and the drain and
archive code run in process; the check names the site and hour whose edge, drain and archive counts differ."""

from __future__ import annotations

import json
import warnings
from datetime import UTC, datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import DagsterInstance, build_sensor_context
from pyarrow import fs

from edge_bridge import manifest
from pipeline import partitions
from pipeline.archive import archive_hour, hour_key, landing_dir
from pipeline.jobs import drain_events_job
from pipeline.reconciliation import DrainLeg, EdgeLeg, compare
from pipeline.resources import RESOURCES, DrainSettings
from pipeline.sensors import archive_hours_sensor
from pipeline.stack import aws_client, s3_filesystem
from tests.conftest import publish, queue_counts, sample_envelope, wait_until

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a partitioned asset check is a Dagster preview feature
    from pipeline.definitions import defs
    from pipeline.reconciliation_checks import reconciliation_sensor

H1 = datetime(2024, 1, 15, 10, 0, tzinfo=UTC)
H2 = H1 + timedelta(hours=1)
SITES = ("site-a", "site-b")
BUCKET = "events-archive"


def resources() -> dict:
    """The code location's own resources (read from the environment the `aws` fixture sets), short windows."""
    return {**RESOURCES, "drain_settings": DrainSettings(window_seconds=5)}


def events_for(site: str, hour: datetime, n: int, first: int = 0):
    return [
        sample_envelope(site_id=site, device_id=f"{site}-door-{i}", timestamp=hour + timedelta(seconds=7 * i + 1))
        for i in range(first, first + n)
    ]


def publish_events(port: int, envelopes) -> None:
    for site in {e.site_id for e in envelopes}:
        mine = [e.to_json() for e in envelopes if e.site_id == site]
        publish(port, f"sites/{site}/events/ajax/door_access", mine, client_id=f"pub-{site}")


def edge_manifest(site: str, hour: datetime) -> dict | None:
    key = manifest.manifest_key(site, hour_key(hour), "edge-bridge-test")
    try:
        return json.loads(aws_client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read())
    except Exception:  # noqa: BLE001 - not put yet
        return None


def wait_edge_sent(site: str, hour: datetime, sent: int, timeout: float = 60) -> dict:
    return wait_until(
        lambda: (m := edge_manifest(site, hour)) and m["sent"] == sent and m,
        timeout,
        message=f"the edge manifest of {site} {hour_key(hour)} to show {sent} sent",
    )


def drain_everything(instance, url: str) -> None:
    while queue_counts(url) != (0, 0):
        result = drain_events_job.execute_in_process(resources=resources(), instance=instance)
        assert result.success


def archive_and_check(instance, hour: datetime):
    """archive_hour_job as the daemon runs it: compaction, then every check of the partition."""
    result = defs.resolve_job_def("archive_hour_job").execute_in_process(
        partition_key=hour_key(hour), instance=instance, resources=resources()
    )
    assert result.success
    [check] = [c for c in result.get_asset_check_evaluations() if c.check_name == "reconciles_edge_drain_archive"]
    return check


def sites_of(check) -> dict[str, dict]:
    return {s["site_id"]: s for s in check.metadata["sites"].value}


def run_clean_traffic(edge_factory, mosquitto, aws, per_site_hour: int = 5):
    edge_factory(EDGE_MANIFEST_INTERVAL_S="0.5")
    sent = [e for site in SITES for hour in (H1, H2) for e in events_for(site, hour, per_site_hour)]
    publish_events(mosquitto.port, sent)
    for site in SITES:
        for hour in (H1, H2):
            wait_edge_sent(site, hour, per_site_hour)
    return sent


def test_edge_drain_and_archive_agree_for_a_clean_run_across_two_sites_and_hours(edge_factory, mosquitto, aws):
    run_clean_traffic(edge_factory, mosquitto, aws)
    with DagsterInstance.ephemeral() as instance:
        drain_everything(instance, aws.provisioned.queues["events"])
        checks = {hour: archive_and_check(instance, hour) for hour in (H1, H2)}
    for check in checks.values():
        assert check.passed, check.metadata
        assert check.metadata["settled"].value is True
        assert check.metadata["disagreeing"].value == "none"
        for site in SITES:
            row = sites_of(check)[site]
            assert (row["edge_accepted"], row["edge_sent"], row["edge_buffered"]) == (5, 5, 0)
            assert (row["drained_messages"], row["drained_events"], row["archived"]) == (5, 5, 5)


def test_a_message_lost_between_edge_and_drain_fails_the_check_naming_its_site_and_hour(edge_factory, mosquitto, aws):
    run_clean_traffic(edge_factory, mosquitto, aws)
    url = aws.provisioned.queues["events"]
    sqs = aws_client("sqs")
    victim = None
    while victim is None:  # take one site-b event of the second hour off the queue, as a loss would
        for msg in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=1).get("Messages", []):
            body = json.loads(msg["Body"])
            if victim is None and body["site_id"] == "site-b" and body["timestamp"].startswith("2024-01-15T11"):
                sqs.delete_message(QueueUrl=url, ReceiptHandle=msg["ReceiptHandle"])
                victim = body["event_id"]
    with DagsterInstance.ephemeral() as instance:
        drain_everything(instance, url)
        first, second = archive_and_check(instance, H1), archive_and_check(instance, H2)
    assert first.passed, first.metadata
    assert not second.passed and second.severity.value == "ERROR"
    assert second.metadata["disagreeing"].value == f"site-b @ {hour_key(H2)}"
    row = sites_of(second)["site-b"]
    assert (row["edge_sent"], row["drained_messages"], row["archived"]) == (5, 4, 4)
    assert "1 messages the edge sent were not drained" in row["problems"][0]
    assert sites_of(second)["site-a"]["problems"] == []


def test_an_event_deleted_from_landing_fails_the_check_naming_its_site_and_hour(edge_factory, mosquitto, aws):
    run_clean_traffic(edge_factory, mosquitto, aws)
    filesystem = s3_filesystem()
    with DagsterInstance.ephemeral() as instance:
        drain_everything(instance, aws.provisioned.queues["events"])
        # One landed event of site-a, first hour, disappears from its landing file.
        directory = landing_dir(BUCKET, "landing", hour_key(H1))
        [path] = [
            info.path for info in filesystem.get_file_info(fs.FileSelector(directory)) if info.path.endswith(".parquet")
        ]
        table = pq.read_table(path, filesystem=filesystem)
        site_a = pc.equal(table.column("site_id"), "site-a")
        drop = pc.index(site_a, True).as_py()
        kept = table.filter(pa.array([i != drop for i in range(table.num_rows)]))
        pq.write_table(kept, path, filesystem=filesystem)
        check = archive_and_check(instance, H1)
    assert not check.passed
    assert check.metadata["disagreeing"].value == f"site-a @ {hour_key(H1)}"
    row = sites_of(check)["site-a"]
    assert (row["edge_sent"], row["drained_messages"], row["drained_events"], row["archived"]) == (5, 5, 5, 4)
    assert row["problems"] == ["1 events drained but not archived"]


def test_a_late_event_re_checks_its_hour_through_both_sensors(edge_factory, mosquitto, aws, monkeypatch):
    monkeypatch.setenv("PIPELINE_RECONCILIATION_LOOKBACK_HOURS", str(24 * 365 * 5))  # the test's hours are of 2024
    run_clean_traffic(edge_factory, mosquitto, aws)
    url = aws.provisioned.queues["events"]
    s3 = aws_client("s3")
    with DagsterInstance.ephemeral() as instance:
        drain_everything(instance, url)
        before = archive_and_check(instance, H1)
        assert before.passed
        seen = archive_hours_sensor(build_sensor_context(instance=instance, resources=resources()))
        assert sorted(r.partition_key for r in seen.run_requests) == [hour_key(H1), hour_key(H2)]
        first = reconciliation_sensor(build_sensor_context(instance=instance, resources=resources()))
        cursor = first.cursor

        late = events_for("site-a", H1, 1, first=100)
        publish_events(mosquitto.port, late)
        wait_edge_sent("site-a", H1, 6)
        drain_everything(instance, url)

        # archive_hours_sensor: new landing for the hour -> re-compaction, and so the check, of that hour
        landed = archive_hours_sensor(
            build_sensor_context(instance=instance, cursor=seen.cursor, resources=resources())
        )
        assert [r.partition_key for r in landed.run_requests] == [hour_key(H1)]
        # reconciliation_sensor: the settled hour's edge manifest changed -> the same hour again
        again = reconciliation_sensor(build_sensor_context(instance=instance, cursor=cursor, resources=resources()))
        assert [r.partition_key for r in again.run_requests] == [hour_key(H1)]
        after = archive_and_check(instance, H1)
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="manifests/drain/")["KeyCount"] > 0
    assert after.passed, after.metadata
    assert sites_of(after)["site-a"]["archived"] == 6 and sites_of(after)["site-a"]["edge_sent"] == 6


def test_edge_counts_survive_kill_9_of_the_edge_service(edge_factory, mosquitto, aws):
    # A long interval: nothing is snapshotted or put before the kill, so only the journal holds the counts.
    edge = edge_factory(EDGE_MANIFEST_INTERVAL_S="3600")
    url = aws.provisioned.queues["events"]
    publish_events(mosquitto.port, events_for("site-a", H1, 8))
    wait_until(lambda: sum(queue_counts(url)) == 8, 30, message="8 events in SQS")
    assert edge_manifest("site-a", H1) is None
    edge.kill9()

    edge_factory(EDGE_MANIFEST_INTERVAL_S="0.5")
    assert wait_edge_sent("site-a", H1, 8)["accepted"] == 8
    publish_events(mosquitto.port, events_for("site-a", H1, 3, first=50))
    assert wait_edge_sent("site-a", H1, 11)["accepted"] == 11


def test_events_still_buffered_at_the_edge_are_reported_apart_and_are_not_a_mismatch():
    hour = hour_key(H1)
    [row] = compare(
        hour,
        {"site-a": EdgeLeg(accepted=7, sent=5)},
        {"site-a": DrainLeg(messages={f"m{i}" for i in range(5)}, events={f"e{i}" for i in range(5)})},
        {"site-a": 5},
        settled=True,
    )
    assert row.problems == [] and row.edge_buffered == 2
    [lost] = compare(
        hour,
        {"site-a": EdgeLeg(accepted=7, sent=6)},
        {"site-a": DrainLeg(messages={f"m{i}" for i in range(5)}, events={f"e{i}" for i in range(5)})},
        {"site-a": 5},
        settled=True,
    )
    assert lost.problems and lost.edge_buffered == 1


def test_an_open_hour_judges_only_the_drain_to_archive_leg():
    drained = {"site-a": DrainLeg(messages={"m1"}, events={"e1"})}
    [row] = compare(hour_key(H1), {"site-a": EdgeLeg(accepted=3, sent=3)}, drained, {"site-a": 1}, settled=False)
    assert row.problems == []
    [row] = compare(hour_key(H1), {"site-a": EdgeLeg(accepted=3, sent=3)}, drained, {}, settled=False)
    assert row.problems == ["1 events drained but not archived"]


def test_the_edge_files_an_event_under_the_hour_the_archive_does():
    assert manifest.ARCHIVE_START == partitions.ARCHIVE_START
    received = datetime(2024, 3, 1, 12, 5, tzinfo=UTC)
    for ts in (H1 + timedelta(minutes=59, seconds=59), datetime(1970, 1, 1, tzinfo=UTC), received):
        assert manifest.event_hour(ts, received) == archive_hour(ts, received)
    body = sample_envelope(timestamp=datetime(2024, 1, 15, 14, 30, tzinfo=timezone(timedelta(hours=2)))).to_json()
    assert manifest.event_hour_of_body(body) == ("site-123", "2024-01-15-12:00")
