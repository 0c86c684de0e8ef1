"""Ajax alarm hubs: security events as the hub reports them (arm/disarm, alarms, trouble, test reports).

A hub reports to a monitoring station over SIA DC-09 (`edge_bridge.ingress.sia` receives it): SIA-DCS
frames carry a two-letter SIA event code (`Nri1/BA003`: area 1, burglary alarm, zone 3), ADM-CID frames
an Ademco Contact ID event (`1130 01 003`: qualifier 1 new event / 3 restore, event 130 burglary,
partition 01, zone 3). `adapt_sia` turns one parsed frame into one envelope; the code tables below say
which catalog type (config/events.yaml) each code is.

A restoral says an alarm or trouble condition is over. The catalog has no restore types, so, as the
ZigBee adapter does with an alarm field that turned false, a restoral is a `device_heartbeat` (payload
`restore: true`, `restores: <type>`); a communication restoral is the device answering again,
`device_online`.

The older relayed-JSON shape is still read by `adapt` (one JSON object per event):
`{"hubId": "002A3F1C", "deviceId": "3B41F2", "deviceType": "MotionProtect", "eventCode": "INTRUSION",
  "room": "Lobby", "timestamp": 1705314600123, "userName": "J. Doe"}`
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from edge_bridge.adapters.base import AdapterRejected, decode_json_object, envelope, parse_time, require
from edge_bridge.envelope import Envelope, format_ts, utc_now

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

# SIA-DCS event codes (SIA DC-03) and the catalog type each one is.
SIA_EVENT_TYPES = {
    "BA": "intrusion_alert",  # burglary alarm
    "BV": "intrusion_alert",  # burglary verified
    "BT": "intrusion_alert",  # burglary trouble (a detector disabled by a fault)
    "FA": "fire_alarm",
    "KA": "fire_alarm",  # heat alarm
    "PA": "panic_button",
    "HA": "panic_button",  # hold-up (duress)
    "MA": "panic_button",  # medical alarm: a Button in medical mode
    "QA": "panic_button",  # emergency alarm
    "WA": "water_leak",
    "TA": "tamper",
    "YT": "battery_low",  # system battery trouble
    "YM": "battery_low",  # system battery missing
    "XT": "battery_low",  # a detector's (transmitter's) battery low
    "RP": "device_heartbeat",  # automatic (periodic) test
    "RX": "device_heartbeat",  # manual test
    "YS": "device_offline",  # communication trouble
    "YC": "device_offline",  # communication fail
    "CL": "arm",  # closing report
    "CA": "arm",  # automatic closing
    "CG": "arm",  # area closed
    "CQ": "arm",  # remote closing (the app)
    "NL": "arm",  # perimeter armed: night mode
    "OP": "disarm",  # opening report
    "OA": "disarm",  # automatic opening
    "OG": "disarm",  # area opened
    "OQ": "disarm",  # remote opening (the app)
    "NP": "disarm",  # night mode off
}
# SIA-DCS restoral codes and the type whose condition each one ends.
SIA_RESTORALS = {
    "BR": "intrusion_alert",
    "BH": "intrusion_alert",
    "BJ": "intrusion_alert",  # burglary trouble restore
    "FH": "fire_alarm",
    "FR": "fire_alarm",
    "KH": "fire_alarm",
    "PH": "panic_button",
    "HH": "panic_button",
    "MH": "panic_button",
    "QH": "panic_button",
    "WH": "water_leak",
    "TR": "tamper",
    "YR": "battery_low",
    "XR": "battery_low",
    "YK": "device_offline",
}

# ADM-CID (Contact ID) event codes: the type of a new event (qualifier 1); a restore (qualifier 3) ends it.
CID_EVENT_TYPES = {
    "100": "panic_button",  # medical
    "110": "fire_alarm",
    "111": "fire_alarm",  # smoke
    "114": "fire_alarm",  # heat
    "117": "fire_alarm",  # flame
    "120": "panic_button",
    "121": "panic_button",  # duress
    "122": "panic_button",  # silent panic
    "123": "panic_button",  # audible panic
    "130": "intrusion_alert",
    "131": "intrusion_alert",  # perimeter
    "132": "intrusion_alert",  # interior
    "133": "intrusion_alert",  # 24 hour
    "134": "intrusion_alert",  # entry/exit
    "139": "intrusion_alert",  # verified
    "137": "tamper",
    "144": "tamper",  # sensor tamper
    "145": "tamper",  # expansion module tamper
    "383": "tamper",  # sensor tamper (trouble)
    "154": "water_leak",
    "302": "battery_low",  # low system battery
    "309": "battery_low",  # battery test failure
    "311": "battery_low",  # battery missing
    "384": "battery_low",  # a wireless detector's battery low
    "350": "device_offline",  # communication trouble
    "354": "device_offline",  # failure to communicate
    "381": "device_offline",  # a wireless detector lost (supervision)
    "601": "device_heartbeat",  # manual test
    "602": "device_heartbeat",  # periodic test
}
# Open/close events: qualifier 1 is an opening (disarm), 3 a closing (arm).
CID_OPEN_CLOSE = frozenset({"400", "401", "402", "403", "407", "408", "409", "441"})
CID_NEW, CID_RESTORE = "1", "3"
# Contact ID's three-digit number is a user for these events and a zone for the others (000: the hub).
CID_USER_EVENTS = CID_OPEN_CLOSE | {"121", "601"}

# How the library names what a code's number refers to (pysiaalarm's SIA code table, `concerns`).
_ZONE_CONCERNS = frozenset({"Zone or point", "Zone number", "Point number"})
_USER_CONCERNS = frozenset({"User number", "User"})
_NUMBER = re.compile(r"^(\d+)(.*)$", re.S)


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


def sia_event_type(
    protocol: str, code: str | None, cid_qualifier: str | None = None, cid_event: str | None = None
) -> tuple[str, str | None]:
    """The catalog type of one frame's event and, for a restoral, the type whose condition it ends."""
    if protocol == "ADM-CID":
        if cid_event in CID_OPEN_CLOSE and cid_qualifier in (CID_NEW, CID_RESTORE):
            return ("disarm" if cid_qualifier == CID_NEW else "arm"), None
        kind = CID_EVENT_TYPES.get(cid_event or "")
        if kind == "device_heartbeat" or (kind and cid_qualifier == CID_NEW):
            return kind, None
        if kind and cid_qualifier == CID_RESTORE:
            return _restoral(kind), kind
        raise AdapterRejected("unknown_event_type", f"ADM-CID event {cid_qualifier}{cid_event} (code {code})")
    if code in SIA_EVENT_TYPES:
        return SIA_EVENT_TYPES[code], None
    if code in SIA_RESTORALS:
        return _restoral(SIA_RESTORALS[code]), SIA_RESTORALS[code]
    raise AdapterRejected("unknown_event_type", f"{protocol} code {code!r}")


