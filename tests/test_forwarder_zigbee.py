"""The ZigBee ingress against real Mosquittos: zigbee2mqtt's topics become envelopes at the site broker, typed
by what each device reports, and a message is acked to zigbee2mqtt's broker only once the site broker has it."""

from __future__ import annotations

import json

import pytest

from devstack.processes import Mosquitto
from edge_bridge.forwarder import Forwarder
from edge_bridge.ingress.zigbee import ZigbeeIngress
from tests.conftest import wait_until
from tests.helpers.forwarder import SiteSubscriber, Zigbee2Mqtt

SITE = "site-z"


@pytest.fixture
def zigbee_broker(tmp_path):
    broker = Mosquitto(tmp_path / "zigbee-mosquitto").start()
    yield broker
    broker.stop()


def quarantined(forwarder: Forwarder) -> list[dict]:
    return [json.loads(line) for line in forwarder.quarantine.path.read_text().splitlines()]


@pytest.fixture
def site(mosquitto, tmp_path):
    """One broker for zigbee2mqtt and the site, under a base topic of this site's own."""
    forwarder = Forwarder.connect(SITE, "127.0.0.1", mosquitto.port, tmp_path / "fwd")
    subscriber = SiteSubscriber(mosquitto.port)
    ingress = ZigbeeIngress(forwarder, "127.0.0.1", mosquitto.port, base_topic="z2m/site-z", publish_timeout=2).start()
    z2m = Zigbee2Mqtt(mosquitto.port, base="z2m/site-z")
    yield ingress, forwarder, subscriber, z2m
    z2m.close()
    ingress.stop()
    subscriber.close()
    forwarder.close()


DEVICE_REPORTS = [
    ("sos_button", {"action": "emergency", "battery": 100, "linkquality": 90}, "panic_button"),
    ("hall_remote", {"action": "single", "battery": 80, "linkquality": 90}, "button_press"),
    ("coffee_plug", {"state": "ON", "power": 1250.5, "energy": 3.2, "linkquality": 120}, "switch_state"),
    ("yard_siren", {"alarm": True, "battery": 90, "linkquality": 70}, "siren"),
    ("front_door", {"contact": False, "battery": 91, "last_seen": 1705314600123}, "contact"),
    ("kitchen_leak", {"water_leak": True, "battery": 60, "last_seen": "2024-01-15T11:30:00.000+0100"}, "water_leak"),
]


def test_zigbee2mqtt_device_topics_reach_the_site_broker_typed_by_what_each_device_reports(site):
    ingress, forwarder, subscriber, z2m = site
    for name, state, _ in DEVICE_REPORTS:
        assert z2m.publish(name, state)
    assert z2m.publish("front_door/availability", b"offline")  # the legacy plain-text payload
    assert z2m.publish("front_door/availability", {"state": "online"})
    wait_until(
        lambda: len(subscriber.snapshot()) == len(DEVICE_REPORTS) + 2,
        10,
        message="every device report at the site broker",
    )
    got = [(m["device_id"], m["event_type"]) for m in subscriber.snapshot()]
    assert got == [(f"zigbee-{name}", kind) for name, _, kind in DEVICE_REPORTS] + [
        ("zigbee-front_door", "device_offline"),
        ("zigbee-front_door", "device_online"),
    ]
    by_device = {m["device_id"]: m for m in subscriber.snapshot()[: len(DEVICE_REPORTS)]}
    assert by_device["zigbee-coffee_plug"]["payload"]["power"] == 1250.5
    assert by_device["zigbee-front_door"]["timestamp"] == "2024-01-15T10:30:00.123000Z"
    assert by_device["zigbee-kitchen_leak"]["timestamp"] == "2024-01-15T10:30:00Z"
    assert subscriber.topics[0] == f"sites/{SITE}/events/zigbee/panic_button"


