"""Edge buffering is measured where it happens: an SQS outage at a real edge service shows in the mart.

The edge service, its retry log and SQS are real; only the link from the edge to SQS is cut (a TCP
proxy). Events then reach the archive through the drain and compaction, and dbt builds
fct_edge_buffering from it. The device clocks are right, so a delay measured from the event time to the
forwarder (received_at - timestamp) stays small; only the time until SQS accepted each event can show
the cut.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import threading
from datetime import UTC, datetime, timedelta

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import DagsterInstance, materialize

from devstack.tcp_proxy import TcpProxy
from edge_bridge.cli import AdminClient
from pipeline import drain
from pipeline.analyst import install_httpfs
from pipeline.archive import (
    archive_dir,
    audit_hour,
    compact_hour,
    hour_key,
    landing_dir,
    read_archive_hour,
    write_landing,
)
from pipeline.assets import events_archive
from pipeline.jobs import drain_events_job
from pipeline.resources import DBT_PROJECT_DIR, dbt_executable
from pipeline.stack import s3_filesystem
from tests.conftest import publish, queue_counts, sample_envelope, wait_until
from tests.test_archive_exactly_once import resources

CUT_S = 8.0  # how long each event published during the cut waits at least, from its receipt to SQS
SMALL_S = 3.0  # edge buffering with SQS reachable, with room for a loaded machine


def events_now(site: str, n: int) -> list:
    """Events received by the forwarder now, stamped by devices whose clocks are right."""
    received = datetime.now(UTC)
    return [
        sample_envelope(
            site_id=site,
            device_id=f"door-{i % 20}",
            timestamp=received - timedelta(milliseconds=50 + i),
            received_at=received,
            payload={"n": i},
        )
        for i in range(n)
    ]


def publish_all(port: int, events: list, client_id: str) -> None:
    publish(port, events[0].topic, [e.to_json() for e in events], client_id=client_id)


def drain_until_empty(url: str, instance: DagsterInstance) -> None:
    for _ in range(10):
        if queue_counts(url) == (0, 0):
            return
        assert drain_events_job.execute_in_process(resources=resources(), instance=instance).success
    raise AssertionError(f"the events queue did not empty: {queue_counts(url)}")


def dbt_build_edge_buffering(tmp_path, outage_delay_seconds: float) -> None:
    """`dbt build` of fct_edge_buffering (and what it needs) into a database of this test's own."""
    install_httpfs()
    env = {**os.environ, "DBT_DUCKDB_PATH": str(tmp_path / "analytics.duckdb")}
    command = [
        dbt_executable(),
        "build",
        "--select",
        "+fct_edge_buffering",
        "dim_sites",
        "--indirect-selection",
        "cautious",
        "--vars",
        f"{{outage_delay_seconds: {outage_delay_seconds}}}",
        "--project-dir",
        str(DBT_PROJECT_DIR),
        "--profiles-dir",
        str(DBT_PROJECT_DIR),
        "--target-path",
        str(tmp_path / "dbt-target"),
        "--log-path",
        str(tmp_path / "dbt-logs"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]


def mart(tmp_path, site: str) -> list[tuple]:
    with duckdb.connect(str(tmp_path / "analytics.duckdb"), read_only=True) as con:
        return con.sql(
            "select events, events_with_queued_at, p50_delay_seconds, max_delay_seconds, p95_device_delay_seconds, outage_suspected "
            f"from fct_edge_buffering where site_id = '{site}' order by event_hour_utc"
        ).fetchall()


def test_an_sqs_cut_at_a_real_edge_shows_as_edge_buffering_in_the_mart(edge_factory, mosquitto, aws, tmp_path):
    url = aws.provisioned.queues["events"]
    proxy = TcpProxy(aws.port).open()
    try:
        edge = edge_factory(sqs_endpoint=proxy.url, EDGE_PROBE_INTERVAL_S="0.5")
        admin = AdminClient(edge.admin_url)
        before = events_now("site-before", 100)
        publish_all(mosquitto.port, before, "pub-before")
        wait_until(lambda: sum(queue_counts(url)) >= len(before), 30, message="the events before the cut in SQS")

        proxy.cut()
        during = events_now("site-during", 100)
        publish_all(mosquitto.port, during, "pub-during")
        wait_until(
            lambda: admin.status()["jobs_pending"] >= len(during),
            30,
            message="the events during the cut in the retry log",
        )
        outage_left = CUT_S - (datetime.now(UTC) - during[0].received_at).total_seconds()
        threading.Event().wait(max(0.0, outage_left))  # the outage itself
        proxy.open()
        wait_until(lambda: admin.status()["jobs_pending"] == 0, 60, interval=0.5, message="the retry log replayed")
        wait_until(lambda: sum(queue_counts(url)) >= len(before) + len(during), 30, message="every event in SQS")
    finally:
        proxy.cut()

    with DagsterInstance.ephemeral() as instance:
        drain_until_empty(url, instance)
        for hour in sorted({hour_key(e.timestamp) for e in before + during}):
            assert materialize([events_archive], partition_key=hour, resources=resources(), instance=instance).success
    dbt_build_edge_buffering(tmp_path, outage_delay_seconds=CUT_S / 2)

    cut, calm = mart(tmp_path, "site-during"), mart(tmp_path, "site-before")
    print(
        f"\nfct_edge_buffering (events, with queued_at, p50 s, max s, p95 device s, outage): during the cut {cut}, before it {calm}"
    )
    assert sum(row[0] for row in cut) == len(during) and sum(row[1] for row in cut) == len(during)
    assert all(row[2] >= CUT_S and row[5] for row in cut), "every event of the cut waited the outage out in the site"
    assert sum(row[0] for row in calm) == len(before)
    assert all(row[3] < SMALL_S and not row[5] for row in calm), "with SQS reachable an event leaves the site at once"
    assert all(row[4] < 1 for row in cut + calm), (
        "the device clocks were right: received_at - timestamp cannot see the cut"
    )


def test_landing_and_archive_files_from_before_queued_at_still_compact_and_read_it_as_null(aws):
    filesystem = s3_filesystem()
    received = datetime(2024, 3, 4, 10, 0, tzinfo=UTC)
    old, new = (
        sample_envelope(device_id="old", timestamp=received, received_at=received),
        sample_envelope(device_id="new", timestamp=received, received_at=received),
    )
    hour = hour_key(received)
    queued = received + timedelta(seconds=12)
    write_landing(filesystem, "events-archive", "landing", [new], "after", received, queued_at=[queued])
    write_landing(filesystem, "events-archive", "landing", [old], "before", received)
    landed = f"{landing_dir('events-archive', 'landing', hour)}/before.parquet"
    legacy = pq.read_table(landed, filesystem=filesystem).drop_columns(["queued_at"])
    pq.write_table(legacy, landed, filesystem=filesystem)  # as a drain run wrote it before the column existed
    assert "queued_at" not in pq.read_schema(landed, filesystem=filesystem).names

    result = compact_hour(filesystem, "events-archive", "landing", hour)

    assert result.archived_rows == 2
    archived = read_archive_hour(filesystem, "events-archive", hour)
    assert dict(zip(archived.column("device_id").to_pylist(), archived.column("queued_at").to_pylist())) == {
        "old": None,
        "new": queued,
    }
    legacy_archive = f"{archive_dir('events-archive', hour)}/events_0001.parquet"
    pq.write_table(
        archived.drop_columns(["queued_at"]), legacy_archive, filesystem=filesystem
    )  # an hour compacted before it
    assert read_archive_hour(filesystem, "events-archive", hour).column("queued_at").to_pylist() == [None, None]
    assert read_archive_hour(filesystem, "events-archive", hour).schema.field("queued_at").type == pa.timestamp(
        "us", tz="UTC"
    )
    assert audit_hour(filesystem, "events-archive", hour).schema_problems == [], "the archive's schema check accepts it"


def test_the_drain_keeps_each_events_sqs_sent_time_from_its_first_copy_across_the_hand_over_between_ops():
    event = sample_envelope()
    first, again = datetime(2024, 3, 4, 10, 0, 5, tzinfo=UTC), datetime(2024, 3, 4, 10, 0, 9, tzinfo=UTC)
    window = drain.Window(
        [
            drain.QueueMessage("m-1", "r-1", event.to_json(), 1, sent_at=first),
            drain.QueueMessage("m-2", "r-2", event.to_json(), 1, sent_at=again),  # the edge sent it twice
            drain.QueueMessage("m-3", "r-3", sample_envelope(device_id="other").to_json(), 1),  # SQS did not say
        ]
    )

    parsed = pickle.loads(pickle.dumps(drain.parse_window(window)))  # as Dagster hands it from op to op

    assert parsed.duplicates == 1 and all(isinstance(text, str) for text in parsed.queued_at)
    assert parsed.queued_times == [first, None]
    assert drain.sent_at({"SentTimestamp": "1709546405000"}) == first


def test_a_cloud_side_resend_keeps_the_queued_at_it_carries_and_a_bad_one_falls_back_to_sqs_sent_time():
    replayed = {"SentTimestamp": "1709550000000"}  # when the 02:00 replay sent it again

    assert drain.sent_at(
        replayed, {"queued_at": {"DataType": "String", "StringValue": "2024-03-04T10:00:05+00:00"}}
    ) == datetime(2024, 3, 4, 10, 0, 5, tzinfo=UTC)
    assert drain.sent_at(replayed, {"queued_at": {"DataType": "String", "StringValue": "not a time"}}) == datetime(
        2024, 3, 4, 11, 0, tzinfo=UTC
    )
    assert drain.sent_at({"SentTimestamp": "soon"}) is None


def test_a_claim_checked_event_is_queued_when_sqs_accepted_its_pointer(aws):
    from edge_bridge.claim_check import EDGE_PREFIX, check_in
    from pipeline.stack import aws_client, load_stack_config

    s3, sqs, url = aws_client("s3"), aws_client("sqs"), aws.provisioned.queues["events"]
    big = sample_envelope(payload={"snapshot_b64": "A" * 300_000})
    pointer = check_in(
        s3, load_stack_config().claim_check.bucket, EDGE_PREFIX, big.site_id, big.event_id, big.to_json()
    )
    before = datetime.now(UTC).replace(microsecond=0)
    sqs.send_message(QueueUrl=url, MessageBody=pointer)
    after = datetime.now(UTC)

    window = wait_until(
        lambda: (w := drain.receive_window(sqs, url, 10, wait_time_s=1)).messages and w,
        30,
        message="the pointer in SQS",
    )
    parsed = drain.parse_window(window, s3_client=s3)

    assert [e.event_id for e in parsed.events] == [big.event_id]
    assert before <= parsed.queued_times[0] <= after