def _restoral(restores: str) -> str:
    return "device_online" if restores == "device_offline" else "device_heartbeat"


def adapt_sia(site_id: str, event: Any, received_at: datetime | None = None) -> Envelope:
    """One parsed, checked DC-09 frame (a pysiaalarm `SIAEvent`) as an envelope.

    The device is the hub (`ajax-<account>`) or, for a code about a zone, that zone's detector
    (`ajax-<account>-zone-<n>`). The event time is the frame's timestamp (UTC by the standard), else the
    receive time. `idempotency_key` and `event_id` are derived from account, sequence and timestamp, so
    a hub resending a frame it got no ACK for yields the very same event, which the cloud de-duplicates.
    """
    received_at = received_at or utc_now()
    protocol = getattr(event.message_type, "value", str(event.message_type))
    account = str(event.account or "").upper()
    code = event.code
    event_type, restores = sia_event_type(protocol, code, event.event_qualifier, event.event_type)
    if protocol == "ADM-CID":
        number, text, area = _int(event.ri), None, _int(event.partition)
        is_user = event.event_type in CID_USER_EVENTS
        is_zone = not is_user
    else:
        number, text = _split_number(event.message)
        area = _int(event.ri)
        concerns = event.sia_code.concerns if event.sia_code is not None else ""
        is_user, is_zone = concerns in _USER_CONCERNS, concerns in _ZONE_CONCERNS
    zone = number if is_zone and number else None
    user = number if is_user else _int(event.id)
    device_id = f"ajax-{account}-zone-{zone}" if zone else f"ajax-{account}"

    timestamp = event.timestamp if isinstance(event.timestamp, datetime) else received_at
    key = f"{site_id}-{SOURCE}-{account}-{event.sequence}-{format_ts(timestamp)}"
    payload: dict[str, Any] = {
        "protocol": protocol,
        "account": account,
        "sequence": event.sequence,
        "code": code,
        "description": event.sia_code.type if event.sia_code is not None else None,
        "area": area,
        "zone": zone,
        "user": user,
        "restore": restores is not None,
        "encrypted": bool(event.encrypted),
    }
    if restores is not None:
        payload["restores"] = restores
    if protocol == "ADM-CID":
        payload["contact_id"] = f"{event.event_qualifier}{event.event_type}"
    if text:
        payload["text"] = text
    extended = {x.identifier: x.value for x in (event.extended_data or []) if x.identifier != "K"}  # K would be a key
    if extended:
        payload["extended_data"] = extended
    try:
        return Envelope(
            event_id=frame_event_id(key, timestamp),
            idempotency_key=key,
            event_type=event_type,
            source=SOURCE,
            site_id=site_id,
            device_id=device_id,
            timestamp=timestamp,
            received_at=received_at,
            payload=payload,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise AdapterRejected("invalid_field", f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def frame_event_id(key: str, timestamp: datetime) -> str:
    """A UUIDv7 whose time is the frame's and whose random bits come from its key: time-ordered like every
    event id, yet the same for a resent frame, so the cloud's (site_id, event_id) dedupe drops the copy."""
    millis = int(timestamp.timestamp() * 1000) & ((1 << 48) - 1)
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:10], "big")
    value = millis << 80 | 0x7 << 76 | (digest >> 62 & 0xFFF) << 64 | 0b10 << 62 | digest & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def _split_number(message: str | None) -> tuple[int | None, str | None]:
    """`003` -> (3, None); `501^VX FRONTE ^` -> (501, '^VX FRONTE ^'): the number after the code, then any text."""
    if not message:
        return None, None
    match = _NUMBER.match(message)
    if not match:
        return None, message
    return int(match.group(1)), (match.group(2) or None)
