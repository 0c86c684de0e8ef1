"""Persist before acknowledging: while SQS is unreachable the broker keeps the message for the bridge."""

from devstack.tcp_proxy import TcpProxy
from tests.conftest import publish, receive_all, sample_envelope, wait_until


def test_event_is_neither_acked_nor_lost_while_sqs_is_unreachable(edge_factory, mosquitto, aws):
    proxy = TcpProxy(aws.port).open()
    try:
        edge = edge_factory(sqs_endpoint=proxy.url)
        proxy.cut()  # SQS unreachable from the edge from here on
        env = sample_envelope()
        publish(mosquitto.port, "sites/site-123/events/ajax/door_access", [env.to_json()])
        wait_until(lambda: "SQS refused 1 events" in edge.log(), 30, message="the edge to try SQS and fail")
        events_url = aws.provisioned.queues["events"]
        assert receive_all(events_url, timeout=0.5, delete=False) == []

        # If the edge had acked, the broker would have dropped the message: kill it without warning,
        # bring SQS back and start a new edge process on the same persistent session.
        edge.kill9()
        proxy.open()
        edge_factory(sqs_endpoint=proxy.url)
        bodies = wait_until(lambda: receive_all(events_url, timeout=0.5), 30, message="the event in SQS after recovery")
        assert [b["event_id"] for b in bodies] == [env.event_id]
    finally:
        proxy.cut()


def test_held_event_is_sent_by_the_live_bridge_once_sqs_is_back(edge_factory, mosquitto, aws):
    proxy = TcpProxy(aws.port).open()
    try:
        edge = edge_factory(sqs_endpoint=proxy.url)
        proxy.cut()
        env = sample_envelope()
        publish(mosquitto.port, "sites/site-123/events/ajax/door_access", [env.to_json()])
        wait_until(lambda: "SQS refused" in edge.log(), 30, message="the edge to try SQS and fail")
        proxy.open()
        events_url = aws.provisioned.queues["events"]
        bodies = wait_until(lambda: receive_all(events_url, timeout=0.5), 30, message="the event in SQS")
        assert [b["event_id"] for b in bodies] == [env.event_id]
    finally:
        proxy.cut()
