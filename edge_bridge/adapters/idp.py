"""IDP identity/access control: one door decision per message.

`{"eventId": "a9f3…", "occurredAt": "2024-01-15T10:30:00Z", "door": {"id": "door-456", "name": "Main"},
  "credential": {"type": "card", "id": "card-77"}, "decision": "granted", "reason": null}`
"""

from __future__ import annotations

from edge_bridge.adapters.base import AdapterRejected, decode_json_object, envelope, parse_time, require
from edge_bridge.envelope import Envelope

SOURCE = "idp"
DECISIONS = {"granted", "denied"}


def adapt(site_id: str, topic: str, raw: bytes, received_at=None) -> Envelope:
    data = decode_json_object(raw)
    when, door, credential, decision = require(data, "occurredAt", "door", "credential", "decision")
    if not isinstance(door, dict) or not door.get("id"):
        raise AdapterRejected("missing_field", "door.id")
    if not isinstance(credential, dict) or not credential.get("id"):
        raise AdapterRejected("missing_field", "credential.id")
    if str(decision).lower() not in DECISIONS:
        raise AdapterRejected("unknown_event_type", f"idp decision {decision!r}")
    payload = {
        "door": str(door["id"]),
        "door_name": door.get("name"),
        "credential_type": credential.get("type"),
        "credential": str(credential["id"]),
        "result": str(decision).lower(),
        "reason": data.get("reason"),
        "idp_event_id": data.get("eventId"),
    }
    return envelope(site_id, SOURCE, "door_access", f"idp-{door['id']}", parse_time(when, "occurredAt"), payload)
