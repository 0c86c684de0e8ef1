"""The wire contract: the one event envelope both the edge and the cloud speak.

It lives here because the edge produces it; `pipeline` imports it from here, so there is exactly one
definition. Consumers accept any minor version of a major they know and reject anything else with a
reason (`EnvelopeRejected`), which callers turn into a quarantine entry rather than a crash.

What is bad is said here, once, with a stable reason each (see `REJECTION_REASONS`): whatever bytes
arrive, `parse_envelope` returns an `Envelope` or raises `EnvelopeRejected`, nothing else. Nesting is
measured on the raw text before any recursive parser sees it, so no input can overflow a stack
further down (the partner transform, pickling between drain ops, DuckDB's JSON).
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import uuid6
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

SCHEMA_VERSION = "1.0"
SUPPORTED_MAJORS = frozenset({1})

# The documented bounds of the contract.
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024  # an envelope's JSON; larger travels nowhere (Mosquitto refuses it too)
MAX_PAYLOAD_DEPTH = 32  # `payload` itself is level 1; deeper nesting is `too_deep`
MAX_CLOCK_SKEW = timedelta(hours=1)  # event time may be this far ahead of `received_at`, no more

# Every reason `parse_envelope` can give, with what it means (the runbook lists them too).
REJECTION_REASONS = {
    "not_utf8": "the bytes are not UTF-8",
    "bad_json": "not JSON (or a number JSON cannot carry)",
    "not_an_object": "JSON, but not an object",
    "too_large": f"over {MAX_ENVELOPE_BYTES} bytes",
    "too_deep": f"payload nested deeper than {MAX_PAYLOAD_DEPTH} levels",
    "non_finite_number": "NaN or Infinity (JSON has no such numbers)",
    "invalid_unicode": "a string with a lone surrogate (not encodable as UTF-8)",
    "missing_schema_version": "no schema_version",
    "bad_schema_version": "schema_version is not MAJOR.MINOR",
    "unsupported_major": "a major version this code does not know",
    "reserved_field": "a field only the pipeline may set (claim_check) sent by a device",
    "control_characters": "control characters (CR, LF, NUL, ...) in an id",
    "bad_timestamp": "timestamp/received_at is not an RFC 3339 string with an offset",
    "future_timestamp": f"event time more than {MAX_CLOCK_SKEW} ahead of received_at (or received_at ahead of this clock)",
    "invalid_field": "a missing field or one of the wrong type or shape",
    "unreadable": "the parser failed in a way no other reason covers (the detail names the exception)",
}

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
    return datetime.now(UTC)


def new_event_id() -> str:
    """A fresh, time-ordered id (UUIDv7), so ids sort roughly by creation time."""
    return str(uuid6.uuid7())


def format_ts(ts: datetime) -> str:
    """RFC 3339 in UTC with a trailing Z, the contract's only timestamp spelling."""
    ts = ts.astimezone(UTC)
    text = ts.isoformat(timespec="microseconds" if ts.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def make_idempotency_key(site_id: str, device_id: str, event_type: str, timestamp: datetime) -> str:
    """Deterministic: the same physical event always yields the same key (the seed's example shape)."""
    return f"{site_id}-{device_id}-{event_type}-{format_ts(timestamp)}"


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:[Zz]|[+-]\d{2}:\d{2})")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Reasons raised inside validation (as pydantic custom error types), reported as themselves.
_VALIDATION_REASONS = frozenset(
    {"bad_timestamp", "control_characters", "future_timestamp", "too_deep", "non_finite_number", "invalid_unicode"}
)


