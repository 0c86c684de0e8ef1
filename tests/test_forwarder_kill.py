"""Persist-before-ack at the forwarder: `kill -9` of the forwarder process while zigbee2mqtt, NVRs and the door
system send without pause loses nothing a device was told was received.

zigbee2mqtt is told by its broker (PUBACK), which keeps each message in the forwarder's session until the
forwarder acks it; an NVR and the door system are told by the forwarder's HTTP answer (200). Every id that
got that answer must reach the site broker. The forwarder is killed twice: once with traffic flowing (some
HTTP requests are cut open by the kill, and zigbee messages are past zigbee2mqtt's broker but not yet at the
site broker), and once while the site broker is down, so what the forwarder would have published sits in
its memory and the devices are waiting.
"""

from __future__ import annotations

import json
import threading

import pytest
import requests

from devstack.processes import Mosquitto, free_port, kill9
from devstack.tcp_proxy import TcpProxy
from edge_bridge.adapters import nvr
from edge_bridge.ingress.http import IDP_PATH, NVR_PATH, sign
from tests.conftest import wait_until
from tests.helpers.forwarder import ForwarderProcess, SiteSubscriber, Zigbee2Mqtt, forwarder_env

SITE = "site-k"
SECRET = "kill-test-door-secret"


class Device(threading.Thread):
    """Sends numbered messages one after another, each until it is answered as received; counts what it saw."""

    def __init__(self, name: str, stop: threading.Event) -> None:
        super().__init__(daemon=True, name=name)
        self.stop_event = stop
        self.acked: list[str] = []
        self.cut_open = 0  # requests whose connection broke before any answer: in flight at a kill
        self.refused = 0  # 503s: the forwarder could not hand it on
        self.attempts = 0
        self.busy = False

    def run(self) -> None:
        n = 0
        while not self.stop_event.is_set():
            n += 1
            ident = f"{self.name}-{n}"
            while not self.stop_event.is_set():
                self.busy = True
                self.attempts += 1
                try:
                    answered = self.send(ident)
                finally:
                    self.busy = False
                if answered:
                    self.acked.append(ident)
                    break
                self.stop_event.wait(0.05)  # a device's pause before it resends, not a synchronisation

    def send(self, ident: str) -> bool:
        raise NotImplementedError


class HttpDevice(Device):
    def __init__(self, name: str, stop: threading.Event, url: str) -> None:
        super().__init__(name, stop)
        self.url = url
        self.session = requests.Session()

    def post(self, path: str, body: bytes, headers: dict) -> bool:
        try:
            answer = self.session.post(self.url + path, data=body, headers=headers, timeout=15)
        except requests.ConnectionError as exc:
            if "refused" not in str(exc).lower():
                self.cut_open += 1
            self.session = requests.Session()
            return False
        except requests.Timeout:
            return False
        if answer.status_code == 503:
            self.refused += 1
        assert answer.status_code in (200, 503), f"{self.name}: {answer.status_code} {answer.text}"
        return answer.status_code == 200


class Nvr(HttpDevice):
    def send(self, ident: str) -> bool:
        alert = {
            "ipAddress": "10.0.3.21",
            "macAddress": "44:19:b6:0a:11:02",
            "channelID": 4,
            "dateTime": "2024-01-15T11:30:00+01:00",
            "eventType": "VMD",
            "eventState": "active",
            "eventDescription": ident,
        }
        return self.post(NVR_PATH, nvr.to_xml(alert), {"Content-Type": "application/xml"})


class Door(HttpDevice):
    def send(self, ident: str) -> bool:
        body = json.dumps(
            {
                "eventId": ident,
                "occurredAt": "2024-01-15T10:30:00Z",
                "door": {"id": "door-1"},
                "credential": {"type": "card", "id": "card-1"},
                "decision": "granted",
            }
        ).encode()
        return self.post(IDP_PATH, body, {"Content-Type": "application/json", "X-Signature": sign(SECRET, body)})


class ZigbeeDevices(Device):
    """zigbee2mqtt publishing door contacts at QoS 1; told "received" by its broker's PUBACK."""

    def __init__(self, name: str, stop: threading.Event, port: int) -> None:
        super().__init__(name, stop)
        self.z2m = Zigbee2Mqtt(port, client_id="zigbee2mqtt-kill-test")

    def send(self, ident: str) -> bool:
        n = int(ident.rsplit("-", 1)[1])
        self.stop_event.wait(0.002)  # zigbee2mqtt's pace: a few hundred states a second
        return self.z2m.publish(f"door_{n % 20}", {"contact": n % 2 == 0, "battery": 90, "seq": ident})


def arrived(subscriber: SiteSubscriber) -> dict[str, set[str]]:
    got = {"zigbee": set(), "nvr": set(), "idp": set()}
    for m in subscriber.snapshot():
        p = m["payload"]
        got[m["source"]].add(p.get("seq") or p.get("description") or p.get("idp_event_id"))
    return got


