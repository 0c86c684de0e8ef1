"""The contract refuses every class of hostile input with its own reason, and never raises anything else.

Property tests feed the parser arbitrary bytes, arbitrary JSON at any depth, and valid envelopes with
one field replaced by arbitrary JSON; whatever it accepts must survive the trip through every place an
event goes next (strict JSON, UTF-8, pickling for Dagster, the partner transform's walk).
"""

from __future__ import annotations

import json
import pickle
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_bridge.envelope import (
    MAX_CLOCK_SKEW,
    MAX_ENVELOPE_BYTES,
    MAX_PAYLOAD_DEPTH,
    REJECTION_REASONS,
    Envelope,
    EnvelopeRejected,
    decode_json_object,
    parse_envelope,
)
from tests.conftest import sample_envelope


def wire(**changes) -> dict:
    data = json.loads(sample_envelope().to_json())
    data.update(changes)
    return data


def reason_of(raw: bytes | str) -> str:
    with pytest.raises(EnvelopeRejected) as err:
        parse_envelope(raw)
    assert err.value.reason in REJECTION_REASONS
    return err.value.reason


def nested(depth: int, leaf="1", key='"a"') -> str:
    """`depth` levels of objects around `leaf`, as text (json.dumps itself would recurse)."""
    return ("{" + key + ":") * depth + leaf + "}" * depth


def with_payload_text(payload_text: str) -> str:
    head = json.dumps(wire(payload={}))
    return head.replace('"payload": {}', '"payload": ' + payload_text)


def accepted_everywhere(envelope: Envelope) -> None:
    """What an accepted envelope must survive downstream."""
    text = envelope.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} emitted"))
    text.encode("utf-8")
    pickle.loads(pickle.dumps(envelope))
    assert parse_envelope(text.encode()) == envelope


# -- each class, its reason ----------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_PAYLOAD_DEPTH + 1, 300, 2_000, 100_000])
def test_a_payload_nested_past_the_bound_is_too_deep_at_any_depth(depth):
    assert reason_of(with_payload_text(nested(depth - 1, leaf="{}")).encode()) == "too_deep"


def test_a_payload_nested_exactly_to_the_bound_is_accepted_and_survives_downstream():
    envelope = parse_envelope(with_payload_text(nested(MAX_PAYLOAD_DEPTH - 1, leaf="[]")).encode())
    accepted_everywhere(envelope)


def test_brackets_inside_strings_do_not_count_as_nesting():
    text = json.dumps(wire(payload={"note": "[{" * 500 + "}]" * 500, "q": '\\"[{'}))
    assert parse_envelope(text).payload["note"].startswith("[{")


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1" * 400 + ".5"])
def test_non_finite_numbers_are_refused(number):
    assert reason_of(with_payload_text('{"x": ' + number + "}")) == "non_finite_number"


def test_a_lone_surrogate_is_refused_as_invalid_unicode():
    assert reason_of(with_payload_text('{"x": "\\ud800"}')) == "invalid_unicode"
    assert reason_of(with_payload_text('{"\\udfff": 1}')) == "invalid_unicode"


@pytest.mark.parametrize("field", ["event_id", "idempotency_key", "device_id", "site_id", "event_type", "source"])
@pytest.mark.parametrize("bad", ["a\r\nX-Injected: 1", "a\x00b", "a\u2028b", "a\x85b"])
def test_control_characters_in_any_id_are_refused(field, bad):
    assert reason_of(json.dumps(wire(**{field: bad}))) == "control_characters"


@pytest.mark.parametrize(
    "value",
    [
        1700000000,
        1700000000.5,
        "1700000000",
        "2024-01-15",
        "2024-01-15 10:30:00Z",
        "Mon, 15 Jan 2024 10:30:00 GMT",
        "2024-01-15T10:30:00",
        None,
        [],
        {},
    ],
)
@pytest.mark.parametrize("field", ["timestamp", "received_at"])
def test_anything_but_an_rfc3339_timestamp_is_refused(field, value):
    assert reason_of(json.dumps(wire(**{field: value}))) == "bad_timestamp"


def test_rfc3339_with_an_offset_or_fraction_is_accepted_and_normalised_to_utc():
    envelope = parse_envelope(json.dumps(wire(timestamp="2024-01-15T12:30:00.250+02:00")))
    assert envelope.timestamp == datetime(2024, 1, 15, 10, 30, 0, 250000, tzinfo=UTC)


def test_an_event_time_ahead_of_received_at_by_more_than_the_skew_is_refused():
    received = datetime.now(UTC).replace(microsecond=0)
    ok = received + MAX_CLOCK_SKEW
    late = received + MAX_CLOCK_SKEW + timedelta(seconds=1)
    fmt = lambda t: t.isoformat().replace("+00:00", "Z")  # noqa: E731
    assert parse_envelope(json.dumps(wire(timestamp=fmt(ok), received_at=fmt(received)))).timestamp == ok
    assert reason_of(json.dumps(wire(timestamp=fmt(late), received_at=fmt(received)))) == "future_timestamp"
    assert (
        reason_of(json.dumps(wire(timestamp="2099-01-01T00:00:00Z", received_at="2099-01-01T00:00:00Z")))
        == "future_timestamp"
    )


