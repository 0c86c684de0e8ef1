"""Ajax alarm hubs: security events as the hub reports them (arm/disarm, alarms, trouble, test reports).

Native shape (one JSON object per event, as relayed from the hub's event stream):
`{"hubId": "002A3F1C", "deviceId": "3B41F2", "deviceType": "MotionProtect", "eventCode": "INTRUSION",
  "room": "Lobby", "timestamp": 1705314600123, "userName": "J. Doe"}`
"""

from __future__ import annotations

from edge_bridge.adapters.base import AdapterRejected, decode_json_object, envelope, parse_time, require
from edge_bridge.envelope import Envelope

SOURCE = "ajax"
# The hub's event codes and the catalog type each one is (config/events.yaml).
EVENT_TYPES = {
    "ARM": "arm",
    "DISARM": "disarm",
    "NIGHT_MODE_ON": "arm",
    "INTRUSION": "intrusion_alert",
    "PANIC": "panic_button",
    "FIRE": "fire_alarm",
    "SMOKE": "fire_alarm",
    "LEAK": "water_leak",
    "TAMPER": "tamper",
    "TAMPER_OPEN": "tamper",
    # trouble codes and the hub's periodic test report
    "BATTERY_LOW": "battery_low",
    "CONNECTION_LOST": "device_offline",
    "CONNECTION_RESTORED": "device_online",
    "PERIODIC_TEST": "device_heartbeat",
}


def adapt(site_id: str, topic: str, raw: bytes, received_at=None) -> Envelope:
    data = decode_json_object(raw)
    hub_id, device_id, code, ts = require(data, "hubId", "deviceId", "eventCode", "timestamp")
    event_type = EVENT_TYPES.get(str(code).upper())
    if event_type is None:
        raise AdapterRejected("unknown_event_type", f"ajax eventCode {code!r}")
    payload = {
        "hub_id": str(hub_id),
        "event_code": str(code).upper(),
        "device_type": data.get("deviceType"),
        "room": data.get("room"),
        "user": data.get("userName"),
    }
    return envelope(site_id, SOURCE, event_type, f"ajax-{hub_id}-{device_id}", parse_time(ts, "timestamp"), payload)
