"""The edge's side of the alarm path, with a real edge service, Mosquitto and the emulator.

An event the catalog marks high is also sent to the express queue (`EDGE_EXPRESS_QUEUE_URL`), as an
extra, best-effort copy: it still goes to the events queue and is acknowledged only once it is there
or in the retry log. Other priorities never take the express lane. After an outage the retry log
replays the alarms before the backlog, and they take the express lane too.
"""

from __future__ import annotations

import json
from datetime import timedelta

from devstack.tcp_proxy import TcpProxy
from pipeline.stack import aws_client
from tests.conftest import publish, receive_all, sample_envelope, wait_until
from tests.test_edge_faults import T0, Collector
from tests.test_edge_service import metric_samples


def express_queue(name: str = "events-express") -> str:
    return aws_client("sqs").create_queue(QueueName=name)["QueueUrl"]


def test_a_high_priority_event_reaches_the_express_queue_and_the_events_queue(edge_factory, mosquitto, aws):
    express = express_queue()
    edge = edge_factory(EDGE_EXPRESS_QUEUE_URL=express)
    panic = sample_envelope(event_type="panic_button", device_id="button-1")
    publish(mosquitto.port, panic.topic, [panic.to_json()])
    [copy] = wait_until(lambda: receive_all(express, timeout=0.3), 30, message="the panic in the express queue")
    assert copy == json.loads(panic.to_json())
    collector = Collector(aws.provisioned.queues["events"])
    wait_until(lambda: collector.has_all({panic.event_id}), 30, message="the panic in the events queue")
    samples = metric_samples(edge.admin_url)
    assert (samples["edge_express_sent_total"], samples["edge_express_failed_total"]) == (1, 0)


def test_a_medium_event_does_not_take_the_express_lane(edge_factory, mosquitto, aws):
    express = express_queue()
    edge = edge_factory(EDGE_EXPRESS_QUEUE_URL=express)
    door = sample_envelope(event_type="door_access")
    panic = sample_envelope(event_type="panic_button", device_id="button-1")
    publish(mosquitto.port, door.topic, [door.to_json()])
    publish(mosquitto.port, panic.topic, [panic.to_json()])  # after the door: once it is there, the door was decided
    collector = Collector(aws.provisioned.queues["events"])
    wait_until(
        lambda: collector.has_all({door.event_id, panic.event_id}), 30, message="both events in the events queue"
    )
    wait_until(
        lambda: metric_samples(edge.admin_url)["edge_express_sent_total"] == 1,
        10,
        message="the panic's express send counted",
    )
    assert [body["event_id"] for body in receive_all(express, timeout=0.5)] == [panic.event_id]


def test_without_an_express_queue_a_high_priority_event_goes_to_the_events_queue_alone(edge_factory, mosquitto, aws):
    express = express_queue()
    edge = edge_factory()
    panic = sample_envelope(event_type="panic_button", device_id="button-1")
    publish(mosquitto.port, panic.topic, [panic.to_json()])
    collector = Collector(aws.provisioned.queues["events"])
    wait_until(lambda: collector.has_all({panic.event_id}), 30, message="the panic in the events queue")
    assert receive_all(express, timeout=0.5) == []
    assert metric_samples(edge.admin_url)["edge_express_sent_total"] == 0


def test_a_failed_express_send_is_counted_and_the_event_still_reaches_the_events_queue_without_the_retry_log(
    edge_factory, mosquitto, aws
):
    missing = aws.provisioned.queues["events"].rsplit("/", 1)[0] + "/no-such-express-queue"
    edge = edge_factory(EDGE_EXPRESS_QUEUE_URL=missing)
    alarms = [sample_envelope(event_type="fire_alarm", device_id=f"smoke-{i}") for i in range(3)]
    publish(mosquitto.port, alarms[0].topic, [a.to_json() for a in alarms])
    collector = Collector(aws.provisioned.queues["events"])
    wait_until(lambda: collector.has_all({a.event_id for a in alarms}), 30, message="the alarms in the events queue")
    samples = wait_until(
        lambda: (s := metric_samples(edge.admin_url))["edge_express_failed_total"] == 3 and s,
        10,
        message="the failed express sends counted",
    )
    assert (samples["edge_express_sent_total"], samples["edge_events_delivered_total{path=realtime}"]) == (0, 3)
    status = edge.admin().status()
    assert (status["jobs_pending"], status["sqs_reachable"]) == (0, True)


def test_after_an_outage_the_alarm_is_replayed_before_the_backlog_and_takes_the_express_lane(
    edge_factory, mosquitto, aws
):
    express = express_queue()
    proxy = TcpProxy(aws.port)  # closed: SQS is cut
    edge = edge_factory(sqs_endpoint=proxy.url, EDGE_EXPRESS_QUEUE_URL=express)
    backlog = [
        sample_envelope(event_type="door_access", device_id=f"door-{i}", timestamp=T0 + timedelta(milliseconds=i))
        for i in range(1500)
    ]
    alarm = sample_envelope(event_type="intrusion_alert", device_id="pir-1", timestamp=T0 + timedelta(seconds=5))
    publish(mosquitto.port, backlog[0].topic, [e.to_json() for e in backlog])
    publish(mosquitto.port, alarm.topic, [alarm.to_json()])  # the newest event of the outage
    admin = edge.admin()
    wait_until(
        lambda: admin.status()["jobs_pending"] == len(backlog) + 1, 60, message="the outage's events in the retry log"
    )
    try:
        proxy.open()
        [copy] = wait_until(lambda: receive_all(express, timeout=0.3), 30, message="the alarm in the express queue")
        assert copy["event_id"] == alarm.event_id
        wait_until(lambda: admin.status()["jobs_pending"] == 0, 60, message="the backlog replayed")
    finally:
        proxy.cut()
    # The emulator hands messages out in the order they arrived: the alarm went out in the first round.
    order = [body["event_id"] for body in receive_all(aws.provisioned.queues["events"], timeout=1.0)]
    assert sorted(order) == sorted(e.event_id for e in [*backlog, alarm])
    assert order.index(alarm.event_id) < 500, (
        f"the alarm was replayed as number {order.index(alarm.event_id)} of {len(order)}"
    )
