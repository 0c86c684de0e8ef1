"""The intake's MQTT client (paho with buffered reads and batched acks) against a real broker: every
message arrives intact and in order whatever its size, and `ack_many` acknowledges exactly the ids it
is given — the others are redelivered on the next connection of the persistent session."""

from __future__ import annotations

import queue
import threading

from paho.mqtt.enums import CallbackAPIVersion

from edge_bridge.mqtt_client import READ_BUFFER_BYTES, Client
from tests.conftest import publish, wait_until

TOPIC = "sites/site-1/events/test/sample"


def connect(port: int, client_id: str, manual_ack: bool = False, clean_session: bool = True):
    received: queue.Queue = queue.Queue()
    subscribed = threading.Event()
    client = Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session, manual_ack=manual_ack
    )
    client.max_inflight_messages_set(1000)
    client.on_connect = lambda c, *a: c.subscribe("sites/+/events/#", qos=1)
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = lambda c, u, m: received.put((m.mid, m.payload))
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert subscribed.wait(10), "no SUBACK"
    return client, received


def take(received: queue.Queue, count: int, timeout: float = 30) -> list[tuple[int, bytes]]:
    return [received.get(timeout=timeout) for _ in range(count)]


def test_messages_of_every_size_arrive_intact_and_in_order(mosquitto):
    sizes = [
        0,
        1,
        2,
        127,
        128,
        16_383,
        16_384,
        READ_BUFFER_BYTES - 5,
        READ_BUFFER_BYTES,
        READ_BUFFER_BYTES + 1,
        300_000,
    ]
    payloads = [bytes([i % 251]) * size + f"#{i}".encode() for i, size in enumerate(sizes * 3)]
    payloads += [f"small-{i}".encode() for i in range(3000)]  # many to a buffer: packets split across refills
    client, received = connect(mosquitto.port, "buffered-reader")
    try:
        publish(mosquitto.port, TOPIC, payloads)
        assert [payload for _, payload in take(received, len(payloads))] == payloads
    finally:
        client.disconnect()
        client.loop_stop()


def test_ack_many_acknowledges_exactly_the_ids_it_is_given(mosquitto):
    client, received = connect(mosquitto.port, "batch-acker", manual_ack=True, clean_session=False)
    payloads = [f"event-{i}".encode() for i in range(600)]
    try:
        publish(mosquitto.port, TOPIC, payloads)
        messages = take(received, len(payloads))
        acked = {payload for _, payload in messages[::2]}
        client.ack_many([mid for mid, _ in messages[::2]])
        # The broker handles a connection's packets in order: once it has acknowledged this publish,
        # it has taken the PUBACKs written before it.
        client.publish("sites/site-1/sync", b"sync", qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()

    client, received = connect(mosquitto.port, "batch-acker", manual_ack=True, clean_session=False)
    try:
        publish(mosquitto.port, TOPIC, [b"marker"])
        redelivered = []
        wait_until(
            lambda: redelivered.append(received.get(timeout=10)[1]) or redelivered[-1] == b"marker",
            30,
            interval=0,
            message="the marker",
        )
        assert set(redelivered[:-1]) == set(payloads) - acked  # the unacked half again, none of the acked half
        assert len(redelivered) - 1 == len(payloads) // 2
    finally:
        client.disconnect()
        client.loop_stop()


def test_ack_many_sends_no_puback_for_a_qos_0_message_so_the_broker_keeps_the_connection(mosquitto):
    client, received = connect(mosquitto.port, "qos0-acker", manual_ack=True, clean_session=False)
    disconnects = []
    client.on_disconnect = lambda *a: disconnects.append(a)
    try:
        sender, _ = connect(mosquitto.port, "qos0-publisher")
        infos = [sender.publish(TOPIC, f"event-{i}".encode(), qos=0 if i == 1 else 1) for i in range(3)]
        for info in infos:
            info.wait_for_publish(10)
        sender.disconnect()
        sender.loop_stop()
        messages = take(received, 3)
        assert sorted(mid == 0 for mid, _ in messages) == [False, False, True]  # QoS 0 arrives with id 0
        client.ack_many([mid for mid, _ in messages])
        # Mosquitto 2 drops a client that PUBACKs id 0; once it has acknowledged this publish, it has read the acks.
        client.publish("sites/site-1/sync", b"sync", qos=1).wait_for_publish(10)
        assert client.is_connected() and disconnects == []
    finally:
        client.disconnect()
        client.loop_stop()


def test_the_broker_refuses_a_publish_over_its_message_size_limit_and_passes_one_at_the_envelope_bound(mosquitto):
    from devstack.processes import MESSAGE_SIZE_LIMIT
    from edge_bridge.envelope import MAX_ENVELOPE_BYTES

    assert MAX_ENVELOPE_BYTES < MESSAGE_SIZE_LIMIT <= 2 * MAX_ENVELOPE_BYTES
    client, received = connect(mosquitto.port, "size-limited")
    try:
        # Mosquitto may drop the connection of a 3.1.1 client that sends too much, so the oversized
        # publish goes on a connection of its own, and the broker must have dealt with it before the rest.
        import paho.mqtt.client as mqtt

        oversized = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="oversized-publisher")
        gone = threading.Event()
        oversized.on_disconnect = lambda *args: gone.set()
        oversized.connect("127.0.0.1", mosquitto.port)
        oversized.loop_start()
        try:
            info = oversized.publish(TOPIC, b"o" * (MESSAGE_SIZE_LIMIT + 1), qos=1)
            wait_until(
                lambda: gone.is_set() or info.is_published(), 30, message="the broker to answer the oversized publish"
            )
        finally:
            oversized.disconnect()
            oversized.loop_stop()
        at_bound = b"a" * MAX_ENVELOPE_BYTES
        publish(mosquitto.port, TOPIC, [at_bound, b"marker"])
        assert [payload for _, payload in take(received, 2)] == [at_bound, b"marker"]
    finally:
        client.disconnect()
        client.loop_stop()
