"""The priority consumer keeps one message's trouble to that message: poison, claim checks, bounds, old files."""

import threading
from datetime import UTC, datetime

import duckdb
import pytest

from devstack.processes import free_port
from edge_bridge.claim_check import check_in_downstream
from pipeline.consumers.duckdb_store import DuckDBStore
from pipeline.consumers.pending import PendingWork
from pipeline.consumers.store import ConsumerStore, Item
from pipeline.routing.config import AutomationConfig
from pipeline.stack import aws_client, dead_letter_queue_name
from tests.conftest import queue_counts, sample_envelope, wait_until
from tests.test_priority_consumer import consumer_in_process, handled_total, priority, query, send  # noqa: F401 - priority is a fixture

CLAIM_CHECK_BUCKET = "events-claim-check"


def counter(metric, name="high"):
    return metric.labels(priority=name)._value.get()


def high_events(n, **overrides):
    return [sample_envelope(event_type="intrusion_alert", device_id=f"panel-{i}", **overrides) for i in range(n)]


def test_a_message_that_fails_alone_is_rejected_with_its_reason_while_its_batch_mates_are_handled_once(
    priority, tmp_path, monkeypatch
):
    routing, urls = priority
    original = ConsumerStore._insert
    failed_inserts = []  # rows per insert that held the poison

    def insert(self, sql, schema, rows):
        if any(value == "poison" for row in rows for value in row):
            failed_inserts.append(len(rows))
            raise RuntimeError("the store trips over this event")
        return original(self, sql, schema, rows)

    monkeypatch.setattr(ConsumerStore, "_insert", insert)
    good = high_events(20)
    poison = sample_envelope(event_type="intrusion_alert", device_id="poison")
    send(urls["high"], [e.to_json() for e in good[:10]] + [poison.to_json()] + [e.to_json() for e in good[10:]])
    consumer = consumer_in_process(routing, tmp_path)
    try:
        wait_until(
            lambda: handled_total(consumer) == 20 and counter(consumer.metrics.rejected) == 1,
            30,
            message="20 handled and the poison rejected",
        )
        wait_until(lambda: queue_counts(urls["high"]) == (0, 0), 20, message="the high queue to empty")
    finally:
        consumer.stop()
    assert max(failed_inserts) > 1 and failed_inserts[-1] == 1  # it failed a batch with good events in it, then alone
    assert sorted(query(tmp_path, "SELECT site_id, event_id FROM events")) == sorted(e.key for e in good)
    [(reason, error_type, message_id, receive_count, prio, body)] = query(
        tmp_path, "SELECT reason, error_type, message_id, receive_count, priority, body FROM rejected"
    )
    assert reason == "handling_failed: RuntimeError: the store trips over this event" and error_type == "RuntimeError"
    assert message_id and receive_count == 1 and prio == "high" and body == poison.to_json()
    dlq = aws_client("sqs").get_queue_url(QueueName=dead_letter_queue_name(routing.priority.queue_for("high")))[
        "QueueUrl"
    ]
    assert queue_counts(dlq) == (0, 0)


def test_a_database_that_cannot_be_written_leaves_every_message_in_sqs(priority, tmp_path, monkeypatch):
    routing, urls = priority

    def disk_full(self, *args):
        raise duckdb.IOException("No space left on device")

    monkeypatch.setattr(ConsumerStore, "handle_batch", disk_full)
    monkeypatch.setattr(ConsumerStore, "reject", disk_full)
    send(urls["high"], [e.to_json() for e in high_events(5)])
    consumer = consumer_in_process(routing, tmp_path)
    try:
        wait_until(lambda: counter(consumer.metrics.left) >= 5, 20, message="the batch to be left for redelivery")
    finally:
        consumer.stop()
    assert queue_counts(urls["high"]) == (
        0,
        5,
    )  # still in flight: SQS brings them back, and redrives them after 5 receives
    assert query(tmp_path, "SELECT count(*) FROM rejected") == [(0,)]


