"""ZigBee sensors through zigbee2mqtt: `zigbee2mqtt/<friendly_name>` with the device's state as JSON.

zigbee2mqtt publishes the whole state on every change, e.g. `{"contact": false, "battery": 91,
"linkquality": 120, "voltage": 2995}`. The event type is the fact that state is about (contact,
occupancy, water leak, climate, else battery, else link quality); the payload keeps every field.
It carries a time only when `last_seen` is enabled; otherwise the forwarder's receive time is the
event time (so the key is deterministic for a given message and receive time).
"""

from __future__ import annotations

from edge_bridge.adapters.base import AdapterRejected, decode_json_object, envelope, parse_time
from edge_bridge.envelope import Envelope, utc_now

SOURCE = "zigbee"
TOPIC_PREFIX = "zigbee2mqtt/"
# First match wins: the most specific fact a state message reports.
FACTS = [
    ("water_leak", "water_leak"),
    ("smoke", "smoke"),
    ("contact", "contact"),
    ("occupancy", "occupancy"),
    ("temperature", "climate"),
    ("humidity", "climate"),
    ("battery", "battery"),
    ("linkquality", "link_quality"),
]


def adapt(site_id: str, topic: str, raw: bytes, received_at=None) -> Envelope:
    if not topic.startswith(TOPIC_PREFIX) or topic.startswith(TOPIC_PREFIX + "bridge/"):
        raise AdapterRejected("not_a_device_topic", topic)
    friendly_name = topic[len(TOPIC_PREFIX) :]
    if not friendly_name or "/" in friendly_name:
        raise AdapterRejected("not_a_device_topic", topic)
    data = decode_json_object(raw)
    event_type = next((kind for key, kind in FACTS if key in data), None)
    if event_type is None:
        raise AdapterRejected("unknown_event_type", f"zigbee state with keys {sorted(data)[:10]}")
    ts = parse_time(data["last_seen"], "last_seen") if data.get("last_seen") is not None else (received_at or utc_now())
    return envelope(site_id, SOURCE, event_type, f"zigbee-{friendly_name}", ts, dict(data))