def check_json_tree(value: Any, max_depth: int = MAX_PAYLOAD_DEPTH) -> None:
    """Walk decoded JSON without recursion: depth, finite numbers, encodable strings.

    Raises `PydanticCustomError` (so it can run inside validation); `parse_envelope` reports its type as
    the reason. `value` itself is level 1.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > max_depth:
                raise PydanticCustomError("too_deep", "nested deeper than {limit} levels", {"limit": max_depth})
            for key, child in item.items():
                _check_string(key)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth > max_depth:
                raise PydanticCustomError("too_deep", "nested deeper than {limit} levels", {"limit": max_depth})
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise PydanticCustomError("non_finite_number", "{value} is not a JSON number", {"value": repr(item)})
        elif isinstance(item, str):
            _check_string(item)


def _check_string(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise PydanticCustomError("invalid_unicode", "a string holds a lone surrogate") from None


class Envelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: str = SCHEMA_VERSION
    # Ids travel into S3 keys, HTTP headers and SQL: visible ASCII with no separators of any of those.
    event_id: str = Field(
        default_factory=new_event_id, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$"
    )
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

    @field_validator("event_id", "idempotency_key", "event_type", "source", "site_id", "device_id", mode="before")
    @classmethod
    def _no_control_characters(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and _CONTROL.search(value):
            raise PydanticCustomError(
                "control_characters", "{field} holds control characters", {"field": info.field_name}
            )
        return value

    @field_validator("timestamp", "received_at", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any, info: ValidationInfo) -> Any:
        """Only the contract's spelling: pydantic alone would take epoch numbers and other forms."""
        if isinstance(value, datetime) and value.tzinfo is not None:
            return value
        if isinstance(value, str) and _RFC3339.fullmatch(value):
            return value
        raise PydanticCustomError(
            "bad_timestamp",
            "{field} must be an RFC 3339 string with an offset, got {got}",
            {"field": info.field_name, "got": repr(value)[:40]},
        )

    @field_validator("timestamp", "received_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @field_validator("payload")
    @classmethod
    def _payload_tree(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_json_tree(value)
        return value

    @model_validator(mode="after")
    def _not_from_the_future(self) -> Envelope:
        """A clock far ahead would hold an event in the archive's landing area until its hour opens."""
        if self.timestamp > self.received_at + MAX_CLOCK_SKEW:
            raise PydanticCustomError(
                "future_timestamp",
                "timestamp {ts} is more than {skew} ahead of received_at",
                {"ts": format_ts(self.timestamp), "skew": str(MAX_CLOCK_SKEW)},
            )
        if self.received_at > utc_now() + MAX_CLOCK_SKEW:
            raise PydanticCustomError(
                "future_timestamp", "received_at {ts} is ahead of this clock", {"ts": format_ts(self.received_at)}
            )
        return self

    @property
    def key(self) -> tuple[str, str]:
        """The identity the cloud de-duplicates by: an event id is only unique within its site."""
        return (self.site_id, self.event_id)

    @property
    def dedupe_id(self) -> str:
        """`key` as one string (webhook ids, single-column keys); '/' appears in neither part."""
        return f"{self.site_id}/{self.event_id}"

    def to_wire(self) -> dict[str, Any]:
        data = self.model_dump()
        data["timestamp"] = format_ts(self.timestamp)
        data["received_at"] = format_ts(self.received_at)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_wire(), separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    @property
    def topic(self) -> str:
        return f"sites/{self.site_id}/events/{self.source}/{self.event_type}"


def check_version(version: str) -> None:
    major, dot, minor = version.partition(".")
    if not (dot and major.isdigit() and minor.isdigit()):
        raise EnvelopeRejected("bad_schema_version", f"{version!r} is not MAJOR.MINOR")
    if int(major) not in SUPPORTED_MAJORS:
        raise EnvelopeRejected(
            "unsupported_major", f"schema_version {version} (known majors: {sorted(SUPPORTED_MAJORS)})"
        )


def _raw_text(raw: bytes | str) -> str:
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise EnvelopeRejected("too_large", f"{len(raw)} bytes (limit {MAX_ENVELOPE_BYTES})")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EnvelopeRejected("not_utf8", str(exc)) from None
    return raw


_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def nesting_depth_exceeds(text: str, limit: int) -> bool:
    """Whether JSON text nests deeper than `limit`, counted on the text itself, without recursion.

    Brackets inside strings do not count. Text with no more than `limit` brackets in all cannot nest
    deeper, which settles nearly every real message with two `count` calls.
    """
    if text.count("{") + text.count("[") <= limit:
        return False
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in "{[":
            depth += 1
            if depth > limit:
                return True
        elif token in "}]":
            depth -= 1
    return False


def _non_finite(token: str) -> float:
    raise EnvelopeRejected("non_finite_number", f"{token} is not a JSON number")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise EnvelopeRejected("non_finite_number", f"{token[:40]} overflows a double")
    return value


def decode_json_object(raw: bytes | str, max_depth: int = MAX_PAYLOAD_DEPTH + 1) -> dict[str, Any]:
    """UTF-8 JSON that must be an object; refusals carry the same reasons at the edge and in the cloud.

    `max_depth` counts the object itself as level 1; it is checked before the (recursive) decoder runs.
    """
    text = _raw_text(raw)
    if nesting_depth_exceeds(text, max_depth):
        raise EnvelopeRejected("too_deep", f"nested deeper than {max_depth - 1} levels below the envelope")
    try:
        data = json.loads(text, parse_constant=_non_finite, parse_float=_finite_float)
    except EnvelopeRejected:
        raise
    except ValueError as exc:  # includes integers too long for int()
        raise EnvelopeRejected("bad_json", str(exc)[:200]) from None
    except RecursionError:  # cannot happen below the depth bound; kept so no input escapes as a crash
        raise EnvelopeRejected("too_deep", "the JSON decoder ran out of stack") from None
    if not isinstance(data, dict):
        raise EnvelopeRejected("not_an_object", type(data).__name__)
    return data


_ALL_FIELDS = frozenset(ENVELOPE_FIELDS)
_NO_CONTROL = "^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"
_RFC3339_PATTERN = r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:[Zz]|[+-]\d{2}:\d{2})$"


class _WireEnvelope(BaseModel):
    """The hot path's view of the wire: every check pydantic's core can make by itself (patterns,
    lengths, types), no Python validator per field. It accepts a subset of what `Envelope` accepts;
    anything it refuses goes the reasoned way, which decides."""

    model_config = ConfigDict(extra="ignore")

    schema_version: str = Field(pattern=r"^1\.\d+$")
    event_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$")
    idempotency_key: str = Field(min_length=1, max_length=512, pattern=_NO_CONTROL)
    event_type: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    source: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    site_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    device_id: str = Field(min_length=1, max_length=256, pattern=_NO_CONTROL)
    timestamp: str = Field(pattern=_RFC3339_PATTERN)
    received_at: str = Field(pattern=_RFC3339_PATTERN)
    payload: dict[str, Any] = Field(default_factory=dict)


def _fast_parse(text: str) -> Envelope | None:
    """An `Envelope` for text that passes every check on the cheap path, else None (decide the slow way).

    The hot path of the edge: about 7 us an event against 12 us through `Envelope`'s own validators.
    """
    try:
        wire = _WireEnvelope.model_validate_json(text)
        timestamp = datetime.fromisoformat(wire.timestamp).astimezone(UTC)
        received_at = datetime.fromisoformat(wire.received_at).astimezone(UTC)
    except (ValidationError, ValueError):
        return None
    if timestamp > received_at + MAX_CLOCK_SKEW or received_at > utc_now() + MAX_CLOCK_SKEW:
        return None
    shown = repr(wire.payload)  # a non-finite float shows as inf/nan; a string that merely contains them costs a walk
    if "inf" in shown or "nan" in shown:
        try:
            check_json_tree(wire.payload)
        except PydanticCustomError:
            return None
    fields = wire.__dict__
    fields["timestamp"], fields["received_at"] = timestamp, received_at
    # What `model_construct` does, without its per-field defaults pass: every field is set already.
    envelope = object.__new__(Envelope)
    object.__setattr__(envelope, "__dict__", fields)
    object.__setattr__(envelope, "__pydantic_fields_set__", _ALL_FIELDS)
    object.__setattr__(envelope, "__pydantic_extra__", None)
    object.__setattr__(envelope, "__pydantic_private__", None)
    return envelope


def parse_envelope(raw: bytes | str) -> Envelope:
    """Validate bytes from the wire; every failure, whatever the input, is an `EnvelopeRejected`."""
    try:
        return _parse(raw)
    except EnvelopeRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - the contract: callers only ever see a rejection with a reason
        raise EnvelopeRejected("unreadable", f"{type(exc).__name__}: {str(exc)[:200]}") from None


def _parse(raw: bytes | str) -> Envelope:
    text = _raw_text(raw)
    if nesting_depth_exceeds(text, MAX_PAYLOAD_DEPTH + 1):
        raise EnvelopeRejected("too_deep", f"payload nested deeper than {MAX_PAYLOAD_DEPTH} levels")
    # Fast path: pydantic's own JSON parser, a third cheaper per event. Anything it refuses, an
    # envelope without an explicit schema_version, or one that may carry a reserved field, takes the
    # path below, which names the reason.
    if '"' + CLAIM_CHECK_FIELD + '"' not in text:
        envelope = _fast_parse(text)
        if envelope is not None:
            return envelope
    data = decode_json_object(text)
    # The version gate runs first so an unknown major is reported as such, not as a field error.
    version = data.get("schema_version")
    if not isinstance(version, str):
        raise EnvelopeRejected("missing_schema_version")
    check_version(version)
    if CLAIM_CHECK_FIELD in data:
        raise EnvelopeRejected(
            "reserved_field", f"{CLAIM_CHECK_FIELD!r} is set only by the edge service, never by a device"
        )
    try:
        return Envelope.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "envelope"
        reason = first["type"] if first["type"] in _VALIDATION_REASONS else "invalid_field"
        raise EnvelopeRejected(reason, f"{where}: {first['msg']}"[:300]) from None


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
