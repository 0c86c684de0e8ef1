"""A simulator of every device family across N sites, at a chosen rate and duration.

Live (`--targets`), each site's devices speak their own protocol to that site's forwarder service
(`python -m edge_bridge.forwarder`): zigbee2mqtt publishes states and availability on its broker (QoS 1),
the NVR posts ISAPI `EventNotificationAlert`s (XML, some recorders JSON), the door system posts signed
access webhooks, the Ajax hub sends SIA DC-09 frames. Each device link sends one message at a time and
resends it until it is acknowledged, as the real ones do; event times are the wall clock at sending.
`--targets` is JSON (or a file of it): `{"site-001": {"http": "http://127.0.0.1:9110", "sia": "127.0.0.1:7777",
"zigbee": {"host": "127.0.0.1", "port": 1883, "base": "zigbee2mqtt", "username": "zigbee2mqtt-site-001"}}}`;
secrets come from the environment only, by site id (upper-cased, `-` as `_`): `IDP_SECRET_<SITE>` (the
webhook secret the forwarder checks), `ZIGBEE2MQTT_PASSWORD_<SITE>`, `SIA_KEY_<SITE>` (an optional AES key).

Without `--targets`, it publishes through in-process forwarders (`Forwarder.forward`) logged in as each
site (`MQTT_PASSWORD_<SITE>`), for generated data. `Simulator.messages(count, start, step)` keeps a
fixed-step clock (1 ms a message by default) for generated test data that must be reproducible.

`--malformed` mixes in a share of broken messages (each in its protocol) to show quarantine. With
`--internal` (a share) and the edge service's admin API (`EDGE_ADMIN_URL`, `EDGE_ADMIN_TOKEN`), it also
plays the site's own systems (kiosks, the job system, robots) sending internal events. Every type it
makes is in the event catalog (tested).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests

from edge_bridge.adapters import nvr
from edge_bridge.envelope import format_ts, utc_now
from edge_bridge.ingress.http import IDP_PATH, NVR_PATH, SIGNATURE_HEADER, sign

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceMessage:
    site_id: str
    family: str
    topic: str
    raw: bytes
    received_at: datetime
    malformed: bool = False


# The site's own systems, which send internal events through the edge service's admin API (`POST /events`):
# each event type with the device it comes from and a payload.
INTERNAL_EVENTS = {
    "check_in": lambda rng: ("kiosk-1", {"user": f"u-{rng.randint(1, 200)}", "method": rng.choice(["kiosk", "app"])}),
    "job_update": lambda rng: (
        "job-system",
        {"job": f"J-{rng.randint(1, 999)}", "status": rng.choice(["assigned", "started", "done"])},
    ),
    "robot_action": lambda rng: (
        f"robot-{rng.randint(1, 3)}",
        {"action": rng.choice(["patrol_start", "patrol_done", "dock"])},
    ),
}


class SiteFleet:
    """The devices of one site, fixed by a seed so the same site always has the same devices."""

    AJAX_KINDS = ("MotionProtect", "DoorProtect", "FireProtect", "Button", "LeaksProtect")
    ZIGBEE_KINDS = (
        "door_sensor",
        "motion_sensor",
        "leak_sensor",
        "climate_sensor",
        "smoke_sensor",
        "sos_button",
        "smart_plug",
        "siren",
        "remote",
    )
    # zigbee2mqtt's `advanced.last_seen` setting, one per installation: ISO_8601, ISO_8601_local, epoch, disable.
    LAST_SEEN_FORMATS = ("ISO_8601", "ISO_8601_local", "epoch", "disable")

    def __init__(self, site_id: str, devices_per_family: int, rng: random.Random) -> None:
        self.site_id = site_id
        self.rng = rng
        n = devices_per_family
        self.ajax_hub = f"{rng.getrandbits(32):08X}"
        self.ajax_devices = [(f"{rng.getrandbits(24):06X}", kind) for kind in self.AJAX_KINDS] * max(
            1, n // len(self.AJAX_KINDS) + 1
        )
        self.ajax_devices = self.ajax_devices[: max(n, len(self.AJAX_KINDS))]  # at least one of each kind
        self.zigbee = [(f"{kind}_{i}", kind) for i in range(n) for kind in self.ZIGBEE_KINDS][
            : max(n * 2, len(self.ZIGBEE_KINDS))
        ]
        self.nvr_mac = ":".join(f"{rng.getrandbits(8):02x}" for _ in range(6))
        self.nvr_channels = list(range(1, n + 1))
        self.doors = [f"door-{100 + i}" for i in range(n)]
        self.last_seen_format = self.LAST_SEEN_FORMATS[int(site_id.encode().hex(), 16) % len(self.LAST_SEEN_FORMATS)]
        self.nvr_posts_json = int(site_id.encode().hex(), 16) % 3 == 0  # some recorders post JSON, most XML

    def known_devices(self) -> set[str]:
        ids = {f"ajax-{self.ajax_hub}-{d}" for d, _ in self.ajax_devices}
        ids |= {f"zigbee-{name}" for name, _ in self.zigbee}
        ids |= {f"nvr-{self.nvr_mac.replace(':', '')}-ch{c}" for c in self.nvr_channels}
        ids |= {f"idp-{door}" for door in self.doors}
        return ids

    def message(self, now: datetime) -> DeviceMessage:
        family = self.rng.choices(["ajax", "zigbee", "nvr", "idp"], weights=[2, 4, 3, 3])[0]
        topic, data = getattr(self, f"_{family}")(now)
        raw = (
            data.encode("utf-8") if isinstance(data, str) else json.dumps(data).encode("utf-8")
        )  # a bare text payload as is
        return DeviceMessage(self.site_id, family, topic, raw, now)

    def internal(self, now: datetime) -> DeviceMessage:
        """One internal event, as the body of the edge service's `POST /events`."""
        event_type = self.rng.choice(list(INTERNAL_EVENTS))
        device_id, payload = INTERNAL_EVENTS[event_type](self.rng)
        body = {"event_type": event_type, "payload": payload, "device_id": device_id}
        return DeviceMessage(self.site_id, "edge", "/events", json.dumps(body).encode("utf-8"), now)

    def _ajax(self, now):
        device, kind = self.rng.choice(self.ajax_devices)
        alarms = {
            "MotionProtect": ["INTRUSION", "TAMPER"],
            "DoorProtect": ["INTRUSION", "TAMPER_OPEN"],
            "FireProtect": ["FIRE", "SMOKE", "TAMPER"],
            "Button": ["PANIC"],
            "LeaksProtect": ["LEAK", "TAMPER"],
        }[kind]
        codes = {
            "ARM": 6,
            "DISARM": 6,
            "NIGHT_MODE_ON": 1,
            "PERIODIC_TEST": 6,
            "BATTERY_LOW": 1,
            "CONNECTION_LOST": 1,
            "CONNECTION_RESTORED": 1,
        }
        codes |= {alarm: 2 for alarm in alarms}
        code = self.rng.choices(list(codes), weights=list(codes.values()))[0]
        return "ajax/events", {
            "hubId": self.ajax_hub,
            "deviceId": device,
            "deviceType": kind,
            "eventCode": code,
            "room": self.rng.choice(["Lobby", "Office", "Warehouse", "Server room"]),
            "timestamp": int(now.timestamp() * 1000),
            "userName": "operator" if code in ("ARM", "DISARM", "NIGHT_MODE_ON") else None,
        }

    def _last_seen(self, now: datetime):
        if self.last_seen_format == "ISO_8601":
            return format_ts(now)
        if self.last_seen_format == "ISO_8601_local":
            return (
                now.astimezone(timezone(timedelta(hours=1))).strftime("%Y-%m-%dT%H:%M:%S.")
                + f"{now.microsecond // 1000:03d}+0100"
            )
        if self.last_seen_format == "epoch":
            return int(now.timestamp() * 1000)
        return None

    def _zigbee(self, now):
        name, kind = self.rng.choice(self.zigbee)
        if self.rng.random() < 0.03:  # zigbee2mqtt's availability check: the device dropped off or came back
            state = self.rng.choice(["offline", "online"])
            return f"zigbee2mqtt/{name}/availability", ({"state": state} if self.rng.random() < 0.5 else state)
        state = {"linkquality": self.rng.randint(10, 255)}
        if kind not in ("smart_plug",):  # battery devices
            state["battery"] = self.rng.randint(20, 100)
            state["battery_low"] = state["battery"] < 25
        if (last_seen := self._last_seen(now)) is not None:
            state["last_seen"] = last_seen
        if kind == "door_sensor":
            state.update(contact=self.rng.random() < 0.7, tamper=self.rng.random() < 0.01)
        elif kind == "motion_sensor":
            state["occupancy"] = self.rng.random() < 0.5
        elif kind == "leak_sensor":
            state["water_leak"] = self.rng.random() < 0.05
        elif kind == "smoke_sensor":
            state["smoke"] = self.rng.random() < 0.02
        elif kind == "sos_button":
            state["action"] = "emergency" if self.rng.random() < 0.05 else ""  # mostly its periodic report
        elif kind == "remote":
            state["action"] = self.rng.choice(["single", "double", "hold", "brightness_move_up"])
        elif kind == "smart_plug":
            on = self.rng.random() < 0.6
            state.update(
                state="ON" if on else "OFF",
                power=round(self.rng.uniform(5, 1800), 1) if on else 0.0,
                energy=round(self.rng.uniform(0, 50), 2),
                voltage=230,
            )
        elif kind == "siren":
            state.update(alarm=self.rng.random() < 0.03, volume="high")
        else:
            state.update(temperature=round(self.rng.uniform(17, 27), 1), humidity=round(self.rng.uniform(30, 60), 1))
        return f"zigbee2mqtt/{name}", state

    def _nvr(self, now):
        kinds = {
            "VMD": 20,
            "linedetection": 6,
            "fielddetection": 6,
            "videoloss": 2,
            "shelteralarm": 1,
            "tamperdetection": 1,
            "keepalive": 8,
        }
        kind = self.rng.choices(list(kinds), weights=list(kinds.values()))[0]
        state = "inactive" if kind == "keepalive" else "active"
        kind = "videoloss" if kind == "keepalive" else kind  # the recorder's keep-alive is an inactive videoloss
        local = now.astimezone(timezone(timedelta(hours=1)))
        return "nvr/alarms", {
            "ipAddress": "10.0.3.21",
            "macAddress": self.nvr_mac,
            "channelID": self.rng.choice(self.nvr_channels),
            "dateTime": local.isoformat(timespec="milliseconds"),
            "eventType": kind,
            "eventState": state,
            "eventDescription": f"{kind} alarm",
            "regionID": self.rng.randint(1, 4) if kind in ("linedetection", "fielddetection") else None,
        }

    def _idp(self, now):
        granted = self.rng.random() < 0.9
        return "idp/access", {
            "eventId": f"{self.rng.getrandbits(64):016x}",
            "occurredAt": format_ts(now),
            "door": {"id": self.rng.choice(self.doors), "name": "Main entrance"},
            "credential": {
                "type": self.rng.choice(["card", "mobile", "pin"]),
                "id": f"card-{self.rng.randint(1, 500)}",
            },
            "decision": "granted" if granted else "denied",
            "reason": None if granted else "outside schedule",
        }