def test_bridge_topics_and_commands_are_acked_but_neither_forwarded_nor_quarantined(site):
    ingress, forwarder, subscriber, z2m = site
    assert z2m.publish("bridge/state", b"offline")  # legacy payload
    wait_until(lambda: ingress.bridge_state == "offline", 10, message="the bridge's state")
    assert z2m.publish("bridge/state", {"state": "online"}, retain=True)
    assert z2m.publish("bridge/devices", b'[{"friendly_name": "front_door"}]')
    assert z2m.publish("bridge/logging", {"level": "info", "message": "MQTT publish"})
    assert z2m.publish("coffee_plug/set", {"state": "OFF"})
    assert z2m.publish("coffee_plug", {"state": "OFF", "power": 0})  # the one device event among them
    wait_until(lambda: subscriber.snapshot(), 10, message="the plug's state at the site broker")
    wait_until(
        lambda: ingress.counts["ignored_bridge"] == 4 and ingress.counts["ignored_command"] == 1,
        10,
        message="every bridge and command message passed by",
    )
    assert [m["event_type"] for m in subscriber.snapshot()] == ["switch_state"]
    assert ingress.bridge_state == "online"
    assert not forwarder.quarantine.path.read_text()


def test_a_bad_zigbee_message_is_quarantined_alone_and_the_ones_after_it_arrive(site):
    ingress, forwarder, subscriber, z2m = site
    assert z2m.publish("door_1", {"contact": True, "n": 1})
    assert z2m.publish("door_1", b"\xff\xfe not json")
    assert z2m.publish("door_1", {"mystery": 1})
    assert z2m.publish("door_1", {"contact": False, "n": 2})
    wait_until(lambda: len(subscriber.snapshot()) == 2, 10, message="the good messages at the site broker")
    assert [m["payload"]["n"] for m in subscriber.snapshot()] == [1, 2]
    assert [(e["topic"], e["reason"]) for e in quarantined(forwarder)] == [
        ("zigbee2mqtt/door_1", "not_utf8"),
        ("zigbee2mqtt/door_1", "unknown_event_type"),
    ]
    wait_until(
        lambda: ingress.counts["quarantined"] == 2 and ingress.counts["forwarded"] == 2, 10, message="all four answered"
    )


def test_qos0_messages_are_forwarded_and_never_acked_so_the_session_stays_up(site):
    ingress, forwarder, subscriber, z2m = site
    for n in range(20):
        z2m.publish("hall_motion", {"occupancy": n % 2 == 0, "n": n}, qos=0)
    wait_until(lambda: len(subscriber.snapshot()) == 20, 10, message="every QoS 0 state at the site broker")
    assert z2m.publish("hall_motion", {"occupancy": True, "n": 20})
    wait_until(lambda: len(subscriber.snapshot()) == 21, 10, message="a QoS 1 message after them")
    assert ingress.counts["connections"] == 1, "the broker dropped the session (a PUBACK for a QoS 0 message?)"


def test_a_zigbee_message_is_acked_only_once_the_site_broker_acknowledged_its_envelope(
    mosquitto, zigbee_broker, tmp_path
):
    """The site broker is down: the message is not acked, so after the ingress stops (as in a crash) the
    broker hands it over again to the next one, which forwards it once the site broker is back."""
    subscriber = SiteSubscriber(mosquitto.port)
    z2m = Zigbee2Mqtt(zigbee_broker.port)
    forwarder = Forwarder.connect(SITE, "127.0.0.1", mosquitto.port, tmp_path / "fwd")
    ingress = ZigbeeIngress(forwarder, "127.0.0.1", zigbee_broker.port, publish_timeout=1).start()
    try:
        assert z2m.publish("front_door", {"contact": True, "n": 1})
        wait_until(lambda: subscriber.snapshot(), 10, message="the first message at the site broker")
        mosquitto.stop()
        assert z2m.publish("front_door", {"contact": False, "n": 2}), "zigbee2mqtt's broker took it"
        wait_until(lambda: ingress.counts["failed"] >= 2, 15, message="the site broker's refusal seen twice")
        ingress.stop()  # unacked: the zigbee broker keeps it for this session
        forwarder.close(timeout=0)
        mosquitto.start()
        forwarder = Forwarder.connect(SITE, "127.0.0.1", mosquitto.port, tmp_path / "fwd")
        ingress = ZigbeeIngress(forwarder, "127.0.0.1", zigbee_broker.port, publish_timeout=1).start()
        wait_until(
            lambda: len(subscriber.snapshot()) == 2, 20, message="the unacked message, handed over again and forwarded"
        )
        assert [m["payload"]["n"] for m in subscriber.snapshot()] == [1, 2]
    finally:
        ingress.stop()
        forwarder.close(timeout=0)
        z2m.close()
        subscriber.close()
