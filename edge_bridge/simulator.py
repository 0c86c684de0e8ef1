"""A simulator of every device family across N sites, driving the forwarder at a chosen rate and duration.

`python -m edge_bridge.simulator --sites 3 --rate 20 --duration 0` publishes realistic native messages
(Ajax hub events and trouble reports, zigbee2mqtt states and availability, NVR alarms and keep-alives,
IDP door decisions) through one forwarder per site. With credentials (`MQTT_PASSWORD_<SITE_ID>` in the
environment, the site id upper-cased with `-` as `_`) each site logs in as itself. `--malformed` mixes
in a share of broken messages to show quarantine. With `--internal` (a share) and the edge service's
admin API (`EDGE_ADMIN_URL`, `EDGE_ADMIN_TOKEN`), it also plays the site's own systems (kiosks, the job
system, robots) sending internal events. Every type it makes is in the event catalog (tested).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests

from edge_bridge.envelope import format_ts, utc_now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceMessage:
    site_id: str
    family: str
    topic: str
    raw: bytes
    received_at: datetime


# The site's own systems, which send internal events through the edge service's admin API (`POST /events`):
# each event type with the device it comes from and a payload.
INTERNAL_EVENTS = {
    "check_in": lambda rng: ("kiosk-1", {"user": f"u-{rng.randint(1, 200)}", "method": rng.choice(["kiosk", "app"])}),
    "job_update": lambda rng: ("job-system", {"job": f"J-{rng.randint(1, 999)}", "status": rng.choice(["assigned", "started", "done"])}),
    "robot_action": lambda rng: (f"robot-{rng.randint(1, 3)}", {"action": rng.choice(["patrol_start", "patrol_done", "dock"])}),
}


class SiteFleet:
    """The devices of one site, fixed by a seed so the same site always has the same devices."""

    AJAX_KINDS = ("MotionProtect", "DoorProtect", "FireProtect", "Button", "LeaksProtect")
    ZIGBEE_KINDS = ("door_sensor", "motion_sensor", "leak_sensor", "climate_sensor", "smoke_sensor")

    def __init__(self, site_id: str, devices_per_family: int, rng: random.Random) -> None:
        self.site_id = site_id
        self.rng = rng
        n = devices_per_family
        self.ajax_hub = f"{rng.getrandbits(32):08X}"
        self.ajax_devices = [(f"{rng.getrandbits(24):06X}", kind) for kind in self.AJAX_KINDS] * max(1, n // len(self.AJAX_KINDS) + 1)
        self.ajax_devices = self.ajax_devices[: max(n, len(self.AJAX_KINDS))]  # at least one of each kind
        self.zigbee = [(f"{kind}_{i}", kind) for i in range(n) for kind in self.ZIGBEE_KINDS][: max(n, 1) * 2]
        self.nvr_mac = ":".join(f"{rng.getrandbits(8):02x}" for _ in range(6))
        self.nvr_channels = list(range(1, n + 1))
        self.doors = [f"door-{100 + i}" for i in range(n)]

    def known_devices(self) -> set[str]:
        ids = {f"ajax-{self.ajax_hub}-{d}" for d, _ in self.ajax_devices}
        ids |= {f"zigbee-{name}" for name, _ in self.zigbee}
        ids |= {f"nvr-{self.nvr_mac.replace(':', '')}-ch{c}" for c in self.nvr_channels}
        ids |= {f"idp-{door}" for door in self.doors}
        return ids

    def message(self, now: datetime) -> DeviceMessage:
        family = self.rng.choices(["ajax", "zigbee", "nvr", "idp"], weights=[2, 4, 3, 3])[0]
        topic, data = getattr(self, f"_{family}")(now)
        return DeviceMessage(self.site_id, family, topic, json.dumps(data).encode("utf-8"), now)

    def internal(self, now: datetime) -> DeviceMessage:
        """One internal event, as the body of the edge service's `POST /events`."""
        event_type = self.rng.choice(list(INTERNAL_EVENTS))
        device_id, payload = INTERNAL_EVENTS[event_type](self.rng)
        body = {"event_type": event_type, "payload": payload, "device_id": device_id}
        return DeviceMessage(self.site_id, "edge", "/events", json.dumps(body).encode("utf-8"), now)

    def _ajax(self, now):
        device, kind = self.rng.choice(self.ajax_devices)
        alarms = {
            "MotionProtect": ["INTRUSION", "TAMPER"], "DoorProtect": ["INTRUSION", "TAMPER_OPEN"], "FireProtect": ["FIRE", "SMOKE", "TAMPER"],
            "Button": ["PANIC"], "LeaksProtect": ["LEAK", "TAMPER"],
        }[kind]
        codes = {"ARM": 6, "DISARM": 6, "NIGHT_MODE_ON": 1, "PERIODIC_TEST": 6, "BATTERY_LOW": 1, "CONNECTION_LOST": 1, "CONNECTION_RESTORED": 1}
        codes |= {alarm: 2 for alarm in alarms}
        code = self.rng.choices(list(codes), weights=list(codes.values()))[0]
        return "ajax/events", {
            "hubId": self.ajax_hub, "deviceId": device, "deviceType": kind, "eventCode": code,
            "room": self.rng.choice(["Lobby", "Office", "Warehouse", "Server room"]),
            "timestamp": int(now.timestamp() * 1000), "userName": "operator" if code in ("ARM", "DISARM", "NIGHT_MODE_ON") else None,
        }

    def _zigbee(self, now):
        name, kind = self.rng.choice(self.zigbee)
        if self.rng.random() < 0.03:  # zigbee2mqtt's availability check: the device dropped off or came back
            return f"zigbee2mqtt/{name}/availability", {"state": self.rng.choice(["offline", "online"])}
        state = {"battery": self.rng.randint(20, 100), "linkquality": self.rng.randint(10, 255), "last_seen": format_ts(now)}
        state["battery_low"] = state["battery"] < 25
        if kind == "door_sensor":
            state.update(contact=self.rng.random() < 0.7, tamper=self.rng.random() < 0.01)
        elif kind == "motion_sensor":
            state["occupancy"] = self.rng.random() < 0.5
        elif kind == "leak_sensor":
            state["water_leak"] = self.rng.random() < 0.05
        elif kind == "smoke_sensor":
            state["smoke"] = self.rng.random() < 0.02
        else:
            state.update(temperature=round(self.rng.uniform(17, 27), 1), humidity=round(self.rng.uniform(30, 60), 1))
        return f"zigbee2mqtt/{name}", state

    def _nvr(self, now):
        kinds = {"VMD": 20, "linedetection": 6, "fielddetection": 6, "videoloss": 2, "shelteralarm": 1, "tamperdetection": 1, "keepalive": 8}
        kind = self.rng.choices(list(kinds), weights=list(kinds.values()))[0]
        state = "inactive" if kind == "keepalive" else "active"
        kind = "videoloss" if kind == "keepalive" else kind  # the recorder's keep-alive is an inactive videoloss
        local = now.astimezone(timezone(timedelta(hours=1)))
        return "nvr/alarms", {
            "ipAddress": "10.0.3.21", "macAddress": self.nvr_mac, "channelID": self.rng.choice(self.nvr_channels),
            "dateTime": local.isoformat(timespec="milliseconds"), "eventType": kind, "eventState": state,
            "eventDescription": f"{kind} alarm", "regionID": self.rng.randint(1, 4) if kind in ("linedetection", "fielddetection") else None,
        }

    def _idp(self, now):
        granted = self.rng.random() < 0.9
        return "idp/access", {
            "eventId": f"{self.rng.getrandbits(64):016x}", "occurredAt": format_ts(now),
            "door": {"id": self.rng.choice(self.doors), "name": "Main entrance"},
            "credential": {"type": self.rng.choice(["card", "mobile", "pin"]), "id": f"card-{self.rng.randint(1, 500)}"},
            "decision": "granted" if granted else "denied", "reason": None if granted else "outside schedule",
        }


