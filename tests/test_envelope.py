import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_bridge.envelope import Envelope, EnvelopeRejected, make_idempotency_key, parse_envelope
from tests.conftest import sample_envelope


def test_envelope_round_trips_through_the_wire_with_every_field():
    env = sample_envelope()
    back = parse_envelope(env.to_json().encode())
    assert back == env
    assert set(json.loads(env.to_json())) == {
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
    }


def test_any_minor_of_a_known_major_is_accepted():
    data = json.loads(sample_envelope().to_json())
    data["schema_version"] = "1.7"
    assert parse_envelope(json.dumps(data)).schema_version == "1.7"


@pytest.mark.parametrize(
    "version,reason", [("2.0", "unsupported_major"), ("0.9", "unsupported_major"), ("one", "bad_schema_version")]
)
def test_an_unknown_major_is_rejected_with_a_reason(version, reason):
    data = json.loads(sample_envelope().to_json())
    data["schema_version"] = version
    with pytest.raises(EnvelopeRejected) as err:
        parse_envelope(json.dumps(data))
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"\xff\xfe", "not_utf8"),
        (b"{not json", "bad_json"),
        (b"[1, 2]", "not_an_object"),
        (b'{"event_type": "x"}', "missing_schema_version"),
    ],
)
def test_malformed_bytes_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(EnvelopeRejected) as err:
        parse_envelope(raw)
    assert err.value.reason == reason


def test_a_missing_field_names_the_field():
    data = json.loads(sample_envelope().to_json())
    del data["site_id"]
    with pytest.raises(EnvelopeRejected) as err:
        parse_envelope(json.dumps(data))
    assert err.value.reason == "invalid_field" and "site_id" in err.value.detail


def test_timestamps_without_offset_are_rejected():
    data = json.loads(sample_envelope().to_json())
    data["timestamp"] = "2024-01-15T10:30:00"
    with pytest.raises(EnvelopeRejected, match="timestamp"):
        parse_envelope(json.dumps(data))


def test_idempotency_key_is_deterministic_and_event_ids_are_fresh_and_time_ordered():
    ts = datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
    assert (
        make_idempotency_key("site-123", "door-456", "door_access", ts)
        == "site-123-door-456-door_access-2024-01-15T10:30:00Z"
    )
    ids = [sample_envelope().event_id for _ in range(50)]
    assert len(set(ids)) == 50
    assert ids == sorted(ids)


def test_a_complete_envelope_without_schema_version_is_still_refused():
    """The default schema_version must never stand in for a missing one on the wire."""
    data = json.loads(sample_envelope().to_json())
    del data["schema_version"]
    with pytest.raises(EnvelopeRejected) as err:
        parse_envelope(json.dumps(data).encode())
    assert err.value.reason == "missing_schema_version"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    payload=st.dictionaries(st.text(max_size=10), json_values, max_size=6),
    device_id=st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=40),
)
def test_parsing_agrees_with_validating_the_decoded_json(payload, device_id):
    """The fast path (pydantic's JSON parser) yields exactly what json.loads + validation yields."""
    raw = sample_envelope(device_id=device_id, payload=payload).to_json().encode()
    assert parse_envelope(raw) == Envelope.model_validate(json.loads(raw))