# Broken messages as the adapters see them (generated data, in-process forwarders).
MALFORMED = [
    ("ajax", "ajax/events", b'{"hubId": "00", "eventCode": "INTRUSION"'),  # truncated JSON
    (
        "ajax",
        "ajax/events",
        b'{"hubId": "00", "deviceId": "01", "eventCode": "SELF_DESTRUCT", "timestamp": 1705314600}',
    ),
    ("zigbee", "zigbee2mqtt/door_sensor_0", b"\xff\xfe not utf-8"),
    ("nvr", "nvr/alarms", b'{"eventType": "VMD"}'),  # missing fields
    ("idp", "idp/access", b"[1, 2, 3]"),
]
# Broken messages as each protocol carries them to a live forwarder (each refused there and quarantined).
LIVE_MALFORMED = [
    ("ajax", "sia", b"crc"),  # a frame whose CRC does not match: NAKed
    ("zigbee", "zigbee2mqtt/door_sensor_0", b"\xff\xfe not utf-8"),
    ("nvr", "nvr/isapi", b"<EventNotificationAlert><ipAddress>10.0.3.21"),  # cut short: 400
    ("idp", "idp/access", b"[1, 2, 3]"),  # signed, but no decision: 400
]


class Simulator:
    def __init__(
        self,
        sites: list[str],
        devices_per_family: int = 4,
        seed: int = 7,
        malformed: float = 0.0,
        internal: float = 0.0,
    ) -> None:
        self.rng = random.Random(seed)
        self.fleets = {site: SiteFleet(site, devices_per_family, random.Random(f"{seed}-{site}")) for site in sites}
        self.malformed = malformed
        self.internal = internal

    def messages(
        self,
        count: int | None = None,
        start: datetime | None = None,
        step: timedelta = timedelta(milliseconds=1),
        clock: Callable[[], datetime] | None = None,
        malformed: list[tuple[str, str, bytes]] = MALFORMED,
    ) -> Iterator[DeviceMessage]:
        """Device messages (and, with `internal`, internal events of family "edge") round-robin over sites.

        Event times come from `clock` (the wall clock, live) or else advance by `step` from `start` (strictly
        increasing, so generated keys are unique and the data reproducible)."""
        now = start or utc_now()
        sites = list(self.fleets)
        n = 0
        while count is None or n < count:
            if clock is not None:
                now = clock()
            site = sites[n % len(sites)]
            if self.malformed and self.rng.random() < self.malformed:
                family, topic, raw = self.rng.choice(malformed)
                yield DeviceMessage(site, family, topic, raw, now, malformed=True)
            elif self.internal and self.rng.random() < self.internal:
                yield self.fleets[site].internal(now)
            else:
                yield self.fleets[site].message(now)
            if clock is None:
                now += step
            n += 1

    def _paced(
        self, rate: float, duration: float, stop: threading.Event, messages: Iterator[DeviceMessage], send, admin
    ) -> int:
        started = time.monotonic()
        sent = 0
        for msg in messages:
            due = started + sent / rate
            if stop.wait(max(0.0, due - time.monotonic())) or (duration and time.monotonic() - started >= duration):
                break
            if msg.family != "edge":
                send(msg)
            elif admin is not None:
                try:
                    admin.emit(**json.loads(msg.raw))
                except (requests.RequestException, OSError) as exc:
                    log.warning("the edge service did not take an internal event: %s", exc)
            sent += 1
        return sent

    def run(
        self, forwarders: dict, rate: float, duration: float = 0.0, stop: threading.Event | None = None, admin=None
    ) -> int:
        """Publish through in-process forwarders at `rate` messages/s until `duration` (0 = until `stop`), event
        times on the wall clock; returns how many were sent. Internal events go to `admin` (an `AdminClient`)."""
        stop = stop or threading.Event()

        def send(msg: DeviceMessage) -> None:
            forwarders[msg.site_id].forward(msg.family, msg.topic, msg.raw, utc_now())

        return self._paced(rate, duration, stop, self.messages(clock=utc_now), send, admin)

    def run_live(
        self,
        sites: dict[str, LiveSite],
        rate: float,
        duration: float = 0.0,
        stop: threading.Event | None = None,
        admin=None,
    ) -> int:
        """Send to each site's forwarder over the devices' own protocols, event times on the wall clock."""
        stop = stop or threading.Event()
        return self._paced(
            rate,
            duration,
            stop,
            self.messages(clock=utc_now, malformed=LIVE_MALFORMED),
            lambda msg: sites[msg.site_id].send(msg),
            admin,
        )


