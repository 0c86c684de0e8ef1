"""Fault tests with real processes: every event the broker acknowledged ends in SQS, whatever is killed or cut.

The kills land while events are inside the service (received from MQTT, not yet in SQS or the retry
log): a publisher keeps the broker busy for as long as a test needs, SQS is slowed (or cut) by a TCP
proxy so work piles up in the service, and each kill waits, after a seeded random moment, until the
service's own counters show events in flight, which the test then reports. A service that
acknowledged too early would lose exactly those events. Duplicates are allowed (the cloud removes
them by (site_id, event_id)); each test prints how many there were.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

from devstack.tcp_proxy import TcpProxy
from edge_bridge.cli import AdminClient
from tests.conftest import alive, publish, receive_all, sample_envelope, wait_until
from tests.helpers.edge_flow import ContinuousPublisher, fault_with_events_inside, read_flow

T0 = datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
SEED = int(os.environ.get("EDGE_FAULT_SEED", "14"))
SQS_LATENCY_S = 0.05  # per SQS call: a 250-event chunk takes over a second, so events pile up inside the service
QUIET_S = 5.0  # nothing moving for this long, with the service connected: no more events are on their way
STUCK_S = 20.0  # the same while the service holds events: it is stuck with them


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


def publish_resilient(port: int, events: list, chunk: int = 100, deadline_s: float = 90) -> None:
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


def expect_every_acknowledged_event_in_sqs(
    name: str, url: str, acked: set[str], faults: list, edge, timeout: float = 120
) -> None:
    """Wait until SQS holds every acknowledged id, or until nothing has moved for QUIET_S (the service
    connected and idle, its retry log empty, no new id in SQS; STUCK_S if it still holds events it
    neither sent nor committed): whatever is missing then is lost."""
    collector = Collector(url)
    admin = edge.admin()
    last = {"state": None, "since": time.monotonic()}

    def done() -> bool:
        if collector.has_all(acked):
            return True
        status, flow = admin.status(), read_flow(edge.admin_url)
        state = (flow.received, flow.inside, len(collector.seen), status["jobs_pending"])
        if state != last["state"] or status["jobs_pending"] or not status["mqtt_connected"]:
            last.update(state=state, since=time.monotonic())
            return False
        last["inside"] = flow.inside
        return time.monotonic() - last["since"] > (STUCK_S if flow.inside else QUIET_S)

    wait_until(done, timeout, interval=0.5, message=f"every acknowledged id in SQS ({len(acked)})")
    collector.report(name, acked)
    print(
        "  at each fault, inside the service: "
        + ", ".join(
            f"{f.inside} (received {f.received}, in SQS {f.delivered}, in the retry log {f.spilled})" for f in faults
        )
    )
    missing = acked - set(collector.seen)
    stuck = f" (the service holds {last['inside']} events it neither sent nor committed)" if last.get("inside") else ""
    assert not missing, (
        f"{len(missing)} events the broker acknowledged never reached SQS{stuck}, e.g. {sorted(missing)[:3]}"
    )


def test_every_acknowledged_event_reaches_sqs_although_the_edge_service_is_killed_with_events_inside(
    edge_factory, mosquitto, aws
):
    url = aws.provisioned.queues["events"]
    rng = random.Random(SEED)
    proxy = TcpProxy(aws.port).open().slow(SQS_LATENCY_S)
    publisher = ContinuousPublisher(mosquitto.port)
    try:
        edge = edge_factory(sqs_endpoint=proxy.url)
        publisher.start()
        kills = []
        for _ in range(3):
            senders = AdminClient(edge.admin_url).status()["sender_pids"]
            # Its sender processes are not killed with it, as with the OOM killer: they must leave on their own.
            kills.append(fault_with_events_inside(edge.admin_url, edge.kill9_service_only, rng, minimum=100))
            wait_until(
                lambda: not any(alive(pid) for pid in senders),
                15,
                message="the killed service's sender processes to exit",
            )
            edge = edge_factory(sqs_endpoint=proxy.url)
        acked = publisher.stop()
        proxy.slow(0)
        expect_every_acknowledged_event_in_sqs(f"kill -9 x3 (seed {SEED})", url, acked, kills, edge)
    finally:
        publisher.close()
        proxy.cut()


def test_every_acknowledged_event_reaches_sqs_although_the_edge_service_is_killed_while_events_go_to_the_retry_log(
    edge_factory, mosquitto, aws
):
    url = aws.provisioned.queues["events"]
    rng = random.Random(SEED + 1)
    proxy = TcpProxy(aws.port)  # closed: SQS is cut, every event goes to the retry log
    publisher = ContinuousPublisher(
        mosquitto.port, rate=500
    )  # the retry log takes far more: a backlog would only slow the test
    settings = {"sqs_endpoint": proxy.url, "EDGE_PROBE_INTERVAL_S": "0.5", "EDGE_SENDER_PROCESSES": "1"}
    try:
        edge = edge_factory(**settings)
        publisher.start()
        kills = []
        for _ in range(3):
            kills.append(fault_with_events_inside(edge.admin_url, edge.kill9, rng, minimum=10))
            edge = edge_factory(**settings)
        assert all(k.delivered == 0 for k in kills), (
            "SQS was cut: what was inside the service was on its way to the retry log"
        )
        publisher.wait_for(len(publisher.acked) + 200)  # the last service takes traffic too
        acked = publisher.stop()
        admin = edge.admin()
        assert admin.status()["jobs_pending"] > 0
        proxy.open()
        wait_until(lambda: admin.status()["jobs_pending"] == 0, 120, interval=0.5, message="the retry log drained")
        dead = admin.status()[
            "dlq_size"
        ]  # a job retried at each start-up while SQS was cut may have used its 3 attempts
        if dead:
            assert admin.dlq_replay() == dead
        expect_every_acknowledged_event_in_sqs(
            f"kill -9 x3 while spilling (seed {SEED + 1}), {dead} replayed from the DLQ", url, acked, kills, edge
        )
    finally:
        publisher.close()
        proxy.cut()


def test_every_acknowledged_event_reaches_sqs_although_mosquitto_restarts_with_events_inside_the_service(
    edge_factory, mosquitto, aws
):
    url = aws.provisioned.queues["events"]
    rng = random.Random(SEED + 2)
    proxy = TcpProxy(aws.port).open().slow(SQS_LATENCY_S)
    publisher = ContinuousPublisher(mosquitto.port)
    try:
        edge = edge_factory(sqs_endpoint=proxy.url)
        admin = edge.admin()
        publisher.start()
        restart = fault_with_events_inside(edge.admin_url, mosquitto.restart, rng, minimum=100)
        wait_until(
            lambda: admin.status()["mqtt_connections"] >= 2 and admin.status()["mqtt_connected"],
            60,
            message="the service to reconnect",
        )
        publisher.wait_for(len(publisher.acked) + 200)  # and publishers too
        acked = publisher.stop()
        proxy.slow(0)
        expect_every_acknowledged_event_in_sqs(
            f"Mosquitto restart (seed {SEED + 2}), publisher reconnects {publisher.reconnects}",
            url,
            acked,
            [restart],
            edge,
        )
    finally:
        publisher.close()
        proxy.cut()


def test_every_acknowledged_event_reaches_sqs_although_a_sender_process_is_killed_holding_a_chunk(
    edge_factory, mosquitto, aws
):
    """The SQS senders are processes of their own: killing one mid-chunk loses nothing; the pool is rebuilt."""
    url = aws.provisioned.queues["events"]
    rng = random.Random(SEED + 3)
    proxy = TcpProxy(aws.port).open().slow(SQS_LATENCY_S)
    publisher = ContinuousPublisher(mosquitto.port)
    try:
        edge = edge_factory(sqs_endpoint=proxy.url, EDGE_SENDER_PROCESSES="2")
        admin = edge.admin()
        before = admin.status()["sender_pids"]
        assert len(before) == 2
        publisher.start()
        kill = fault_with_events_inside(edge.admin_url, lambda: os.kill(before[0], signal.SIGKILL), rng, minimum=100)
        after = wait_until(
            lambda: (pids := admin.status()["sender_pids"]) != before and pids, 60, message="a new sender pool"
        )
        assert len(after) == 2 and not set(after) & set(before)
        publisher.wait_for(len(publisher.acked) + 200)
        acked = publisher.stop()
        proxy.slow(0)
        expect_every_acknowledged_event_in_sqs(f"sender process kill -9 (seed {SEED + 3})", url, acked, [kill], edge)
        assert "a sender process died" in edge.log()
    finally:
        publisher.close()
        proxy.cut()


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
        status = wait_until(
            lambda: (s := admin.status())["jobs_pending"] >= 1000 and s, 30, message="events spilled to the retry log"
        )
        assert status["sqs_reachable"] is False
        threading.Event().wait(max(0.0, 30 - (time.monotonic() - cut_at)))  # the outage itself lasts 30 s
        proxy.open()
        collector = Collector(url)
        wait_until(lambda: collector.has_all(ids), 60, interval=0.5, message="every id in SQS after the cut")
        collector.report("SQS cut 30 s", ids)
        wait_until(lambda: admin.status()["jobs_pending"] == 0, 30, message="the retry log drained")
    finally:
        proxy.cut()


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
