"""Property: whatever the event and the partner contract, nothing outside the whitelist ever leaves.

Checked on everything that carries event data out of the pipeline's hands: the partner body, the partner
queue message (which a dead-lettered event keeps, unchanged, in the partner DLQ), an archive-range
replay's message, and the operational line pushed to Loki (which has a whitelist of its own).
"""

import json
import sys
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_bridge.envelope import Envelope
from pipeline.archive import envelopes_to_table
from pipeline.archive_range import replay_messages
from pipeline.routing.config import PartnerConfig, RoutingConfig, RoutingConfigError, parse_routing_config
from pipeline.routing.delivery import set_aside
from pipeline.routing.destinations import QueueLimits, partner_shares
from pipeline.routing.monitoring import LOKI_LINE_FIELDS, LOKI_PAYLOAD_FIELDS, loki_streams
from pipeline.routing.transform import PartnerTransform

ENVELOPE_SCALARS = [
    "schema_version",
    "event_id",
    "idempotency_key",
    "event_type",
    "source",
    "site_id",
    "device_id",
    "timestamp",
    "received_at",
]
KEYS = ["zone", "name", "door", "result", "state", "battery", "credential", "internal_id", "user", "site_id", "a.b"]
SENSITIVE = ["credential", "internal_id", "user"]
EVENT_TYPES = st.sampled_from(["door_access", "intrusion_alert", "motion", "device_heartbeat", "device_offline"])
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=4)  # the envelope refuses lone surrogates
SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | TEXT
)
PAYLOADS = st.dictionaries(
    st.sampled_from(KEYS) | TEXT,
    st.recursive(
        SCALARS,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
        max_leaves=12,
    ),
    max_size=6,
)
MESSAGE_KEYS = {
    "event_id",
    "site_id",
    "webhook_id",
    "event_type",
    "partner",
    "contract_version",
    "archive_hour",
    "body",
}
RENAME_TARGETS = ["out_a", "out_b", "out_c"]
NOW = datetime.now(UTC)


@st.composite
def events(draw):
    received = NOW - timedelta(seconds=draw(st.integers(0, 400 * 86400)), microseconds=draw(st.integers(0, 999999)))
    return Envelope(
        idempotency_key="k",
        event_type=draw(EVENT_TYPES),
        source="ajax",
        site_id=draw(st.sampled_from(["site-1", "site-2"])),
        device_id="dev-1",
        timestamp=received - timedelta(microseconds=draw(st.integers(0, 10**8))),
        received_at=received,
        payload=draw(PAYLOADS),
    )


def payload_paths():
    keys = st.lists(st.sampled_from(KEYS[:-1]), min_size=1, max_size=3).map(".".join)
    return st.builds(lambda path, whole: f"payload.{path}" + (".*" if whole else ""), keys, st.booleans()) | st.just(
        "payload.*"
    )


@st.composite
def partner_configs(draw):
    allowed = draw(st.lists(st.sampled_from(ENVELOPE_SCALARS) | payload_paths(), min_size=1, max_size=8, unique=True))
    strip = draw(st.lists(st.sampled_from(KEYS + ENVELOPE_SCALARS), max_size=3, unique=True))
    renamed = draw(st.lists(st.sampled_from(allowed), max_size=3, unique=True))
    data = {
        "name": "p",
        "webhook": "http://127.0.0.1:1/",
        "secret_env": "P_SECRET",
        "subscriptions": draw(st.lists(EVENT_TYPES, min_size=1, max_size=3, unique=True)),
        "allowed_fields": allowed,
        "transform": {"strip_fields": strip, "rename": {src: RENAME_TARGETS[i] for i, src in enumerate(renamed)}},
    }
    return PartnerConfig.model_validate(data)


# --- the oracle: what the whitelist lets out, computed independently of PartnerTransform -------------
def parts(path):
    return tuple(path[:-2].split(".")) if path.endswith(".*") else tuple(path.split("."))


def is_scalar(value):
    return not isinstance(value, (dict, list))


def lookup(value, keys):
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return KeyError
        value = value[key]
    return value


def stripped(value, names):
    if isinstance(value, dict):
        return {k: stripped(v, names) for k, v in value.items() if k not in names}
    if isinstance(value, list):
        return [stripped(v, names) for v in value]
    return value


