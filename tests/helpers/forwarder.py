"""What the forwarder's tests share: a subscriber at the site broker, zigbee2mqtt's side, and the forwarder
service as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import requests
from paho.mqtt.enums import CallbackAPIVersion

from devstack.processes import stop_process
from tests.conftest import PROJECT_ROOT, wait_until


class SiteSubscriber:
    """Every envelope that reached the site broker under sites/+/events/#, through a persistent QoS 1 session
    (so what arrives while it reconnects, or across a broker restart, is kept for it)."""

    def __init__(
        self,
        port: int,
        client_id: str = "forwarder-test-site-subscriber",
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.messages: list[dict] = []
        self.topics: list[str] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, *a: c.subscribe("sites/+/events/#", qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self.subscribed.wait(10), "subscriber not subscribed"

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.topics.append(msg.topic)
            self.messages.append(json.loads(msg.payload))

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.messages)

    def of_type(self, event_type: str) -> list[dict]:
        return [m for m in self.snapshot() if m["event_type"] == event_type]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Zigbee2Mqtt:
    """zigbee2mqtt's side of its broker: publishes device topics at QoS 1 and knows which the broker acked."""

    def __init__(
        self, port: int, base: str = "zigbee2mqtt", client_id: str = "zigbee2mqtt-test", max_inflight: int = 100
    ) -> None:
        self.base = base
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def publish(
        self, rest: str, payload: dict | bytes | str, qos: int = 1, retain: bool = False, timeout: float = 10.0
    ) -> bool:
        """True once the broker acknowledged it (the only answer zigbee2mqtt ever gets)."""
        body = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        info = self.client.publish(f"{self.base}/{rest}", body, qos=qos, retain=retain)
        if qos == 0:
            return True
        try:
            info.wait_for_publish(timeout)
        except RuntimeError:
            return False
        return info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def forwarder_env(site: str, site_port: int, state_dir: Path, http_port: int, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    env.update(
        EDGE_SITE_ID=site,
        FORWARDER_MQTT_HOST="127.0.0.1",
        FORWARDER_MQTT_PORT=str(site_port),
        FORWARDER_STATE_DIR=str(state_dir),
        FORWARDER_HTTP_HOST="127.0.0.1",
        FORWARDER_HTTP_PORT=str(http_port),
        PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        **settings,
    )
    return env


class ForwarderProcess:
    """`python -m edge_bridge.forwarder` in its own process group, ready once /status says every ingress is up."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{env['FORWARDER_HTTP_PORT']}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> ForwarderProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_bridge.forwarder"],
            env=self.env,
            cwd=PROJECT_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_path, "ab"),
            start_new_session=True,
        )
        wait_until(self._ready, timeout, message=f"the forwarder process ready (log: {self.log_path.name})")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the forwarder exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}"
            )
        try:
            status = requests.get(self.url + "/status", timeout=1).json()
        except (requests.RequestException, ValueError):
            return False
        return "zigbee" not in status or status["zigbee"]["connected"]

    def status(self) -> dict:
        return requests.get(self.url + "/status", timeout=5).json()

    def stop(self) -> None:
        stop_process(self.proc)
