"""Mosquitto as shipped (`devstack.processes.Mosquitto` with users): a client's id is its username, so no
site credential can take the edge service's persistent session over, while the edge service and the
forwarders keep delivering with their own credentials."""

from __future__ import annotations

import os
import secrets
import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devstack.processes import Mosquitto, MqttUser, aws_env, free_port
from edge_bridge.cli import AdminClient
from edge_bridge.forwarder import Forwarder
from edge_bridge.simulator import Simulator
from tests.conftest import EdgeProcess, wait_until
from tests.test_edge_faults import Collector

EDGE_CLIENT_ID = "edge-bridge-site"


@pytest.fixture
def users() -> dict[str, MqttUser]:
    return {
        "site-a": MqttUser("site-a", secrets.token_urlsafe(16), write=["sites/site-a/#"]),
        "edge": MqttUser("edge", secrets.token_urlsafe(16), read=["sites/+/events/#"]),
    }


@pytest.fixture
def broker(tmp_path, users):
    broker = Mosquitto(tmp_path / "mosquitto", users=list(users.values())).start()
    yield broker
    broker.stop()


@pytest.fixture
def edge(tmp_path, broker, users, aws):
    """The real edge service, logged in as `edge` under its configured client id."""
    env = {**os.environ, **aws_env(aws.endpoint_url)}
    env.update(
        EDGE_MQTT_PORT=str(broker.port),
        EDGE_MQTT_USERNAME="edge",
        EDGE_MQTT_PASSWORD=users["edge"].password,
        EDGE_CLIENT_ID=EDGE_CLIENT_ID,
        EDGE_STATE_DIR=str(tmp_path / "state"),
        EDGE_EVENTS_QUEUE_URL=aws.provisioned.queues["events"],
        EDGE_ADMIN_PORT=str(free_port()),
        EDGE_SENDER_PROCESSES="0",
    )
    process = EdgeProcess(tmp_path / "edge", env).start().wait_subscribed()
    yield process
    process.stop()


def forward_some(broker, users, tmp_path, count: int = 20) -> list:
    """Simulated site-a devices through a forwarder logged in as site-a; the envelopes it published."""
    forwarder = Forwarder.connect(
        "site-a", "127.0.0.1", broker.port, tmp_path / "fwd", password=users["site-a"].password
    )
    try:
        sim = Simulator(["site-a"], malformed=0.0)
        published = [
            e for m in sim.messages(count) if (e := forwarder.forward(m.family, m.topic, m.raw, m.received_at))
        ]
        forwarder.client.publish("sites/site-a/sync", b"", qos=1).wait_for_publish(30)  # everything before it is acked
    finally:
        forwarder.close()
    return published


def assert_never_reconnected(edge: EdgeProcess) -> None:
    assert AdminClient(edge.admin_url).status()["mqtt_connections"] == 1
    assert "MQTT disconnected" not in edge.log()


def test_the_edge_service_and_a_forwarder_deliver_with_their_credentials(edge, broker, users, aws, tmp_path):
    published = forward_some(broker, users, tmp_path)
    collector = Collector(aws.provisioned.queues["events"])
    wait_until(
        lambda: collector.has_all({e.event_id for e in published}),
        30,
        interval=0.3,
        message="the forwarded events in SQS",
    )
    assert_never_reconnected(edge)


def test_a_site_credential_connecting_with_the_edge_services_client_id_cannot_take_its_session_over(
    edge, broker, users, aws, tmp_path
):
    intruder = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=EDGE_CLIENT_ID, clean_session=False)
    intruder.username_pw_set("site-a", users["site-a"].password)
    connacks = []
    answered = threading.Event()
    intruder.on_connect = lambda c, u, flags, reason_code, p: (connacks.append(reason_code), answered.set())
    intruder.connect("127.0.0.1", broker.port)
    intruder.loop_start()
    try:
        assert answered.wait(10), "no CONNACK"
        assert not connacks[0].is_failure  # a valid credential: it is let in, under its own name
    finally:
        intruder.disconnect()
        intruder.loop_stop()
    # Had the broker handed it the edge's session, it would have dropped the edge's connection before
    # that CONNACK, and these events could only reach SQS over a new one.
    published = forward_some(broker, users, tmp_path)
    collector = Collector(aws.provisioned.queues["events"])
    wait_until(
        lambda: collector.has_all({e.event_id for e in published}),
        30,
        interval=0.3,
        message="the events published after the intrusion in SQS",
    )
    assert_never_reconnected(edge)