# --- live: each device link speaks its protocol and resends until it is acknowledged ------------------------

ACKED, REFUSED, RESEND = "acked", "refused", "resend"


class DeviceLink(threading.Thread):
    """One device's link to the forwarder (a hub's TCP connection, an NVR's HTTP client, ...): one message at
    a time, each resent until it is acknowledged or refused (or the simulator stops)."""

    family = ""
    pause_s = 0.5

    def __init__(self, site: LiveSite) -> None:
        super().__init__(daemon=True, name=f"{site.site_id}-{self.family}")
        self.site = site
        self.inbox: queue.Queue[DeviceMessage | None] = queue.Queue(maxsize=1000)
        self.counts: Counter[str] = Counter()

    def run(self) -> None:
        while (msg := self.inbox.get()) is not None:
            while not self.site.stop.is_set():
                try:
                    result = self.deliver(msg)
                except Exception as exc:  # noqa: BLE001 - a device keeps trying; the simulator goes on
                    log.warning("%s: %s", self.name, exc)
                    result = RESEND
                self.counts[result] += 1
                if result != RESEND:
                    break
                self.site.stop.wait(self.pause_s)
        self.close()

    def deliver(self, msg: DeviceMessage) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ZigbeeLink(DeviceLink):
    """zigbee2mqtt: publishes on its broker at QoS 1; the broker's PUBACK is all it is ever told."""

    family = "zigbee"

    def __init__(
        self, site: LiveSite, host: str, port: int, base: str, username: str | None, password: str | None
    ) -> None:
        super().__init__(site)
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.base = base.strip("/")
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=username or f"zigbee2mqtt-{site.site_id}", clean_session=False
        )
        if username:
            self.client.username_pw_set(username, password)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=1, max_delay=5)
        self.client.connect_async(host, port, keepalive=30)
        self.client.loop_start()

    def deliver(self, msg: DeviceMessage) -> str:
        rest = msg.topic.split("/", 1)[1]
        info = self.client.publish(f"{self.base}/{rest}", msg.raw, qos=1)
        try:
            info.wait_for_publish(30)
        except RuntimeError:  # not connected: paho keeps it queued and sends it once it is
            pass
        return ACKED  # paho resends it until the broker has it; zigbee2mqtt never publishes one again

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class HttpLink(DeviceLink):
    path = ""

    def __init__(self, site: LiveSite, url: str) -> None:
        super().__init__(site)
        self.url = url.rstrip("/") + self.path
        self.session = requests.Session()

    def post(self, body: bytes, headers: dict[str, str]) -> str:
        try:
            answer = self.session.post(self.url, data=body, headers=headers, timeout=30)
        except requests.RequestException:
            self.session = requests.Session()
            return RESEND
        if answer.status_code == 200:
            return ACKED
        if answer.status_code in (400, 401, 413):
            return REFUSED
        return RESEND


