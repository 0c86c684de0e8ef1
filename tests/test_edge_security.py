"""Mosquitto with per-site credentials and an ACL: a site publishes only under its own `sites/<site_id>/…`."""

from __future__ import annotations

import secrets
import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devstack.processes import Mosquitto, MqttUser
from tests.conftest import sample_envelope, wait_until


def site_users() -> list[MqttUser]:
    return [
        MqttUser("site-a", secrets.token_urlsafe(16), write=["sites/site-a/#"]),
        MqttUser("site-b", secrets.token_urlsafe(16), write=["sites/site-b/#"]),
        MqttUser("edge", secrets.token_urlsafe(16), read=["sites/+/events/#"]),
    ]


@pytest.fixture
def secured_broker(tmp_path):
    users = {u.username: u for u in site_users()}
    broker = Mosquitto(tmp_path / "mosquitto", users=list(users.values())).start()
    broker.users_by_name = users
    yield broker
    broker.stop()


def handled(info: mqtt.MQTTMessageInfo) -> bool:
    """Acknowledged, or failed because the broker dropped the connection (paho raises for the latter)."""
    try:
        return info.is_published()
    except RuntimeError:
        return True


def connect(port: int, user: MqttUser | None, client_id: str) -> tuple[mqtt.Client, object]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    if user:
        client.username_pw_set(user.username, user.password)
    outcome = {}
    connected = threading.Event()

    def on_connect(c, userdata, flags, reason_code, properties):
        outcome["rc"] = reason_code
        connected.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert connected.wait(10), "no CONNACK"
    return client, outcome["rc"]


def test_site_a_cannot_publish_under_site_b(secured_broker):
    users = secured_broker.users_by_name
    received: list[str] = []
    subscribed = threading.Event()
    edge, rc = connect(secured_broker.port, users["edge"], "edge-sub")
    assert not rc.is_failure
    edge.on_message = lambda c, u, m: received.append(m.topic)
    edge.on_subscribe = lambda *a: subscribed.set()
    edge.subscribe("sites/+/events/#", qos=1)
    assert subscribed.wait(10)
    try:
        spoofed = sample_envelope(site_id="site-b")
        own = sample_envelope(site_id="site-a")
        site_a, rc_a = connect(secured_broker.port, users["site-a"], "site-a-spoof")
        assert not rc_a.is_failure, rc_a
        attempt = site_a.publish(spoofed.topic, spoofed.to_json(), qos=1)
        # Mosquitto drops a denied QoS 1 publish and, for an MQTT 3.1.1 client, the connection with it.
        wait_until(
            lambda: not site_a.is_connected() or handled(attempt),
            10,
            message="the broker to handle the spoofed publish",
        )
        site_a.disconnect()
        site_a.loop_stop()
        honest, _ = connect(secured_broker.port, users["site-a"], "site-a-pub")
        honest.publish(own.topic, own.to_json(), qos=1).wait_for_publish(10)
        # The spoofed publish was handled first: had it been forwarded, it would be ahead of this one.
        wait_until(lambda: own.topic in received, 10, message="site A's own event at the subscriber")
        assert received == [own.topic]
        honest.disconnect()
        honest.loop_stop()
    finally:
        edge.disconnect()
        edge.loop_stop()


def test_anonymous_and_wrong_password_connections_are_refused(secured_broker):
    _, anonymous = connect(secured_broker.port, None, "anon")
    _, wrong = connect(secured_broker.port, MqttUser("site-a", "not-the-password"), "wrong")
    assert anonymous.is_failure and wrong.is_failure


def test_edge_service_logs_in_with_credentials_from_the_environment_and_delivers(secured_broker, aws, tmp_path):
    import os

    from devstack.processes import aws_env, free_port
    from tests.conftest import EdgeProcess, receive_all

    users = secured_broker.users_by_name
    env = {**os.environ, **aws_env(aws.endpoint_url)}
    env.update(
        EDGE_MQTT_PORT=str(secured_broker.port),
        EDGE_MQTT_USERNAME="edge",
        EDGE_MQTT_PASSWORD=users["edge"].password,
        EDGE_STATE_DIR=str(tmp_path / "state"),
        EDGE_EVENTS_QUEUE_URL=aws.provisioned.queues["events"],
        EDGE_ADMIN_PORT=str(free_port()),
    )
    edge = EdgeProcess(tmp_path / "edge", env).start().wait_subscribed()
    try:
        own = sample_envelope(site_id="site-a")
        client, _ = connect(secured_broker.port, users["site-a"], "site-a-pub")
        client.publish(own.topic, own.to_json(), qos=1).wait_for_publish(10)
        bodies = wait_until(
            lambda: receive_all(aws.provisioned.queues["events"], timeout=0.5), 30, message="the event in SQS"
        )
        assert [b["event_id"] for b in bodies] == [own.event_id]
        client.disconnect()
        client.loop_stop()
    finally:
        edge.stop()