def claim_checked(size=2 * 1024 * 1024):
    big = sample_envelope(event_type="intrusion_alert", device_id="camera-9", payload={"frame": "x" * size})
    return big, check_in_downstream(aws_client("s3"), CLAIM_CHECK_BUCKET, big.site_id, big.event_id, big.to_json())


def test_a_claim_checked_event_in_the_high_queue_is_fetched_and_handled(priority, tmp_path):
    routing, urls = priority
    big, pointer = claim_checked()
    neighbours = high_events(2)
    send(urls["high"], [neighbours[0].to_json(), pointer, neighbours[1].to_json()])
    consumer = consumer_in_process(routing, tmp_path)
    try:
        wait_until(lambda: handled_total(consumer) == 3, 30, message="the claim-checked event and its neighbours")
        wait_until(lambda: queue_counts(urls["high"]) == (0, 0), 20, message="the high queue to empty")
    finally:
        consumer.stop()
    [(size,)] = query(tmp_path, f"SELECT length(payload->>'frame') FROM events WHERE event_id = '{big.event_id}'")
    assert size == 2 * 1024 * 1024


def test_a_claim_check_pointer_whose_object_was_altered_is_rejected(priority, tmp_path):
    routing, urls = priority
    big, pointer = claim_checked(size=1000)
    aws_client("s3").put_object(
        Bucket=CLAIM_CHECK_BUCKET,
        Key=f"claim-check-routed/{big.site_id}/{big.event_id}.json",
        Body=big.to_json().replace("x", "y").encode(),
    )
    send(urls["high"], [pointer, high_events(1)[0].to_json()])
    consumer = consumer_in_process(routing, tmp_path)
    try:
        wait_until(
            lambda: queue_counts(urls["high"]) == (0, 0) and handled_total(consumer) == 1,
            20,
            message="the neighbour handled and the pointer settled",
        )
    finally:
        consumer.stop()
    [(reason, body)] = query(tmp_path, "SELECT reason, body FROM rejected")
    assert reason.startswith("claim_check_mismatch: ") and body == pointer


def test_a_claim_check_that_s3_cannot_serve_stays_in_sqs_while_its_neighbours_are_handled(priority, tmp_path):
    routing, urls = priority
    _, pointer = claim_checked(size=1000)
    send(urls["high"], [pointer] + [e.to_json() for e in high_events(2)])
    unreachable = aws_client("s3", endpoint_url=f"http://127.0.0.1:{free_port()}")
    consumer = consumer_in_process(routing, tmp_path, s3=unreachable)
    try:
        wait_until(
            lambda: handled_total(consumer) == 2 and counter(consumer.metrics.left) == 1,
            30,
            message="the neighbours handled and the pointer left",
        )
    finally:
        consumer.stop()
    assert queue_counts(urls["high"]) == (0, 1)  # the pointer, in flight until SQS hands it out again
    assert query(tmp_path, "SELECT count(*) FROM rejected") == [(0,)]


def test_the_high_poller_stops_receiving_while_its_bound_is_pending_and_resumes_when_written(
    priority, tmp_path, monkeypatch
):
    routing, urls = priority
    writer_may_go = threading.Event()
    original_handle, original_room = ConsumerStore.handle_batch, PendingWork.wait_for_high_room
    refusals = []

    def stalled(self, items):
        writer_may_go.wait(30)
        return original_handle(self, items)

    def room(self, needed, timeout):
        fits = original_room(self, needed, timeout)
        if not fits:
            refusals.append(self.count("high"))
        return fits

    monkeypatch.setattr(ConsumerStore, "handle_batch", stalled)
    monkeypatch.setattr(PendingWork, "wait_for_high_room", room)
    send(urls["high"], [e.to_json() for e in high_events(60)])
    consumer = consumer_in_process(routing, tmp_path, max_pending_high=20)
    try:
        wait_until(lambda: len(refusals) >= 2, 20, message="the high poller to wait at its bound")
        visible, in_flight = queue_counts(urls["high"])
        assert 10 < in_flight <= 20 and visible + in_flight == 60, (visible, in_flight)
        writer_may_go.set()
        wait_until(lambda: handled_total(consumer) == 60, 30, message="every high event once the writer goes on")
    finally:
        writer_may_go.set()
        consumer.stop()


