"""What every device adapter shares: decoding native bytes and the one way to refuse them.

An adapter turns one native device message into one envelope. It normalises; it does not filter:
anything it cannot turn into an envelope is refused with a stable reason (`AdapterRejected`), which
the forwarder quarantines and counts. Keys are deterministic: the same native message (and, for
messages that carry no time of their own, the same receive time) always yields the same
`idempotency_key`, while every call gets a fresh, time-ordered `event_id`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from edge_bridge import envelope as envelope_module
from edge_bridge.envelope import Envelope, EnvelopeRejected, make_idempotency_key

MAX_DEVICE_MESSAGE_BYTES = 4 * 1024 * 1024


class AdapterRejected(EnvelopeRejected):
    """A native device message that cannot become an envelope; `reason` is stable and countable."""


def decode_json_object(raw: bytes, max_bytes: int = MAX_DEVICE_MESSAGE_BYTES) -> dict[str, Any]:
    if len(raw) > max_bytes:
        raise AdapterRejected("too_large", f"{len(raw)} bytes (limit {max_bytes})")
    try:
        return envelope_module.decode_json_object(raw)
    except EnvelopeRejected as exc:
        raise AdapterRejected(exc.reason, exc.detail) from None


def require(data: dict[str, Any], *names: str) -> list[Any]:
    missing = [n for n in names if data.get(n) in (None, "")]
    if missing:
        raise AdapterRejected("missing_field", ", ".join(missing))
    return [data[n] for n in names]


def parse_time(value: Any, field: str) -> datetime:
    """ISO 8601 with an offset, or epoch seconds / milliseconds (devices use all three)."""
    try:
        if isinstance(value, bool):
            raise TypeError("boolean")
        if isinstance(value, (int, float)):
            seconds = value / 1000 if value > 1e11 else value
            return datetime.fromtimestamp(seconds, tz=UTC)
        ts = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except (TypeError, ValueError, OverflowError, OSError) as exc:
        raise AdapterRejected("bad_timestamp", f"{field}={value!r}: {exc}") from None
    if ts.tzinfo is None:
        raise AdapterRejected("bad_timestamp", f"{field}={value!r} has no UTC offset")
    return ts.astimezone(UTC)


def envelope(
    site_id: str, source: str, event_type: str, device_id: str, timestamp: datetime, payload: dict[str, Any]
) -> Envelope:
    try:
        return Envelope(
            idempotency_key=make_idempotency_key(site_id, device_id, event_type, timestamp),
            event_type=event_type,
            source=source,
            site_id=site_id,
            device_id=device_id,
            timestamp=timestamp,
            payload=payload,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise AdapterRejected("invalid_field", f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