class NvrLink(HttpLink):
    """A recorder's "alarm host" notifications: ISAPI XML (or JSON), resent until answered 200."""

    family = "nvr"
    path = NVR_PATH

    def deliver(self, msg: DeviceMessage) -> str:
        if msg.malformed:
            return self.post(msg.raw, {"Content-Type": "application/xml"})
        data = json.loads(msg.raw)
        if self.site.fleet.nvr_posts_json:
            return self.post(nvr.to_json(data), {"Content-Type": "application/json"})
        return self.post(nvr.to_xml(data), {"Content-Type": "application/xml"})


class DoorLink(HttpLink):
    """The door-access system's webhook, signed with the shared secret."""

    family = "idp"
    path = IDP_PATH

    def __init__(self, site: LiveSite, url: str, secret: str) -> None:
        super().__init__(site, url)
        self.secret = secret

    def deliver(self, msg: DeviceMessage) -> str:
        return self.post(msg.raw, {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.secret, msg.raw)})


class HubLink(DeviceLink):
    """An Ajax hub reporting to its monitoring station over SIA DC-09: one frame at a time, resent until ACKed."""

    family = "ajax"

    def __init__(self, site: LiveSite, host: str, port: int, key: str | None) -> None:
        super().__init__(site)
        self.host, self.port, self.key = host, port, key
        self.account = site.fleet.ajax_hub
        self.zones = {device: i + 1 for i, (device, _) in enumerate(site.fleet.ajax_devices)}
        self.seq = 0
        self.conn = None

    def deliver(self, msg: DeviceMessage) -> str:
        from edge_bridge.ingress.sia import HUB_EVENT_SIA_CODES, HubConnection, build_frame, response_kind

        if msg is not getattr(self, "_current", None):
            self._current, self.seq = msg, self.seq % 9999 + 1
        if msg.malformed:
            frame = build_frame(self.account, "BA", zone=1, seq=self.seq, key=self.key).replace(b"Nri1/BA", b"Nri1/BB")
        else:
            data = json.loads(msg.raw)
            code, zoned = HUB_EVENT_SIA_CODES[data["eventCode"]]
            frame = build_frame(
                self.account, code, zone=self.zones.get(data["deviceId"], 0) if zoned else 0, seq=self.seq, key=self.key
            )
        try:
            self.conn = self.conn or HubConnection(self.host, self.port, timeout=15)
            answer = self.conn.send(frame)
        except OSError:
            self.close()
            return RESEND
        kind = response_kind(answer) if answer is not None else None
        if kind == "ACK":
            return ACKED
        if kind == "DUH" or (kind == "NAK" and msg.malformed):
            return REFUSED
        return RESEND  # no answer, or NAK (a frame stamped anew goes next)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class LiveSite:
    """One site's device links to its forwarder service, each family on its own protocol."""

    def __init__(self, site_id: str, fleet: SiteFleet, target: dict, stop: threading.Event, environ=None) -> None:
        environ = os.environ if environ is None else environ
        suffix = site_id.upper().replace("-", "_")
        self.site_id, self.fleet, self.stop = site_id, fleet, stop
        self.links: dict[str, DeviceLink] = {}
        if "zigbee" in target:
            z = target["zigbee"]
            self.links["zigbee"] = ZigbeeLink(
                self,
                z.get("host", "127.0.0.1"),
                int(z.get("port", 1883)),
                z.get("base", "zigbee2mqtt"),
                z.get("username"),
                environ.get("ZIGBEE2MQTT_PASSWORD_" + suffix),
            )
        if "http" in target:
            self.links["nvr"] = NvrLink(self, target["http"])
            secret = environ.get("IDP_SECRET_" + suffix)
            if secret:
                self.links["idp"] = DoorLink(self, target["http"], secret)
        if "sia" in target:
            host, _, port = str(target["sia"]).rpartition(":")
            self.links["ajax"] = HubLink(self, host or "127.0.0.1", int(port), environ.get("SIA_KEY_" + suffix))
        for link in self.links.values():
            link.start()

    def send(self, msg: DeviceMessage) -> None:
        link = self.links.get(msg.family)
        if link is None:
            return
        while not self.stop.is_set():
            try:
                link.inbox.put(msg, timeout=0.5)
                return
            except queue.Full:  # the device is still resending earlier messages
                continue

    def close(self, timeout: float = 10.0) -> dict[str, dict[str, int]]:
        for link in self.links.values():
            try:
                link.inbox.put_nowait(None)
            except queue.Full:
                pass
        for link in self.links.values():
            link.join(timeout)
        return {family: dict(link.counts) for family, link in self.links.items()}


