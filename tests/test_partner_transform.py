"""Property: whatever the event and the partner config, a partner gets only what it agreed to."""

from datetime import datetime, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_bridge.envelope import ENVELOPE_FIELDS, Envelope
from pipeline.routing.config import PartnerConfig
from pipeline.routing.destinations import partner_shares
from pipeline.routing.config import RoutingConfig
from pipeline.routing.transform import PartnerTransform

import json

NAMES = st.sampled_from(["door", "zone", "result", "credential", "internal_id", "raw_payload", "state", "n", "site_id", "timestamp"])
EVENT_TYPES = st.sampled_from(["door_access", "intrusion_alert", "motion", "device_heartbeat", "check_in"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3),
    max_leaves=8,
)
FIELD_PATHS = st.sampled_from([f for f in ENVELOPE_FIELDS] + ["payload.door", "payload.zone", "payload.result", "payload.credential", "payload.internal_id", "payload.state"])


@st.composite
def events(draw):
    return Envelope(
        idempotency_key="k",
        event_type=draw(EVENT_TYPES),
        source="ajax",
        site_id=draw(st.sampled_from(["site-1", "site-2"])),
        device_id="dev-1",
        timestamp=datetime(2024, 1, 15, 10, 30, tzinfo=timezone.utc),
        payload=draw(st.dictionaries(NAMES, JSON_VALUES, max_size=6)),
    )


@st.composite
def partner_configs(draw):
    allowed = draw(st.none() | st.lists(FIELD_PATHS, min_size=1, max_size=8, unique=True))
    strip = draw(st.lists(NAMES | st.sampled_from(list(ENVELOPE_FIELDS)), max_size=4, unique=True))
    candidates = draw(st.lists(FIELD_PATHS, max_size=3, unique=True))
    targets = ["event_time", "location_id", "outcome", "kind"]
    rename = {src: targets[i] for i, src in enumerate(candidates)}
    data = {
        "name": "p",
        "webhook": "http://127.0.0.1:1/",
        "secret_env": "P_SECRET",
        "subscriptions": draw(st.lists(EVENT_TYPES, min_size=1, max_size=3, unique=True)),
        "allowed_fields": allowed,
        "transform": {"strip_fields": strip, "rename": rename},
    }
    try:
        return PartnerConfig.model_validate(data)
    except ValueError:
        # Configs the loader refuses (e.g. a rename onto a field already sent) never reach a partner.
        rename.clear()
        return PartnerConfig.model_validate(data)


def all_keys(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from all_keys(v)
    elif isinstance(value, list):
        for v in value:
            yield from all_keys(v)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=events(), partner=partner_configs())
def test_partner_body_holds_only_whitelisted_renamed_fields_and_never_a_stripped_one(event, partner):
    wire = event.to_wire()
    body = PartnerTransform(partner).apply(wire)
    allowed = partner.allowed_fields or ENVELOPE_FIELDS
    rename, strip = partner.transform.rename, set(partner.transform.strip_fields)

    allowed_top = {rename.get(p, p) for p in allowed if "." not in p or p in rename}
    allowed_top |= {"payload"} if any(p.startswith("payload.") and p not in rename for p in allowed) else set()
    assert set(body) <= allowed_top
    assert not strip & set(all_keys(body)), "a stripped field reached the partner"
    if "payload" in body and "payload" not in allowed:
        assert set(body["payload"]) <= {p.split(".", 1)[1] for p in allowed if p.startswith("payload.")}
    for path in allowed:
        top, _, key = path.partition(".")
        source = wire.get("payload", {}).get(key) if key else wire.get(top)
        present = (key in wire["payload"]) if key else top in wire
        if present and not (set(path.split(".")) & strip) and not isinstance(source, (dict, list)):
            where = body.get(rename[path]) if path in rename else (body.get("payload", {}).get(key) if key else body.get(top))
            assert where == source, f"{path} should arrive unchanged"


@settings(max_examples=200, deadline=None)
@given(batch=st.lists(events(), max_size=8), partner=partner_configs())
def test_only_subscribed_event_types_reach_a_partner(batch, partner):
    shares = partner_shares(RoutingConfig(partners=(partner,)), batch)
    sent = [json.loads(m.body)["event_type"] for m in shares[partner.name]]
    assert sent == [e.event_type for e in batch if e.event_type in partner.subscriptions]


def nested(depth, leaf):
    """A JSON object `depth` levels deep, each level {"credential": ..., "inner": <next>} (built without recursion)."""
    value = leaf
    for level in range(depth):
        value = {"credential": f"secret-{level}", "inner": value} if level % 2 else {"credential": f"secret-{level}", "inner": [value]}
    return value


def test_strip_fields_walk_a_payload_far_deeper_than_the_interpreters_stack_without_recursing():
    import sys

    depth = sys.getrecursionlimit() * 3
    partner = PartnerConfig.model_validate(
        {"name": "p", "webhook": "http://127.0.0.1:1/", "secret_env": "P_SECRET", "subscriptions": ["motion"], "allowed_fields": ["payload.zone"], "transform": {"strip_fields": ["credential"]}}
    )
    wire = {"event_type": "motion", "payload": {"zone": nested(depth, "bottom")}}

    body = PartnerTransform(partner).apply(wire)

    value, levels = body["payload"]["zone"], 0
    while isinstance(value, (dict, list)):
        if isinstance(value, list):
            [value] = value
            continue
        assert set(value) == {"inner"}, "a stripped field survived at some depth"
        value, levels = value["inner"], levels + 1
    assert value == "bottom" and levels == depth
