"""`python -m edge_bridge.forwarder`: one site's forwarder from the environment, each family's ingress on when
listed, refusing to start without what a listed family needs, and telling an operator which family is silent."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from devstack.processes import Mosquitto, free_port
from edge_bridge.adapters import nvr
from edge_bridge.forwarder.service import ForwarderConfig, ForwarderConfigError
from edge_bridge.ingress.http import IDP_PATH, NVR_PATH
from tests.conftest import PROJECT_ROOT, wait_until
from tests.helpers.forwarder import ForwarderProcess, SiteSubscriber, Zigbee2Mqtt, forwarder_env


def test_settings_come_from_the_environment_with_the_site_broker_as_zigbee2mqtts_by_default():
    config = ForwarderConfig.from_env(
        {"EDGE_SITE_ID": "site-9", "EDGE_MQTT_PORT": "1999", "FORWARDER_INGRESSES": "zigbee, NVR"}
    )
    assert (config.site_id, config.mqtt_port, config.ingresses, config.zigbee_host, config.zigbee_base_topic) == (
        "site-9",
        1999,
        ("zigbee", "nvr"),
        None,
        "zigbee2mqtt",
    )
    config = ForwarderConfig.from_env(
        {
            "FORWARDER_INGRESSES": "idp",
            "FORWARDER_IDP_SECRET": "s",
            "FORWARDER_ZIGBEE_PORT": "1884",
            "FORWARDER_PUBLISH_TIMEOUT_S": "2.5",
        }
    )
    assert (config.idp_secret, config.zigbee_port, config.publish_timeout_s) == ("s", 1884, 2.5)


@pytest.mark.parametrize(
    "environ,message",
    [
        ({"FORWARDER_INGRESSES": "zigbee,cameras"}, "FORWARDER_INGRESSES: unknown family cameras"),
        ({"FORWARDER_INGRESSES": "idp"}, "FORWARDER_IDP_SECRET is required"),
        ({"FORWARDER_HTTP_PORT": "eighty"}, "FORWARDER_HTTP_PORT='eighty' is not a number"),
    ],
)
def test_a_setting_the_forwarder_cannot_run_with_is_named(environ, message):
    with pytest.raises(ForwarderConfigError, match=message):
        ForwarderConfig.from_env(environ)


def test_a_listed_family_that_cannot_run_stops_the_start_with_its_setting(mosquitto, tmp_path):
    env = forwarder_env("site-s", mosquitto.port, tmp_path / "state", free_port(), FORWARDER_INGRESSES="nvr,ajax")
    done = subprocess.run(
        [sys.executable, "-m", "edge_bridge.forwarder"],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "FORWARDER_SIA_ACCOUNTS is required with the ajax ingress" in done.stderr


@pytest.fixture
def zigbee_broker(tmp_path):
    broker = Mosquitto(tmp_path / "zigbee-mosquitto").start()
    yield broker
    broker.stop()


def test_the_service_forwards_every_listed_family_and_status_shows_which_one_is_silent(
    mosquitto, zigbee_broker, tmp_path
):
    env = forwarder_env(
        "site-s",
        mosquitto.port,
        tmp_path / "state",
        free_port(),
        FORWARDER_INGRESSES="zigbee,nvr,idp",
        FORWARDER_ZIGBEE_HOST="127.0.0.1",
        FORWARDER_ZIGBEE_PORT=str(zigbee_broker.port),
        FORWARDER_IDP_SECRET="s3cret",
    )
    subscriber = SiteSubscriber(mosquitto.port)
    forwarder = ForwarderProcess(env, tmp_path / "forwarder.log").start()
    z2m = Zigbee2Mqtt(zigbee_broker.port)
    try:
        assert z2m.publish("bridge/state", {"state": "online"})
        assert z2m.publish("front_door", {"contact": True})
        alert = {
            "macAddress": "44:19:b6:0a:11:02",
            "channelID": 1,
            "dateTime": "2024-01-15T11:30:00+01:00",
            "eventType": "VMD",
        }
        assert requests.post(forwarder.url + NVR_PATH, data=nvr.to_xml(alert), timeout=10).status_code == 200
        assert (
            requests.post(
                forwarder.url + IDP_PATH, data=b"{}", headers={"X-Signature": "sha256=00"}, timeout=10
            ).status_code
            == 401
        )
        wait_until(lambda: len(subscriber.snapshot()) == 2, 10, message="the zigbee and NVR events at the site broker")
        status = forwarder.status()
        families = status["families"]
        assert families["zigbee"]["forwarded"] == 1 and families["nvr"]["forwarded"] == 1
        assert families["idp"]["seconds_since_last_message"] is None  # the silent family: nothing ever came
        assert status["zigbee"]["bridge_state"] == "online" and status["site_broker_connected"]
        metrics = requests.get(forwarder.url + "/metrics", timeout=10).text
        assert 'forwarder_messages_total{family="nvr",outcome="forwarded",site="site-s"} 1.0' in metrics
        assert 'forwarder_zigbee_bridge_online{site="site-s"} 1.0' in metrics
        assert 'forwarder_idp_bad_signatures_total{site="site-s"} 1.0' in metrics
        assert 'forwarder_last_message_timestamp_seconds{family="zigbee",site="site-s"}' in metrics
        assert 'forwarder_last_message_timestamp_seconds{family="idp"' not in metrics
    finally:
        z2m.close()
        forwarder.stop()
        subscriber.close()
    assert forwarder.proc.returncode == 0, "SIGTERM is a clean stop"
