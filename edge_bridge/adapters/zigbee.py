"""ZigBee sensors through zigbee2mqtt: `zigbee2mqtt/<friendly_name>` with the device's state as JSON.

zigbee2mqtt publishes the whole state on every change, e.g. `{"contact": false, "battery": 91,
"linkquality": 120, "voltage": 2995}`, so a state is typed by the most urgent fact it holds: an alarm
that is on (leak, smoke, tamper), then a low battery, then what the sensor measures (contact, occupancy,
climate); a state with none of these (a dry leak sensor's report, battery and link quality alone) is a
`device_heartbeat`. The payload keeps every field. Availability comes on `zigbee2mqtt/<name>/availability`
(`{"state": "online"}`, or the legacy bare `online`) and becomes `device_online` / `device_offline`.
A state carries a time only when `last_seen` is enabled; otherwise the forwarder's receive time is the
event time (so the key is deterministic for a given message and receive time).
"""

from __future__ import annotations

from edge_bridge.adapters.base import AdapterRejected, decode_json_object, envelope, parse_time
from edge_bridge.envelope import Envelope, utc_now

SOURCE = "zigbee"
TOPIC_PREFIX = "zigbee2mqtt/"
AVAILABILITY_SUFFIX = "/availability"
# State fields and the catalog type (config/events.yaml) each one makes; first match wins.
ALARMS = [  # only when true
    ("water_leak", "water_leak"),
    ("smoke", "fire_alarm"),
    ("tamper", "tamper"),
    ("battery_low", "battery_low"),
]
FACTS = [  # whenever present
    ("contact", "contact"),
    ("occupancy", "occupancy"),
    ("temperature", "climate"),
    ("humidity", "climate"),
]
HEARTBEAT_FIELDS = {"battery", "voltage", "linkquality"} | {field for field, _ in ALARMS}
AVAILABILITY = {"online": "device_online", "offline": "device_offline"}


def adapt(site_id: str, topic: str, raw: bytes, received_at=None) -> Envelope:
    if not topic.startswith(TOPIC_PREFIX) or topic.startswith(TOPIC_PREFIX + "bridge/"):
        raise AdapterRejected("not_a_device_topic", topic)
    friendly_name = topic[len(TOPIC_PREFIX) :]
    if friendly_name.endswith(AVAILABILITY_SUFFIX):
        return _availability(site_id, topic, friendly_name[: -len(AVAILABILITY_SUFFIX)], raw, received_at)
    if not friendly_name or "/" in friendly_name:
        raise AdapterRejected("not_a_device_topic", topic)
    data = decode_json_object(raw)
    event_type = next((kind for key, kind in ALARMS if data.get(key) is True), None)
    event_type = event_type or next((kind for key, kind in FACTS if key in data), None)
    if event_type is None and HEARTBEAT_FIELDS & data.keys():
        event_type = "device_heartbeat"
    if event_type is None:
        raise AdapterRejected("unknown_event_type", f"zigbee state with keys {sorted(data)[:10]}")
    ts = parse_time(data["last_seen"], "last_seen") if data.get("last_seen") is not None else (received_at or utc_now())
    return envelope(site_id, SOURCE, event_type, f"zigbee-{friendly_name}", ts, dict(data))


def _availability(site_id: str, topic: str, friendly_name: str, raw: bytes, received_at) -> Envelope:
    if not friendly_name or "/" in friendly_name:
        raise AdapterRejected("not_a_device_topic", topic)
    legacy = raw.strip().decode("ascii", "replace")
    state = legacy if legacy in AVAILABILITY else decode_json_object(raw).get("state")
    event_type = AVAILABILITY.get(state) if isinstance(state, str) else None
    if event_type is None:
        raise AdapterRejected("unknown_event_type", f"zigbee availability {state!r}")
    return envelope(site_id, SOURCE, event_type, f"zigbee-{friendly_name}", received_at or utc_now(), {"state": state})
