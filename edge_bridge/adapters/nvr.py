"""NVR cameras: alarm notifications as network video recorders push them (Hikvision-style ISAPI JSON).

`{"ipAddress": "10.0.3.21", "macAddress": "44:19:b6:0a:11:02", "channelID": 4,
  "dateTime": "2024-01-15T10:30:00+01:00", "eventType": "VMD", "eventState": "active",
  "eventDescription": "Motion alarm"}`; line crossing and intrusion zone add `regionID`.
The recorder's alert stream also sends `videoloss` with `eventState` `inactive` every few seconds as its
keep-alive: that one is the recorder saying it is alive (`device_heartbeat`), not a lost signal.
"""

from __future__ import annotations

from edge_bridge.adapters.base import AdapterRejected, decode_json_object, envelope, parse_time, require
from edge_bridge.envelope import Envelope

SOURCE = "nvr"
# The recorder's event types and the catalog type each one is (config/events.yaml).
EVENT_TYPES = {
    "vmd": "motion",
    "linedetection": "line_crossing",
    "fielddetection": "intrusion_zone",
    "videoloss": "video_loss",
    "shelteralarm": "tamper",
    "tamperdetection": "tamper",
}
KEEPALIVE = ("videoloss", "inactive")


def adapt(site_id: str, topic: str, raw: bytes, received_at=None) -> Envelope:
    data = decode_json_object(raw)
    mac, channel, when, kind = require(data, "macAddress", "channelID", "dateTime", "eventType")
    kind, state = str(kind).lower(), str(data.get("eventState", "active")).lower()
    event_type = "device_heartbeat" if (kind, state) == KEEPALIVE else EVENT_TYPES.get(kind)
    if event_type is None:
        raise AdapterRejected("unknown_event_type", f"nvr eventType {kind!r}")
    try:
        channel = int(channel)
    except (TypeError, ValueError):
        raise AdapterRejected("invalid_field", f"channelID={channel!r}") from None
    payload = {
        "channel": channel,
        "state": data.get("eventState", "active"),
        "description": data.get("eventDescription"),
        "region_id": data.get("regionID"),
        "nvr_ip": data.get("ipAddress"),
    }
    device_id = f"nvr-{str(mac).replace(':', '').lower()}-ch{channel}"
    return envelope(site_id, SOURCE, event_type, device_id, parse_time(when, "dateTime"), payload)