@pytest.fixture
def zigbee_broker(tmp_path):
    broker = Mosquitto(tmp_path / "zigbee-mosquitto").start()
    yield broker
    broker.stop()


def inside(forwarder: ForwarderProcess) -> int:
    """ZigBee messages the forwarder took from zigbee2mqtt's broker and has not acked yet."""
    try:
        counts = forwarder.status()["zigbee"]["counts"]
    except (requests.RequestException, ValueError, KeyError):
        return 0
    return counts.get("received", 0) - counts.get("forwarded", 0) - counts.get("quarantined", 0)


def test_nothing_a_device_was_told_was_received_is_lost_when_the_forwarder_is_killed_9(
    mosquitto, zigbee_broker, tmp_path
):
    subscriber = SiteSubscriber(mosquitto.port, client_id="kill-test-site-subscriber")
    proxy = (
        TcpProxy(mosquitto.port).open().slow(0.05)
    )  # the site broker's acks come late, so work is inside the forwarder
    env = forwarder_env(
        SITE,
        proxy.port,
        tmp_path / "state",
        free_port(),
        FORWARDER_INGRESSES="zigbee,nvr,idp",
        FORWARDER_ZIGBEE_HOST="127.0.0.1",
        FORWARDER_ZIGBEE_PORT=str(zigbee_broker.port),
        FORWARDER_IDP_SECRET=SECRET,
        FORWARDER_PUBLISH_TIMEOUT_S="2",
    )
    forwarder = ForwarderProcess(env, tmp_path / "forwarder.log").start()
    stop = threading.Event()
    zigbee = ZigbeeDevices("zigbee", stop, zigbee_broker.port)
    http = [Nvr(f"nvr{i}", stop, forwarder.url) for i in range(2)] + [
        Door(f"idp{i}", stop, forwarder.url) for i in range(2)
    ]
    devices = [zigbee, *http]

    def answered() -> dict[str, int]:
        return {d.name: len(d.acked) for d in devices}

    try:
        for device in devices:
            device.start()
        wait_until(lambda: min(answered().values()) >= 30, 60, message="every device answered 30 times")

        # Kill 1: traffic at full flow, messages inside the forwarder.
        held = wait_until(lambda: inside(forwarder), 20, interval=0.005, message="zigbee messages inside the forwarder")
        wait_until(lambda: sum(d.busy for d in http) >= 3, 10, interval=0.0005, message="HTTP requests open")
        kill9(forwarder.proc)
        print(
            f"kill 1: {held} zigbee messages inside the forwarder, unacked; {len(subscriber.snapshot())} envelopes at the site broker"
        )
        forwarder.start()
        cut_open = sum(d.cut_open for d in http)
        print(f"kill 1: {cut_open} HTTP requests cut open")
        marks = answered()
        wait_until(
            lambda: all(n >= marks[k] + 20 for k, n in answered().items()), 60, message="every device answered again"
        )

        # Kill 2: the site broker is down, the forwarder cannot hand anything on; devices keep sending.
        mosquitto.stop()
        attempts = sum(d.attempts for d in http)
        wait_until(
            lambda: sum(d.attempts for d in http) >= attempts + 8,
            20,
            message="devices sending while the broker is down",
        )
        zigbee_marks = len(zigbee.acked)
        wait_until(
            lambda: len(zigbee.acked) >= zigbee_marks + 20, 20, message="zigbee2mqtt publishing on, its broker acking"
        )
        kill9(forwarder.proc)
        mosquitto.start()
        forwarder.start()
        marks = answered()
        wait_until(
            lambda: all(n >= marks[k] + 20 for k, n in answered().items()),
            60,
            message="every device answered after the restart",
        )
    finally:
        stop.set()
        for device in devices:
            device.join(20)
        zigbee.z2m.close()

    acked = {
        "zigbee": set(zigbee.acked),
        "nvr": {i for d in http[:2] for i in d.acked},
        "idp": {i for d in http[2:] for i in d.acked},
    }

    def missing() -> dict[str, set[str]]:
        got = arrived(subscriber)
        return {family: ids - got[family] for family, ids in acked.items() if ids - got[family]}

    try:
        wait_until(lambda: not missing(), 60, interval=0.5, message="every acknowledged id at the site broker")
    finally:
        print(
            "acknowledged:",
            {k: len(v) for k, v in acked.items()},
            "missing:",
            {k: sorted(v)[:5] for k, v in missing().items()},
        )
        forwarder.stop()
        proxy.close()
        subscriber.close()
    # The kills landed with work in flight: requests cut open by the first, devices waiting at the second.
    assert cut_open >= 1, "no HTTP request was in flight at the first kill"
    assert sum(d.refused for d in http) >= 1, "no device was told to resend while the broker was down"