def site_password(site_id: str) -> str | None:
    return os.environ.get("MQTT_PASSWORD_" + site_id.upper().replace("-", "_"))


def read_targets(spec: str) -> dict[str, dict]:
    """`--targets`: JSON, or the path of a file of it."""
    text = spec if spec.lstrip().startswith("{") else Path(spec).read_text()
    targets = json.loads(text)
    if not isinstance(targets, dict) or not all(isinstance(t, dict) for t in targets.values()):
        raise SystemExit("--targets: a JSON object of site id -> {http, sia, zigbee}")
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", help="live: each site's forwarder (JSON or a file of it; see the module's doc)")
    parser.add_argument("--host", default="127.0.0.1", help="without --targets: the site broker")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--devices", type=int, default=4, help="devices per family per site")
    parser.add_argument("--rate", type=float, default=5.0, help="messages per second, all sites together")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds; 0 runs until SIGTERM")
    parser.add_argument("--malformed", type=float, default=0.0, help="share of broken device messages (0-1)")
    parser.add_argument(
        "--internal",
        type=float,
        default=0.0,
        help="share of internal events sent to the edge service at $EDGE_ADMIN_URL (0-1)",
    )
    parser.add_argument("--state-dir", default=".simulator")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s simulator %(levelname)s %(message)s")

    from edge_bridge.cli import AdminClient

    targets = read_targets(args.targets) if args.targets else None
    sites = list(targets) if targets else [f"site-{i:03d}" for i in range(1, args.sites + 1)]
    sim = Simulator(sites, args.devices, malformed=args.malformed, internal=args.internal)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    admin = AdminClient(timeout=10.0) if args.internal else None
    if targets:
        live = {site: LiveSite(site, sim.fleets[site], targets[site], stop) for site in sites}
        sent = sim.run_live(live, args.rate, args.duration, stop, admin=admin)
        stop.set()
        for site, link in live.items():
            log.info("%s: %s", site, link.close())
    else:
        from edge_bridge.forwarder import Forwarder

        forwarders = {
            site: Forwarder.connect(
                site,
                args.host,
                args.port,
                Path(args.state_dir),
                password=site_password(site),
                known_devices=sim.fleets[site].known_devices(),
            )
            for site in sites
        }
        sent = sim.run(forwarders, args.rate, args.duration, stop, admin=admin)
        for forwarder in forwarders.values():
            forwarder.close()
    log.info("sent %d device messages across %d sites", sent, len(sites))


if __name__ == "__main__":
    main()
