"""ZigBee devices through zigbee2mqtt: `zigbee2mqtt/<friendly_name>` with the device's state as JSON.

zigbee2mqtt publishes the whole state on every change, e.g. `{"contact": false, "battery": 91,
"linkquality": 120, "voltage": 2995}`, so a state is typed by the most urgent fact it holds:

1. an alarm that is on: an SOS/emergency button (`sos: true`, or an `action` of emergency/sos/panic) is a
   `panic_button`; then smoke (`fire_alarm`), leak, tamper;
2. what the device reports having just happened: a button's other `action`s (`button_press`), a siren's
   `alarm` on or off (`siren`);
3. a low battery;
4. what the device measures or switches: contact, occupancy, climate, a switch or plug's `state`
   (ON/OFF) and `power` (`switch_state`);
5. a state with none of these (a dry leak sensor's report: battery and link quality alone) is a
   `device_heartbeat`.

The payload keeps every field. Availability comes on `zigbee2mqtt/<name>/availability` (`{"state":
"online"}`, or the legacy bare `online`) and becomes `device_online` / `device_offline`. A friendly name
may hold `/` (zigbee2mqtt's groups of names). `zigbee2mqtt/bridge/…` is the bridge's own health and
requests, and `…/set`, `…/get` are commands to a device: neither is a device event (`topic_kind` says
which a topic is; the ZigBee ingress passes them by).

A state carries a time only when zigbee2mqtt's `last_seen` is enabled, in one of its formats: ISO 8601
(`2024-01-15T10:30:00.000Z`, or local with `+0100` / `+01:00`), epoch milliseconds, or a relative text
(`5 s ago`, `just now`). A `last_seen` that is none of these does not lose the state: the receive time is
the event time, as for a state without `last_seen` (so the key is deterministic for a given message and
receive time), and the payload keeps the value as sent.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from edge_bridge.adapters.base import AdapterRejected, decode_json_object, envelope, parse_time
from edge_bridge.envelope import Envelope, utc_now

SOURCE = "zigbee"
BASE_TOPIC = "zigbee2mqtt"
TOPIC_PREFIX = BASE_TOPIC + "/"
AVAILABILITY_SUFFIX = "/availability"
COMMAND_SEGMENTS = frozenset({"set", "get"})

# State fields and the catalog type (config/events.yaml) each one makes; first match wins.
ALARMS = [  # only when true
    ("sos", "panic_button"),
    ("smoke", "fire_alarm"),
    ("water_leak", "water_leak"),
    ("tamper", "tamper"),
    ("battery_low", "battery_low"),
]
URGENT_ALARMS = ALARMS[:-1]  # above a button's action; a low battery comes after what just happened
# A button's `action`: what it reports having been pressed. These mean someone calls for help.
PANIC_ACTIONS = frozenset({"emergency", "sos", "panic"})
ACTIONS = [("emergency", "panic_button"), ("single", "button_press")]  # a sample per type, for the catalog tests
FACTS = [  # whenever present
    ("contact", "contact"),
    ("occupancy", "occupancy"),
    ("temperature", "climate"),
    ("humidity", "climate"),
    ("power", "switch_state"),
]
SIREN_FIELD = "alarm"  # a siren's state: sounding (true) or not (false)
SWITCH_STATES = frozenset({"ON", "OFF"})  # a switch, plug or light's `state`
HEARTBEAT_FIELDS = {"battery", "voltage", "linkquality"} | {field for field, _ in ALARMS}
AVAILABILITY = {"online": "device_online", "offline": "device_offline"}


def topic_kind(topic: str, base: str = BASE_TOPIC) -> tuple[str, str]:
    """What a zigbee2mqtt topic carries, and the part after the base topic.

    `state`, `availability` (device events), `bridge` (the bridge's own health and requests),
    `command` (`…/set`, `…/get`: sent to a device, not by it) or `foreign` (not under `base`)."""
    prefix = base.rstrip("/") + "/"
    if not topic.startswith(prefix):
        return "foreign", topic
    rest = topic[len(prefix) :]
    segments = rest.split("/")
    if segments[0] == "bridge":
        return "bridge", rest
    if any(s in COMMAND_SEGMENTS for s in segments[1:]):
        return "command", rest
    if len(segments) > 1 and segments[-1] == "availability":
        return "availability", rest
    return "state", rest


def adapt(site_id: str, topic: str, raw: bytes, received_at=None) -> Envelope:
    received_at = received_at or utc_now()
    kind, rest = topic_kind(topic)
    if kind not in ("state", "availability") or not all(rest.split("/")):
        raise AdapterRejected("not_a_device_topic", topic)
    if kind == "availability":
        return _availability(site_id, rest[: -len(AVAILABILITY_SUFFIX)], raw, received_at)
    data = decode_json_object(raw)
    event_type = state_type(data)
    if event_type is None:
        raise AdapterRejected("unknown_event_type", f"zigbee state with keys {sorted(data)[:10]}")
    ts = last_seen(data.get("last_seen"), received_at)
    return envelope(site_id, SOURCE, event_type, f"zigbee-{rest}", ts, dict(data))


def state_type(data: dict[str, Any]) -> str | None:
    """The catalog type of one state report: its most urgent fact (see the module's docstring)."""
    action = data.get("action")
    action = action.strip().lower() if isinstance(action, str) else None
    if action in PANIC_ACTIONS:
        return "panic_button"
    for field, kind in URGENT_ALARMS:
        if data.get(field) is True:
            return kind
    if action:
        return "button_press"
    if isinstance(data.get(SIREN_FIELD), bool):
        return "siren"
    if data.get("battery_low") is True:
        return "battery_low"
    for field, kind in FACTS:
        if field in data:
            return kind
    if data.get("state") in SWITCH_STATES:
        return "switch_state"
    if HEARTBEAT_FIELDS & data.keys():
        return "device_heartbeat"
    return None


_RELATIVE = re.compile(
    r"^(\d+(?:\.\d+)?)\s*(ms|milliseconds?|s|secs?|seconds?|m|mins?|minutes?|h|hrs?|hours?|d|days?)\s+ago$", re.I
)


def last_seen(value: Any, received_at: datetime) -> datetime:
    """The event time `last_seen` gives, in any of zigbee2mqtt's formats; the receive time when there is none
    or it cannot be read (a state is never refused for its clock)."""
    if value is None or isinstance(value, bool) or value == "":
        return received_at
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            value = int(text)
        elif text.lower() in ("now", "just now"):
            return received_at
        elif match := _RELATIVE.match(text):
            return received_at - timedelta(seconds=float(match.group(1)) * _unit_seconds(match.group(2).lower()))
    try:
        return parse_time(value, "last_seen")
    except AdapterRejected:
        return received_at


def _unit_seconds(unit: str) -> float:
    if unit == "ms" or unit.startswith("milli"):
        return 0.001
    if unit.startswith("s"):
        return 1
    if unit.startswith("m"):
        return 60
    if unit.startswith("h"):
        return 3600
    return 86400


def _availability(site_id: str, friendly_name: str, raw: bytes, received_at: datetime) -> Envelope:
    state = availability_state(raw)
    event_type = AVAILABILITY.get(state) if isinstance(state, str) else None
    if event_type is None:
        raise AdapterRejected("unknown_event_type", f"zigbee availability {state!r}")
    return envelope(site_id, SOURCE, event_type, f"zigbee-{friendly_name}", received_at, {"state": state})


def availability_state(raw: bytes) -> Any:
    """`online` / `offline` from either payload zigbee2mqtt uses (legacy plain text, or `{"state": …}`)."""
    legacy = raw.strip().decode("ascii", "replace")
    return legacy if legacy in AVAILABILITY else decode_json_object(raw).get("state")