MALFORMED = [
    ("ajax", "ajax/events", b'{"hubId": "00", "eventCode": "INTRUSION"'),  # truncated JSON
    ("ajax", "ajax/events", b'{"hubId": "00", "deviceId": "01", "eventCode": "SELF_DESTRUCT", "timestamp": 1705314600}'),
    ("zigbee", "zigbee2mqtt/door_sensor_0", b"\xff\xfe not utf-8"),
    ("nvr", "nvr/alarms", b'{"eventType": "VMD"}'),  # missing fields
    ("idp", "idp/access", b"[1, 2, 3]"),
]


class Simulator:
    def __init__(self, sites: list[str], devices_per_family: int = 4, seed: int = 7, malformed: float = 0.0, internal: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.fleets = {site: SiteFleet(site, devices_per_family, random.Random(f"{seed}-{site}")) for site in sites}
        self.malformed = malformed
        self.internal = internal

    def messages(self, count: int | None = None, start: datetime | None = None, step: timedelta = timedelta(milliseconds=1)):
        """Device messages (and, with `internal`, internal events of family "edge") round-robin over sites,
        with strictly increasing event times (unique keys)."""
        now = start or utc_now()
        sites = list(self.fleets)
        n = 0
        while count is None or n < count:
            site = sites[n % len(sites)]
            if self.malformed and self.rng.random() < self.malformed:
                family, topic, raw = self.rng.choice(MALFORMED)
                yield DeviceMessage(site, family, topic, raw, now)
            elif self.internal and self.rng.random() < self.internal:
                yield self.fleets[site].internal(now)
            else:
                yield self.fleets[site].message(now)
            now += step
            n += 1

    def run(self, forwarders: dict, rate: float, duration: float = 0.0, stop: threading.Event | None = None, admin=None) -> int:
        """Publish at `rate` messages/s until `duration` (0 = until `stop`); returns how many were sent.

        Internal events go to `admin` (an `AdminClient`); the edge service stamps them with its own site."""
        stop = stop or threading.Event()
        started = time.monotonic()
        sent = 0
        for msg in self.messages(start=utc_now()):
            due = started + sent / rate
            if stop.wait(max(0.0, due - time.monotonic())) or (duration and time.monotonic() - started >= duration):
                break
            if msg.family != "edge":
                forwarders[msg.site_id].forward(msg.family, msg.topic, msg.raw, utc_now())
            elif admin is not None:
                try:
                    admin.emit(**json.loads(msg.raw))
                except (requests.RequestException, OSError) as exc:
                    log.warning("the edge service did not take an internal event: %s", exc)
            sent += 1
        return sent


def site_password(site_id: str) -> str | None:
    return os.environ.get("MQTT_PASSWORD_" + site_id.upper().replace("-", "_"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--devices", type=int, default=4, help="devices per family per site")
    parser.add_argument("--rate", type=float, default=5.0, help="messages per second, all sites together")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds; 0 runs until SIGTERM")
    parser.add_argument("--malformed", type=float, default=0.0, help="share of broken device messages (0-1)")
    parser.add_argument("--internal", type=float, default=0.0, help="share of internal events sent to the edge service at $EDGE_ADMIN_URL (0-1)")
    parser.add_argument("--state-dir", default=".simulator")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s simulator %(levelname)s %(message)s")

    from edge_bridge.cli import AdminClient
    from edge_bridge.forwarder import Forwarder

    sites = [f"site-{i:03d}" for i in range(1, args.sites + 1)]
    sim = Simulator(sites, args.devices, malformed=args.malformed, internal=args.internal)
    forwarders = {
        site: Forwarder.connect(site, args.host, args.port, Path(args.state_dir), password=site_password(site), known_devices=sim.fleets[site].known_devices())
        for site in sites
    }
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sent = sim.run(forwarders, args.rate, args.duration, stop, admin=AdminClient(timeout=10.0) if args.internal else None)
    for forwarder in forwarders.values():
        forwarder.close()
    log.info("sent %d device messages across %d sites", sent, len(sites))


if __name__ == "__main__":
    main()
