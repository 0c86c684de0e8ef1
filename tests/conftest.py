"""Shared fixtures: private, real instances of every part on free ports, so tests can kill and cut them."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path

import pytest

from devstack.processes import AwsEmulator, Mosquitto, aws_env, free_port, stop_process

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(predicate, timeout: float, interval: float = 0.1, message: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail with `message` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def mosquitto(tmp_path):
    broker = Mosquitto(tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


@pytest.fixture
def aws(monkeypatch):
    """A fresh local SQS + S3 endpoint, provisioned from config/stack.yaml, with this process pointed at it."""
    emulator = AwsEmulator().start()
    for key, value in aws_env(emulator.endpoint_url).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PIPELINE_EVENTS_QUEUE", "events")
    monkeypatch.setenv("PIPELINE_ARCHIVE_BUCKET", "events-archive")
    from pipeline.provisioning import provision

    emulator.provisioned = provision()
    yield emulator
    emulator.stop()


def _raise(log: str):
    raise AssertionError(f"edge service exited:\n{log[-3000:]}")


class EdgeProcess:
    """`python -m edge_bridge` as a real child process, so tests can kill -9 and restart it."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "edge.log"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.env['EDGE_ADMIN_PORT']}"

    @property
    def admin_token(self) -> str | None:
        """The bearer token the service's POST endpoints take (None when the test started it without one)."""
        return self.env.get("EDGE_ADMIN_TOKEN") or None

    def admin(self):
        """An admin API client holding this service's token."""
        from edge_bridge.cli import AdminClient

        return AdminClient(self.admin_url, token=self.admin_token)

    def post(self, path: str, body: dict | None = None, headers: dict[str, str] | None = None):
        """POST `body` as JSON to the admin API with this service's token (headers given here win)."""
        import requests

        sent = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
        return requests.post(self.admin_url + path, json=body, headers={**sent, **(headers or {})}, timeout=30)

    def start(self) -> EdgeProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._subscribed_before = self.log().count("subscribed to")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_bridge"],
            cwd=PROJECT_ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_path, "ab"),
            start_new_session=True,
        )
        return self

    def wait_subscribed(self, timeout: float = 30) -> EdgeProcess:
        wait_until(
            lambda: (
                self.log().count("subscribed to") > self._subscribed_before
                or (self.proc.poll() is not None and _raise(self.log()))
            ),
            timeout,
            message="the edge service to subscribe",
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)

    def kill9(self) -> None:
        """`kill -9` the service and everything in its process group."""
        from devstack.processes import kill9

        kill9(self.proc)

    def kill9_service_only(self) -> None:
        """`kill -9` the service process alone, as the OOM killer would: its children are left to notice."""
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def edge_factory(tmp_path, mosquitto, aws, monkeypatch):
    """Start edge services against the private broker; `sqs_endpoint` lets a test route SQS via a proxy.

    The services a test starts share a random admin token, also set in the test's own environment as an
    operator's shell would have it, so the CLI and the Dagster replay find it where they look in production.
    """
    started: list[EdgeProcess] = []
    monkeypatch.setenv("EDGE_ADMIN_TOKEN", secrets.token_urlsafe(24))

    def start(sqs_endpoint: str | None = None, **extra_env: str) -> EdgeProcess:
        env = dict(os.environ)
        env.update(aws_env(sqs_endpoint or aws.endpoint_url))
        env.update(
            EDGE_MQTT_HOST="127.0.0.1",
            EDGE_MQTT_PORT=str(mosquitto.port),
            EDGE_CLIENT_ID="edge-bridge-test",
            EDGE_STATE_DIR=str(tmp_path / "edge_state"),
            EDGE_EVENTS_QUEUE_URL=aws.provisioned.queues["events"],
            EDGE_ADMIN_PORT=str(free_port()),
            PYTHONUNBUFFERED="1",
        )
        env.update(extra_env)
        proc = EdgeProcess(tmp_path / "edge", env).start().wait_subscribed()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def publish(port: int, topic: str, payloads: list[bytes | str], client_id: str = "test-publisher") -> None:
    """Publish at QoS 1 with a real paho client and wait until the broker has acknowledged each one."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for payload in payloads]
        for info in infos:
            info.wait_for_publish(timeout=30)
            assert info.is_published(), "broker did not acknowledge a publish"
    finally:
        client.disconnect()
        client.loop_stop()


def receive_all(queue_url: str, timeout: float = 2.0, delete: bool = True) -> list[dict]:
    """Receive (and by default delete) every message currently in the queue; bodies as dicts."""
    import json

    from pipeline.stack import aws_client

    sqs = aws_client("sqs")
    bodies = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        if not batch:
            time.sleep(0.05)
            continue
        deadline = time.monotonic() + timeout
        bodies += [json.loads(m["Body"]) for m in batch]
        if delete:
            sqs.delete_message_batch(
                QueueUrl=queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)],
            )
    return bodies


def queue_counts(queue_url: str) -> tuple[int, int]:
    from pipeline.drain import queue_depth
    from pipeline.stack import aws_client

    return queue_depth(aws_client("sqs"), queue_url)


def sample_envelope(site_id: str = "site-123", event_type: str = "door_access", **overrides):
    from datetime import datetime

    from edge_bridge.envelope import Envelope, make_idempotency_key

    ts = overrides.pop("timestamp", datetime(2024, 1, 15, 10, 30, tzinfo=UTC))
    device = overrides.pop("device_id", "door-456")
    return Envelope(
        idempotency_key=make_idempotency_key(site_id, device, event_type, ts),
        event_type=event_type,
        source=overrides.pop("source", "ajax"),
        site_id=site_id,
        device_id=device,
        timestamp=ts,
        payload=overrides.pop("payload", {"door": "456", "result": "granted", "credential": "card-77"}),
        **overrides,
    )
