"""The forwarder against a real broker: whatever an adapter raises, and an envelope over the contract's
size bound, is that one message's quarantine entry; the messages after it are published."""

from __future__ import annotations

import json
import queue
import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_bridge import adapters
from edge_bridge.envelope import MAX_ENVELOPE_BYTES
from edge_bridge.forwarder import Forwarder
from edge_bridge.simulator import Simulator

SITE = "site-a"


@pytest.fixture
def subscriber(mosquitto):
    """What the broker hands a subscriber of every site's events (topic, envelope)."""
    received: queue.Queue = queue.Queue()
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="forwarder-test-subscriber")
    client.on_connect = lambda c, *a: c.subscribe("sites/+/events/#", qos=1)
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = lambda c, u, m: received.put(json.loads(m.payload))
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    assert subscribed.wait(10), "no SUBACK"
    yield received
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def forwarder(mosquitto, tmp_path):
    forwarder = Forwarder.connect(SITE, "127.0.0.1", mosquitto.port, tmp_path)
    yield forwarder
    forwarder.close()


def quarantined(forwarder: Forwarder) -> list[dict]:
    return [json.loads(line) for line in forwarder.quarantine.path.read_text().splitlines()]


def forward_around(forwarder: Forwarder, bad: tuple[str, str, bytes], count: int = 20) -> list:
    """Simulated device messages with `bad` (family, topic, raw) in the middle; the envelopes published."""
    messages = list(Simulator([SITE], malformed=0.0).messages(count))
    outcomes = [forwarder.forward(m.family, m.topic, m.raw, m.received_at) for m in messages[: count // 2]]
    assert forwarder.forward(*bad) is None
    outcomes += [forwarder.forward(m.family, m.topic, m.raw, m.received_at) for m in messages[count // 2 :]]
    assert all(outcomes)
    return outcomes


def take(received: queue.Queue, count: int) -> list[dict]:
    return [received.get(timeout=30) for _ in range(count)]


def test_an_adapter_that_raises_quarantines_that_message_as_adapter_error_and_the_next_ones_are_published(
    forwarder, subscriber, monkeypatch
):
    real_zigbee = adapters.ADAPTERS["zigbee"]

    def zigbee(site_id, topic, raw, received_at=None):
        if b"poison" in raw:
            raise IndexError("unforeseen")
        return real_zigbee(site_id, topic, raw, received_at)

    monkeypatch.setitem(adapters.ADAPTERS, "zigbee", zigbee)
    published = forward_around(forwarder, ("zigbee", "zigbee2mqtt/door-1", b'{"contact": true, "note": "poison"}'))
    assert [e["event_id"] for e in take(subscriber, len(published))] == [e.event_id for e in published]
    [entry] = quarantined(forwarder)
    assert (entry["reason"], entry["topic"]) == ("adapter_error", "zigbee2mqtt/door-1")
    assert entry["detail"] == "adapter zigbee: IndexError: unforeseen"
    assert forwarder.rejected == {"adapter_error": 1}


def test_an_envelope_over_the_size_bound_is_quarantined_as_too_large_and_the_next_ones_are_published(
    forwarder, subscriber
):
    # Within the adapters' own 4 MiB input bound, but the envelope around it is larger.
    raw = json.dumps({"contact": True, "blob": "x" * (MAX_ENVELOPE_BYTES - 100)}).encode()
    published = forward_around(forwarder, ("zigbee", "zigbee2mqtt/door-1", raw))
    assert [e["event_id"] for e in take(subscriber, len(published))] == [e.event_id for e in published]
    [entry] = quarantined(forwarder)
    assert entry["reason"] == "too_large" and entry["payload_bytes"] == len(raw)
    assert entry["detail"].startswith("the envelope is ") and entry["detail"].endswith(
        f"bytes (limit {MAX_ENVELOPE_BYTES})"
    )