def test_medium_and_low_pending_never_hold_the_high_poller():
    pending = PendingWork(high_limit=20)
    pending.admit("medium", 100)
    pending.admit("low", 10)
    assert pending.wait_for_high_room(10, timeout=0)
    pending.admit("high", 15)
    assert not pending.wait_for_high_room(10, timeout=0)
    pending.settle("high", 5)
    assert pending.wait_for_high_room(10, timeout=0)


def test_the_writer_takes_high_before_medium_and_joins_only_batches_of_one_priority():
    pending = PendingWork(high_limit=100)
    pending.put("medium", ["m1"])
    pending.put("high", ["h1"])
    pending.put("high", ["h2"])
    assert pending.take(timeout=0) == ("high", ["h1", "h2"])
    assert pending.take(timeout=0) == ("medium", ["m1"])
    assert pending.take(timeout=0) is None


OLD_SCHEMA = """
CREATE TABLE events (
    event_id VARCHAR PRIMARY KEY, event_type VARCHAR, source VARCHAR, site_id VARCHAR, device_id VARCHAR,
    event_time TIMESTAMPTZ, payload JSON, priority VARCHAR, enqueued_at TIMESTAMPTZ, handled_at TIMESTAMPTZ,
    latency_ms DOUBLE, exported BOOLEAN DEFAULT false
);
CREATE TABLE incidents (
    incident_id VARCHAR PRIMARY KEY, event_id VARCHAR UNIQUE, event_type VARCHAR, site_id VARCHAR, device_id VARCHAR,
    opened_at TIMESTAMPTZ, webhook_status VARCHAR
);
CREATE TABLE rejected (received_at TIMESTAMPTZ, priority VARCHAR, reason VARCHAR, body VARCHAR);
INSERT INTO events (event_id, site_id, event_type, exported) VALUES ('evt-1', 'site-a', 'intrusion_alert', true);
INSERT INTO incidents VALUES ('inc-1', 'evt-1', 'intrusion_alert', 'site-a', 'panel-1', now(), 'delivered');
INSERT INTO rejected VALUES (now(), 'high', 'bad_json: x', '{');
"""


def test_a_consumer_file_keyed_by_event_id_alone_is_migrated_keeping_its_rows(tmp_path):
    path = tmp_path / "consumer.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(OLD_SCHEMA)
    automation = AutomationConfig.model_validate({"rules": [{"event_type": "intrusion_alert", "incident": True}]})
    store = DuckDBStore(path, automation)
    try:
        theirs = sample_envelope(site_id="site-b", event_type="intrusion_alert", event_id="evt-1")
        result = store.handle_batch([Item("high", "handle", datetime.now(UTC), theirs, theirs.to_json())])
        assert len(result.handled) == 1 and len(result.new_incidents) == 1
        assert store.con.sql("SELECT site_id, event_id, exported FROM events ORDER BY site_id").fetchall() == [
            ("site-a", "evt-1", True),
            ("site-b", "evt-1", False),
        ]
        assert store.con.sql("SELECT count(*) FROM incidents").fetchall() == [(2,)]
        assert store.con.sql("SELECT reason, error_type FROM rejected").fetchall() == [("bad_json: x", None)]
    finally:
        store.close()


@pytest.fixture(autouse=True)
def _no_automation_endpoint(monkeypatch):
    monkeypatch.delenv("TEST_AUTOMATION_URL", raising=False)
