"""NVR cameras: Hikvision ISAPI event notifications (`EventNotificationAlert`), as recorders post them to
their "alarm host" (`edge_bridge.ingress.http` receives them), in XML or JSON:

    <EventNotificationAlert version="2.0" xmlns="http://www.hikvision.com/ver20/XMLSchema">
      <ipAddress>10.0.3.21</ipAddress><macAddress>44:19:b6:0a:11:02</macAddress><channelID>4</channelID>
      <dateTime>2024-01-15T11:30:00+01:00</dateTime><activePostCount>1</activePostCount>
      <eventType>linedetection</eventType><eventState>active</eventState>
      <eventDescription>linedetection alarm</eventDescription>
      <DetectionRegionList><DetectionRegionEntry><regionID>2</regionID>…</DetectionRegionEntry></DetectionRegionList>
    </EventNotificationAlert>

The JSON form has the same names (`{"ipAddress": …, "channelID": 4, "eventType": "VMD", …}`), flat or
inside `{"EventNotificationAlert": {…}}`. XML is parsed with defusedxml: no entity expansion, no DTD,
no external references, whatever a sender puts in.
The recorder also sends `videoloss` with `eventState` `inactive` every few seconds as its keep-alive:
that one is the recorder saying it is alive (`device_heartbeat`), not a lost signal.
"""

from __future__ import annotations

import json
from typing import Any

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from edge_bridge.adapters.base import (
    MAX_DEVICE_MESSAGE_BYTES,
    AdapterRejected,
    decode_json_object,
    envelope,
    parse_time,
    require,
)
from edge_bridge.envelope import Envelope

SOURCE = "nvr"
ROOT = "EventNotificationAlert"
# The recorder's event types and the catalog type each one is (config/events.yaml).
EVENT_TYPES = {
    "vmd": "motion",
    "linedetection": "line_crossing",
    "fielddetection": "intrusion_zone",
    "regionentrance": "intrusion_zone",
    "regionexiting": "intrusion_zone",
    "videoloss": "video_loss",
    "shelteralarm": "tamper",
    "tamperdetection": "tamper",
    "scenechangedetection": "tamper",
}
KEEPALIVE = ("videoloss", "inactive")
# Scalar fields kept from a notification (the rest, coordinates and picture lists, stays out of the envelope).
FIELDS = (
    "ipAddress",
    "macAddress",
    "channelID",
    "dynChannelID",
    "dateTime",
    "activePostCount",
    "eventType",
    "eventState",
    "eventDescription",
    "channelName",
    "regionID",
)


def read_notification(raw: bytes) -> dict[str, Any]:
    """An `EventNotificationAlert` (XML or JSON) as a dict of its scalar fields; AdapterRejected when it
    cannot be read at all (the HTTP ingress answers that with a 400)."""
    if len(raw) > MAX_DEVICE_MESSAGE_BYTES:
        raise AdapterRejected("too_large", f"{len(raw)} bytes (limit {MAX_DEVICE_MESSAGE_BYTES})")
    if raw.lstrip()[:1] == b"<":
        return _read_xml(raw)
    data = decode_json_object(raw)
    inner = data.get(ROOT)
    return inner if isinstance(inner, dict) else data


def _read_xml(raw: bytes) -> dict[str, Any]:
    try:
        root = SafeET.fromstring(raw, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise AdapterRejected("forbidden_xml", f"{type(exc).__name__}: {exc}"[:300]) from None
    except (SafeET.ParseError, ValueError, RecursionError) as exc:
        raise AdapterRejected("bad_xml", f"{type(exc).__name__}: {exc}"[:300]) from None
    if _local(root.tag) != ROOT:
        raise AdapterRejected("bad_xml", f"root element {_local(root.tag)!r}, not {ROOT}")
    data: dict[str, Any] = {}
    for element in root.iter():
        name = _local(element.tag)
        if name in FIELDS and name not in data and len(element) == 0:
            data[name] = (element.text or "").strip()
    return data


def _local(tag: Any) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def adapt(site_id: str, topic: str, raw: bytes, received_at=None) -> Envelope:
    data = read_notification(raw)
    if data.get("channelID") in (None, "") and data.get("dynChannelID") not in (None, ""):
        data["channelID"] = data["dynChannelID"]
    mac, channel, when, kind = require(data, "macAddress", "channelID", "dateTime", "eventType")
    kind, state = str(kind).lower(), str(data.get("eventState") or "active").lower()
    event_type = "device_heartbeat" if (kind, state) == KEEPALIVE else EVENT_TYPES.get(kind)
    if event_type is None:
        raise AdapterRejected("unknown_event_type", f"nvr eventType {kind!r}")
    try:
        channel = int(channel)
    except (TypeError, ValueError):
        raise AdapterRejected("invalid_field", f"channelID={channel!r}") from None
    payload = {
        "channel": channel,
        "state": data.get("eventState") or "active",
        "description": data.get("eventDescription"),
        "region_id": _int_or_none(data.get("regionID")),
        "nvr_ip": data.get("ipAddress"),
        "channel_name": data.get("channelName"),
        "active_post_count": _int_or_none(data.get("activePostCount")),
    }
    device_id = f"nvr-{str(mac).replace(':', '').replace('-', '').lower()}-ch{channel}"
    return envelope(
        site_id,
        SOURCE,
        event_type,
        device_id,
        parse_time(when, "dateTime"),
        {k: v for k, v in payload.items() if v is not None},
    )


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def to_xml(data: dict[str, Any]) -> bytes:
    """A notification as a recorder posts it in XML (the simulator's and the tests' NVR)."""
    from xml.sax.saxutils import escape

    inner = "".join(
        f"<{k}>{escape(str(v))}</{k}>" for k, v in data.items() if v is not None and k in FIELDS and k != "regionID"
    )
    if data.get("regionID") is not None:
        inner += f"<DetectionRegionList><DetectionRegionEntry><regionID>{int(data['regionID'])}</regionID></DetectionRegionEntry></DetectionRegionList>"
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<{ROOT} version="2.0" xmlns="http://www.hikvision.com/ver20/XMLSchema">{inner}</{ROOT}>'.encode()


def to_json(data: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in data.items() if v is not None}).encode("utf-8")
