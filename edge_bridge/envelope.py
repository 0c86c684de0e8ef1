"""The wire contract: the one event envelope both the edge and the cloud speak.

It lives here because the edge produces it; `pipeline` imports it from here, so there is exactly one
definition. Consumers accept any minor version of a major they know and reject anything else with a
reason (`EnvelopeRejected`), which callers turn into a quarantine entry rather than a crash.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import uuid6
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SCHEMA_VERSION = "1.0"
SUPPORTED_MAJORS = frozenset({1})

ENVELOPE_FIELDS = (
    "schema_version",
    "event_id",
    "idempotency_key",
    "event_type",
    "source",
    "site_id",
    "device_id",
    "timestamp",
    "received_at",
    "payload",
)


class EnvelopeRejected(ValueError):
    """Raised when bytes on the wire cannot be a valid envelope; `reason` is stable and countable."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def new_event_id() -> str:
    """A fresh, time-ordered id (UUIDv7), so ids sort roughly by creation time."""
    return str(uuid6.uuid7())


def format_ts(ts: datetime) -> str:
    """RFC 3339 in UTC with a trailing Z, the contract's only timestamp spelling."""
    ts = ts.astimezone(timezone.utc)
    text = ts.isoformat(timespec="microseconds" if ts.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def make_idempotency_key(site_id: str, device_id: str, event_type: str, timestamp: datetime) -> str:
    """Deterministic: the same physical event always yields the same key (the seed's example shape)."""
    return f"{site_id}-{device_id}-{event_type}-{format_ts(timestamp)}"


class Envelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: str = SCHEMA_VERSION
    event_id: str = Field(default_factory=new_event_id, min_length=1, max_length=64)
    idempotency_key: str = Field(min_length=1, max_length=512)
    event_type: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    source: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    site_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    device_id: str = Field(min_length=1, max_length=256)
    timestamp: datetime
    received_at: datetime = Field(default_factory=utc_now)
    payload: dict[str, Any] = Field(default_factory=dict)

    @field_validator("schema_version")
    @classmethod
    def _known_major(cls, value: str) -> str:
        check_version(value)
        return value

    @field_validator("timestamp", "received_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("timestamp must carry a UTC offset (RFC 3339)")
        return value.astimezone(timezone.utc)

    def to_wire(self) -> dict[str, Any]:
        data = self.model_dump()
        data["timestamp"] = format_ts(self.timestamp)
        data["received_at"] = format_ts(self.received_at)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_wire(), separators=(",", ":"), ensure_ascii=False)

    @property
    def topic(self) -> str:
        return f"sites/{self.site_id}/events/{self.source}/{self.event_type}"


def check_version(version: str) -> None:
    major, dot, minor = version.partition(".")
    if not (dot and major.isdigit() and minor.isdigit()):
        raise EnvelopeRejected("bad_schema_version", f"{version!r} is not MAJOR.MINOR")
    if int(major) not in SUPPORTED_MAJORS:
        raise EnvelopeRejected("unsupported_major", f"schema_version {version} (known majors: {sorted(SUPPORTED_MAJORS)})")


def decode_json_object(raw: bytes | str) -> dict[str, Any]:
    """UTF-8 JSON that must be an object; refusals carry the same reasons at the edge and in the cloud."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EnvelopeRejected("not_utf8", str(exc)) from None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise EnvelopeRejected("bad_json", str(exc)) from None
    if not isinstance(data, dict):
        raise EnvelopeRejected("not_an_object", type(data).__name__)
    return data


def parse_envelope(raw: bytes | str) -> Envelope:
    """Validate bytes from the wire; every failure is an `EnvelopeRejected` with a short reason."""
    # Fast path: pydantic's own JSON parser, a third cheaper per event. Anything it refuses, or an
    # envelope without an explicit schema_version, takes the path below, which names the reason.
    try:
        envelope = Envelope.model_validate_json(raw)
    except ValidationError:
        envelope = None
    if envelope is not None and "schema_version" in envelope.model_fields_set:
        return envelope
    data = decode_json_object(raw)
    # The version gate runs first so an unknown major is reported as such, not as a field error.
    version = data.get("schema_version")
    if not isinstance(version, str):
        raise EnvelopeRejected("missing_schema_version")
    check_version(version)
    try:
        return Envelope.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "envelope"
        raise EnvelopeRejected("invalid_field", f"{where}: {first['msg']}") from None


class ClaimCheck(BaseModel):
    """What travels through SQS instead of an event too large for it: where the envelope waits in S3.

    The SQS body is `{"claim_check": {...}, "event_id": ..., "site_id": ...}`; the cloud side fetches
    the envelope from `s3://bucket/key` before validating it, so consumers never see the pointer.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    bucket: str = Field(min_length=1)
    key: str = Field(min_length=1)
    bytes: int = Field(ge=0)
    sha256: str = Field(min_length=64, max_length=64)


CLAIM_CHECK_FIELD = "claim_check"


def claim_check_pointer(body: str) -> ClaimCheck | None:
    """The pointer in an SQS body, or None for an ordinary envelope (checked without a full parse)."""
    if not body.startswith('{"' + CLAIM_CHECK_FIELD + '"'):
        return None
    try:
        return ClaimCheck.model_validate(json.loads(body)[CLAIM_CHECK_FIELD])
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise EnvelopeRejected("bad_claim_check", str(exc)[:200]) from None
