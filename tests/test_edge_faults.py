"""Fault tests with real processes: every published id ends in SQS, whatever is killed or cut.

Each test publishes a few thousand envelopes with known event ids, breaks one real part while they
flow, and then drains SQS until every id is there. Duplicates are allowed (the cloud removes them by
event_id); each test prints how many there were.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from devstack.tcp_proxy import TcpProxy
from edge_bridge.cli import AdminClient
from tests.conftest import alive, publish, queue_counts, receive_all, sample_envelope, wait_until

T0 = datetime(2024, 1, 15, 10, 30, tzinfo=timezone.utc)


def make_events(n: int, site: str = "site-123", tag: str = "e", payload_bytes: int = 0) -> list:
    return [
        sample_envelope(
            site_id=site,
            device_id=f"door-{tag}-{i % 50}",
            timestamp=T0 + timedelta(milliseconds=i),
            payload={"n": i, "pad": "x" * payload_bytes},
        )
        for i in range(n)
    ]


def publish_resilient(port: int, events: list, chunk: int = 100, deadline_s: float = 90, pace_s: float = 0.0) -> None:
    """Publish in chunks, re-publishing a chunk whose connection broke (duplicates are allowed)."""
    deadline = time.monotonic() + deadline_s
    for start in range(0, len(events), chunk):
        part = events[start : start + chunk]
        while True:
            try:
                publish(port, part[0].topic, [e.to_json() for e in part], client_id=f"pub-{start}")
                break
            except Exception:  # noqa: BLE001 - broker restarting: try this chunk again
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        if pace_s:
            time.sleep(pace_s)


class Collector:
    """Drains the events queue and counts every event id it has seen."""

    def __init__(self, queue_url: str) -> None:
        self.queue_url = queue_url
        self.seen: Counter[str] = Counter()

    def drain(self) -> Counter:
        for body in receive_all(self.queue_url, timeout=0.3):
            self.seen[body["event_id"]] += 1
        return self.seen

    def has_all(self, ids: set[str]) -> bool:
        self.drain()
        return ids <= set(self.seen)

    def report(self, name: str, ids: set[str]) -> None:
        duplicates = sum(self.seen.values()) - len(self.seen)
        print(f"\n{name}: published {len(ids)}, distinct in SQS {len(set(self.seen) & ids)}, duplicates {duplicates}")


def run_publisher(port: int, events: list, **kwargs) -> threading.Thread:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            publish_resilient(port, events, **kwargs)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.errors = errors
    thread.start()
    return thread


def finish(publisher: threading.Thread, timeout: float = 90) -> None:
    publisher.join(timeout)
    assert not publisher.is_alive(), "publisher did not finish"
    assert not publisher.errors, publisher.errors


def test_every_event_reaches_sqs_although_the_edge_service_is_killed_repeatedly(edge_factory, mosquitto, aws):
    events = make_events(3000)
    ids = {e.event_id for e in events}
    url = aws.provisioned.queues["events"]
    edge = edge_factory()
    publisher = run_publisher(mosquitto.port, events, pace_s=0.6)  # ~18 s of traffic: three restarts fit in it on a loaded machine
    for threshold in (300, 900, 1500):
        wait_until(lambda: sum(queue_counts(url)) >= threshold, 60, message=f"{threshold} events in SQS")
        assert publisher.is_alive(), "the kill must land while events flow"
        senders = AdminClient(edge.admin_url).status()["sender_pids"]
        edge.kill9_service_only()  # its sender processes are not killed with it: they must leave on their own
        wait_until(lambda: not any(alive(pid) for pid in senders), 10, message="the killed service's sender processes to exit")
        edge = edge_factory()
    finish(publisher)
    collector = Collector(url)
    wait_until(lambda: collector.has_all(ids), 60, interval=0.5, message="every id in SQS")
    collector.report("kill -9 x3", ids)
    assert ids <= set(collector.seen)


def test_every_event_reaches_sqs_across_a_30_second_sqs_cut(edge_factory, mosquitto, aws):
    events = make_events(3000)
    ids = {e.event_id for e in events}
    url = aws.provisioned.queues["events"]
    proxy = TcpProxy(aws.port).open()
    try:
        edge = edge_factory(sqs_endpoint=proxy.url, EDGE_PROBE_INTERVAL_S="0.5")
        admin = AdminClient(edge.admin_url)
        publish_resilient(mosquitto.port, events[:1000])
        proxy.cut()
        cut_at = time.monotonic()
        publish_resilient(mosquitto.port, events[1000:])
        status = wait_until(lambda: (s := admin.status())["jobs_pending"] >= 1000 and s, 30, message="events spilled to the retry log")
        assert status["sqs_reachable"] is False
        threading.Event().wait(max(0.0, 30 - (time.monotonic() - cut_at)))  # the outage itself lasts 30 s
        proxy.open()
        collector = Collector(url)
        wait_until(lambda: collector.has_all(ids), 60, interval=0.5, message="every id in SQS after the cut")
        collector.report("SQS cut 30 s", ids)
        wait_until(lambda: admin.status()["jobs_pending"] == 0, 30, message="the retry log drained")
    finally:
        proxy.cut()


def test_every_event_reaches_sqs_although_mosquitto_restarts_while_events_flow(edge_factory, mosquitto, aws):
    events = make_events(3000)
    ids = {e.event_id for e in events}
    url = aws.provisioned.queues["events"]
    edge_factory()
    publisher = run_publisher(mosquitto.port, events, pace_s=0.15)
    wait_until(lambda: sum(queue_counts(url)) >= 500, 60, message="events flowing")
    assert publisher.is_alive(), "the restart must land while events flow"
    mosquitto.restart()
    finish(publisher)
    collector = Collector(url)
    wait_until(lambda: collector.has_all(ids), 60, interval=0.5, message="every id in SQS after the broker restart")
    collector.report("Mosquitto restart", ids)


def test_event_failing_three_attempts_lands_in_the_dlq_and_a_replay_delivers_it(edge_factory, mosquitto, aws):
    from pipeline.stack import aws_client

    url = aws.provisioned.queues["events"]
    sqs = aws_client("sqs")
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"MaximumMessageSize": "1024"})  # SQS now refuses bigger events
    edge = edge_factory(EDGE_RETRY_BACKOFF_S="0.1")
    admin = AdminClient(edge.admin_url)
    poison = make_events(1, tag="big", payload_bytes=2000)[0]
    normal = make_events(2000, tag="small")
    publish(mosquitto.port, poison.topic, [poison.to_json()] + [e.to_json() for e in normal])
    letters = wait_until(lambda: admin.dlq_list(), 30, message="the refused event in the DLQ")
    assert [(d["event_id"], d["attempts"]) for d in letters] == [(poison.event_id, 3)]
    assert "shorter than 1024 bytes" in letters[0]["last_error"]
    collector = Collector(url)
    wait_until(lambda: collector.has_all({e.event_id for e in normal}), 30, message="the other events in SQS")
    assert poison.event_id not in collector.seen

    sqs.set_queue_attributes(QueueUrl=url, Attributes={"MaximumMessageSize": "262144"})  # the operator fixes SQS
    assert admin.dlq_replay() == 1
    wait_until(lambda: collector.has_all({poison.event_id}), 30, message="the replayed event in SQS")
    assert admin.status()["dlq_size"] == 0


def test_every_event_reaches_sqs_although_a_sender_process_is_killed(edge_factory, mosquitto, aws):
    """The SQS senders are processes of their own: killing one mid-flow loses nothing; the pool is rebuilt."""
    events = make_events(3000)
    ids = {e.event_id for e in events}
    url = aws.provisioned.queues["events"]
    edge = edge_factory(EDGE_SENDER_PROCESSES="2")
    admin = AdminClient(edge.admin_url)
    before = admin.status()["sender_pids"]
    assert len(before) == 2
    publisher = run_publisher(mosquitto.port, events, pace_s=0.3)
    wait_until(lambda: sum(queue_counts(url)) >= 500, 60, message="500 events in SQS")
    assert publisher.is_alive(), "the kill must land while events flow"
    os.kill(before[0], signal.SIGKILL)
    after = wait_until(lambda: (pids := admin.status()["sender_pids"]) != before and pids, 60, message="a new sender pool")
    assert len(after) == 2 and not set(after) & set(before)
    finish(publisher)
    collector = Collector(url)
    wait_until(lambda: collector.has_all(ids), 60, interval=0.5, message="every id in SQS")
    collector.report("sender process kill -9", ids)
    assert "a sender process died" in edge.log()
    assert ids <= set(collector.seen)