def test_a_device_cannot_carry_a_claim_check_pointer():
    pointer = {"bucket": "events-archive", "key": "anything", "bytes": 1, "sha256": "0" * 64}
    assert reason_of(json.dumps({"claim_check": pointer, **wire()})) == "reserved_field"
    assert reason_of(json.dumps({**wire(), "claim_check": pointer})) == "reserved_field"
    # In the payload it is only data.
    assert parse_envelope(json.dumps(wire(payload={"claim_check": pointer}))).payload["claim_check"] == pointer


def test_an_envelope_over_the_size_limit_is_too_large_before_it_is_parsed():
    big = json.dumps(wire(payload={"blob": "x" * MAX_ENVELOPE_BYTES}))
    assert reason_of(big.encode()) == "too_large"


def test_an_event_id_that_could_split_a_key_or_header_is_refused():
    for bad in ["../other-site/e1", "a/b", "a b", "", "-starts-with-dash"]:
        assert reason_of(json.dumps(wire(event_id=bad))) in {"invalid_field", "control_characters"}


def test_adapters_decoder_refuses_deep_device_json_before_decoding_it():
    with pytest.raises(EnvelopeRejected) as err:
        decode_json_object(nested(50_000).encode())
    assert err.value.reason == "too_deep"


# -- properties: nothing but a rejection, whatever arrives ---------------------------------------

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities included: json.dumps writes them, the parser must refuse them
    | st.text()
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=30,
)


def parses_or_rejects(raw: bytes | str) -> Envelope | None:
    try:
        envelope = parse_envelope(raw)
    except EnvelopeRejected as exc:
        assert exc.reason in REJECTION_REASONS, exc.reason
        return None
    accepted_everywhere(envelope)
    return envelope


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_are_rejected_with_a_known_reason(raw):
    parses_or_rejects(raw)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_documents_parse_or_are_rejected_with_a_known_reason(value):
    parses_or_rejects(json.dumps(value))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from(
        [
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
        ]
    ),
    value=json_values,
)
def test_any_field_replaced_by_arbitrary_json_parses_or_is_rejected(field, value):
    parses_or_rejects(json.dumps(wire(**{field: value})))


@settings(max_examples=150, deadline=None)
@given(
    depth=st.integers(min_value=0, max_value=5_000),
    leaf=st.sampled_from(["1", "[]", "{}", '"x"', "NaN", "[1e999]"]),
    arrays=st.booleans(),
)
def test_a_payload_at_any_depth_parses_or_is_rejected_never_overflows(depth, leaf, arrays):
    inner = ("[" * depth + leaf + "]" * depth) if arrays else nested(depth, leaf)
    envelope = parses_or_rejects(with_payload_text('{"p": ' + inner + "}").encode())
    if envelope is None:
        return
    assert depth < MAX_PAYLOAD_DEPTH  # anything deeper must have been refused


@settings(max_examples=200, deadline=None)
@given(payload=st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_arbitrary_payloads_parse_or_are_rejected_the_same_way_on_both_paths(payload):
    """Bytes and str take the same decisions (the fast path and the reasoned path agree)."""
    text = json.dumps(wire(payload=payload))
    try:
        as_bytes = parse_envelope(text.encode("utf-8", "surrogatepass"))
    except EnvelopeRejected as exc:
        as_bytes = exc.reason
    try:
        as_text = parse_envelope(text)
    except EnvelopeRejected as exc:
        as_text = exc.reason
    assert as_bytes == as_text


def test_nesting_is_measured_before_any_decoder_sees_the_text(monkeypatch):
    """Recursive code downstream (decoders, walks, pickling) must never meet a deep tree at all."""
    import edge_bridge.envelope as envelope_module

    class NoDecoding:
        @staticmethod
        def loads(*args, **kwargs):
            raise AssertionError("a decoder saw over-deep input")

    just_over = with_payload_text(nested(MAX_PAYLOAD_DEPTH, leaf="{}")).encode()
    far_over = with_payload_text("[" * 50_000 + "]" * 50_000)
    monkeypatch.setattr(envelope_module, "json", NoDecoding)
    monkeypatch.setattr(envelope_module.Envelope, "model_validate_json", NoDecoding.loads)
    assert reason_of(just_over) == "too_deep"
    assert reason_of(far_over) == "too_deep"


rfc3339_texts = st.builds(
    lambda moment, offset_minutes, sep, zulu: (
        moment.replace(tzinfo=timezone(timedelta(minutes=offset_minutes)))
        .isoformat(sep=sep)
        .replace("+00:00", "Z" if zulu else "+00:00")
    ),
    st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1)),
    st.integers(-12 * 60, 14 * 60),
    st.sampled_from(["T", "t", " "]),
    st.booleans(),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from(
        [
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
        ]
    ),
    value=json_values
    | st.text(max_size=40)
    | st.from_regex(r"\A\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})?\Z")
    | rfc3339_texts,
)
def test_the_hot_path_never_accepts_what_the_reasoned_path_refuses(field, value):
    """The edge's cheap path is a subset of the contract: whatever it accepts, full validation accepts
    identically; whatever it refuses is decided by the reasoned path."""
    from edge_bridge.envelope import _fast_parse

    text = json.dumps(wire(**{field: value}))
    fast = _fast_parse(text)
    if fast is None:
        return
    slow = Envelope.model_validate(json.loads(text, parse_constant=lambda c: pytest.fail(f"fast path took {c}")))
    assert fast == slow and fast.model_fields_set == slow.model_fields_set