def key_paths(value, prefix=(), crossed_array=False):
    """(path of keys, value, whether an array was crossed) for every key in a JSON value."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield prefix + (key,), child, crossed_array
            yield from key_paths(child, prefix + (key,), crossed_array)
    elif isinstance(value, list):
        for child in value:
            yield from key_paths(child, prefix, True)


def assert_only_whitelisted(body, wire, partner):
    """No key outside the whitelist, no stripped name anywhere, and every whitelisted value exactly as sent."""
    allowed = partner.allowed_fields
    rename, strip = partner.transform.rename, set(partner.transform.strip_fields)
    wholes = [parts(p) for p in allowed if p.endswith(".*")]
    leaves = [parts(p) for p in allowed if not p.endswith(".*")]
    source_of = {target: parts(source) for source, target in rename.items()}
    for path, value, crossed in key_paths(body):
        assert path[-1] not in strip, f"stripped name {path[-1]!r} reached the partner at {path}"
        source = source_of[path[0]] + path[1:] if path[0] in source_of else path
        inside_whole = any(source[: len(w)] == w for w in wholes)
        leaf = not crossed and source in leaves and is_scalar(value)
        on_the_way = (
            not crossed
            and isinstance(value, dict)
            and any(len(a) > len(source) and a[: len(source)] == source for a in wholes + leaves)
        )
        assert inside_whole or leaf or on_the_way, f"{path} (from {source}) is outside the whitelist {allowed}"
    for path in allowed:
        keys = parts(path)
        if set(keys) & strip:
            continue
        value = lookup(wire, keys)
        where = (rename[path],) if path in rename else keys
        if path.endswith(".*") and value is not KeyError:
            assert lookup(body, where) == stripped(value, strip), f"{path} should arrive whole, less stripped names"
        elif value is not KeyError and is_scalar(value):
            assert lookup(body, where) == value, f"{path} should arrive unchanged"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=events(), partner=partner_configs())
def test_a_partner_body_holds_exactly_the_whitelisted_values_and_never_a_stripped_name(event, partner):
    wire = event.to_wire()

    body = PartnerTransform(partner).apply(wire)

    assert_only_whitelisted(body, wire, partner)


class RecordingSQS:
    """Records what `set_aside` sends to the DLQ (the SQS calls themselves are tested against the emulator)."""

    def __init__(self):
        self.sent = []

    def send_message(self, **call):
        self.sent.append(call)
        return {"MessageId": "m-1"}

    def delete_message(self, **call):
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=events(), partner=partner_configs())
def test_a_partner_queue_message_its_dlq_copy_and_its_archive_replay_carry_nothing_outside_the_whitelist(
    event, partner
):
    routing, wire = RoutingConfig(partners=(partner,)), event.to_wire()
    [live] = [item.body for item in partner_shares(routing, [event])[partner.name]] or [None]
    if live is None:
        assert event.event_type not in partner.subscriptions
        return
    message = json.loads(live)
    assert set(message) == MESSAGE_KEYS and message["contract_version"] == partner.contract_version
    assert_only_whitelisted(json.loads(message["body"]), wire, partner)

    dlq = RecordingSQS()
    set_aside(
        dlq,
        "dlq",
        {"Body": live, "ReceiptHandle": "r", "MessageId": "m-1"},
        "queue",
        "attempts_exhausted",
        "HTTP 500: partner said no",
    )
    [dead] = dlq.sent
    assert dead["MessageBody"] == live and set(dead["MessageAttributes"]) == {"failure_reason", "failure_detail"}

    table = envelopes_to_table([event], NOW)
    [replayed] = [item.body for item in replay_messages(table, partner, QueueLimits(), [], [])]
    assert replayed == live, "the archive gives back the very message (and body) the drain sent"


@settings(max_examples=300, deadline=None)
@given(batch=st.lists(events(), max_size=6))
def test_a_loki_line_carries_only_ids_and_declared_scalar_payload_fields(batch):
    push = loki_streams(batch)

    for stream in push["streams"]:
        assert set(stream["stream"]) == {"job", "site_id", "event_type", "source"}
        for _, text in stream["values"]:
            line = json.loads(text)
            assert set(line) <= set(LOKI_LINE_FIELDS) | {"payload_truncated_bytes"}
            assert set(line.get("payload", {})) <= LOKI_PAYLOAD_FIELDS
            assert all(is_scalar(v) for v in line.get("payload", {}).values())
    assert sorted(json.loads(v)["event_id"] for s in push["streams"] for _, v in s["values"]) == sorted(
        e.event_id for e in batch
    )


def test_a_loki_line_keeps_a_device_health_field_and_drops_a_user_name_and_nested_objects():
    event = Envelope(
        idempotency_key="k",
        event_type="device_offline",
        source="ajax",
        site_id="s",
        device_id="d",
        timestamp=NOW,
        payload={"state": "offline", "user": "Jane Doe", "battery": {"level": 3}, "event_code": "CONNECTION_LOST"},
    )

    [stream] = loki_streams([event])["streams"]

    assert json.loads(stream["values"][0][1])["payload"] == {"state": "offline", "event_code": "CONNECTION_LOST"}


@settings(max_examples=200, deadline=None)
@given(batch=st.lists(events(), max_size=8), partner=partner_configs())
def test_only_subscribed_event_types_reach_a_partner(batch, partner):
    shares = partner_shares(RoutingConfig(partners=(partner,)), batch)
    sent = [json.loads(m.body)["event_type"] for m in shares[partner.name]]
    assert sent == [e.event_type for e in batch if e.event_type in partner.subscriptions]


# --- the whitelist's meaning, by example -------------------------------------------------------------
def partner(allowed, strip=(), rename=None):
    return PartnerConfig.model_validate(
        {
            "name": "p",
            "webhook": "http://127.0.0.1:1/",
            "secret_env": "P_SECRET",
            "subscriptions": ["motion"],
            "allowed_fields": allowed,
            "transform": {"strip_fields": list(strip), "rename": rename or {}},
        }
    )


WIRE = {
    "event_id": "e-1",
    "site_id": "s-1",
    "payload": {"zone": {"name": "hall", "code": 7, "pin": "1234", "sensors": [{"id": 1, "pin": "9"}]}, "door": "d-4"},
}


def test_a_payload_path_at_any_depth_sends_that_scalar_alone():
    body = PartnerTransform(partner(["event_id", "payload.zone.name", "payload.door"])).apply(WIRE)

    assert body == {"event_id": "e-1", "payload": {"zone": {"name": "hall"}, "door": "d-4"}}


def test_naming_an_object_sends_nothing_of_it_until_the_config_says_star():
    assert PartnerTransform(partner(["payload.zone"])).apply(WIRE) == {}
    assert PartnerTransform(partner(["payload.zone.sensors"])).apply(WIRE) == {}

    body = PartnerTransform(partner(["payload.zone.*"], strip=["pin"])).apply(WIRE)

    assert body == {"payload": {"zone": {"name": "hall", "code": 7, "sensors": [{"id": 1}]}}}, (
        "whole, less every stripped name"
    )


def test_a_renamed_path_moves_to_the_top_and_a_path_through_a_stripped_name_sends_nothing():
    body = PartnerTransform(
        partner(
            ["payload.zone.name", "payload.zone.pin", "site_id"],
            strip=["pin"],
            rename={"payload.zone.name": "zone_name", "site_id": "location_id"},
        )
    ).apply(WIRE)

    assert body == {"zone_name": "hall", "location_id": "s-1"}


def test_a_partner_without_allowed_fields_is_a_config_error_naming_the_key_path():
    with pytest.raises(RoutingConfigError, match=r"partners\[0\]\.allowed_fields: .*required"):
        parse_routing_config(
            {
                "partners": [
                    {
                        "name": "p",
                        "webhook": "http://127.0.0.1:1/",
                        "secret_env": "P_SECRET",
                        "subscriptions": ["motion"],
                    }
                ]
            }
        )


@pytest.mark.parametrize(
    "path", ["payload", "payload.zone.*.name", "payload..zone", "site_id.zone", "payload.zo*ne", "credential"]
)
def test_a_whitelist_path_that_is_not_an_envelope_field_or_a_payload_path_is_refused(path):
    with pytest.raises(RoutingConfigError, match=r"partners\[0\]\.allowed_fields"):
        parse_routing_config(
            {
                "partners": [
                    {
                        "name": "p",
                        "webhook": "http://127.0.0.1:1/",
                        "secret_env": "P_SECRET",
                        "subscriptions": ["motion"],
                        "allowed_fields": [path],
                    }
                ]
            }
        )


def nested(depth, leaf):
    """A JSON object `depth` levels deep, each level {"credential": ..., "inner": <next>} (built without recursion)."""
    value = leaf
    for level in range(depth):
        value = (
            {"credential": f"secret-{level}", "inner": value}
            if level % 2
            else {"credential": f"secret-{level}", "inner": [value]}
        )
    return value


def test_strip_fields_walk_a_payload_far_deeper_than_the_interpreters_stack_without_recursing():
    depth = sys.getrecursionlimit() * 3
    wire = {"event_type": "motion", "payload": {"zone": nested(depth, "bottom")}}

    body = PartnerTransform(partner(["payload.zone.*"], strip=["credential"])).apply(wire)

    value, levels = body["payload"]["zone"], 0
    while isinstance(value, (dict, list)):
        if isinstance(value, list):
            [value] = value
            continue
        assert set(value) == {"inner"}, "a stripped field survived at some depth"
        value, levels = value["inner"], levels + 1
    assert value == "bottom" and levels == depth
