"""The event catalog is the one list of event types: adapters emit only its types, every type in it has a
producer, and routing takes priorities, incidents and the monitoring list from it."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from datetime import UTC, datetime

import pytest

from edge_bridge.adapters import ADAPTERS, ajax, idp, nvr, zigbee
from edge_bridge.catalog import FAMILIES, EventCatalogError, load_event_catalog, parse_event_catalog
from edge_bridge.simulator import INTERNAL_EVENTS, Simulator
from pipeline.routing.config import load_routing_config
from tests.test_adapters import AJAX_INTRUSION, IDP_DENIED, NVR_LINE, RECEIVED, SITE, raw


def ajax_code(code: str):
    return pytest.param("ajax", "ajax/events", raw({**AJAX_INTRUSION, "eventCode": code}), id=f"ajax-{code}")


def nvr_kind(kind: str, state: str = "active"):
    return pytest.param(
        "nvr", "nvr/alarms", raw({**NVR_LINE, "eventType": kind, "eventState": state}), id=f"nvr-{kind}-{state}"
    )


def zigbee_state(state: dict):
    return pytest.param(
        "zigbee", "zigbee2mqtt/sensor_1", raw(state), id=f"zigbee-{'-'.join(f'{k}={v}' for k, v in state.items())}"
    )


def zigbee_availability(state: str):
    return pytest.param(
        "zigbee", "zigbee2mqtt/sensor_1/availability", raw({"state": state}), id=f"zigbee-availability-{state}"
    )


def idp_decision(decision: str):
    return pytest.param("idp", "idp/access", raw({**IDP_DENIED, "decision": decision}), id=f"idp-{decision}")


# Panic, fire/smoke, water leak, intrusion and tamper, as each family reports them.
SAFETY_ALARMS = [ajax_code(code) for code in ("PANIC", "FIRE", "SMOKE", "LEAK", "INTRUSION", "TAMPER", "TAMPER_OPEN")]
SAFETY_ALARMS += [zigbee_state({field: True, "battery": 90}) for field in ("smoke", "water_leak", "tamper", "sos")]
SAFETY_ALARMS += [zigbee_state({"action": action, "battery": 90}) for action in sorted(zigbee.PANIC_ACTIONS)]
SAFETY_ALARMS += [nvr_kind("shelteralarm"), nvr_kind("tamperdetection")]
# Availability, battery and heartbeat reports.
DEVICE_HEALTH = [ajax_code(code) for code in ("BATTERY_LOW", "CONNECTION_LOST", "CONNECTION_RESTORED", "PERIODIC_TEST")]
DEVICE_HEALTH += [zigbee_availability("offline"), zigbee_availability("online")]
DEVICE_HEALTH += [
    zigbee_state({"battery_low": True, "battery": 9}),
    zigbee_state({"battery": 90, "linkquality": 120}),
    nvr_kind("videoloss", "inactive"),
]


def code_table() -> list:
    """Every code, field and state each adapter knows, as a native message of its family."""
    messages = [ajax_code(code) for code in ajax.EVENT_TYPES]
    messages += [nvr_kind(kind, state) for kind in nvr.EVENT_TYPES for state in ("active", "inactive")]
    messages += [idp_decision(decision) for decision in sorted(idp.DECISIONS)]
    messages += [zigbee_state({field: value}) for field, _ in zigbee.ALARMS for value in (True, False)]
    messages += [zigbee_state({field: 1}) for field, _ in zigbee.FACTS]
    messages += [zigbee_state({"action": action, "battery": 90}) for action, _ in zigbee.ACTIONS]
    messages += [zigbee_state({zigbee.SIREN_FIELD: value}) for value in (True, False)]
    messages += [zigbee_state({"state": state}) for state in sorted(zigbee.SWITCH_STATES)]
    messages += [
        zigbee_state({field: 1}) for field in sorted(zigbee.HEARTBEAT_FIELDS - {field for field, _ in zigbee.ALARMS})
    ]
    messages += [zigbee_availability(state) for state in sorted(zigbee.AVAILABILITY)]
    return messages


def adapt(family: str, topic: str, payload: bytes) -> str:
    return ADAPTERS[family](SITE, topic, payload, RECEIVED).event_type


def test_shipped_catalog_is_versioned_and_its_families_are_the_adapters_and_the_edge():
    catalog = load_event_catalog()
    assert catalog.version >= 1 and catalog.source == "config/events.yaml"
    assert set(FAMILIES) == set(ADAPTERS) | {"edge"}


@pytest.mark.parametrize("family,topic,payload", code_table())
def test_every_code_an_adapter_knows_becomes_a_catalog_type_of_that_family(family, topic, payload):
    catalog = load_event_catalog()
    event_type = adapt(family, topic, payload)
    assert event_type in catalog, f"{family} emits {event_type!r}, which config/events.yaml lacks"
    assert family in catalog[event_type].families


def test_every_catalog_type_is_produced_by_exactly_the_families_it_names():
    produced = defaultdict(set)
    for family, topic, payload in (param.values for param in code_table()):
        produced[adapt(family, topic, payload)].add(family)
    for event_type in INTERNAL_EVENTS:  # the site's own systems, through the edge service's internal-event API
        produced[event_type].add("edge")
    catalog = load_event_catalog()
    assert {name: set(t.families) for name, t in catalog.event_types.items()} == dict(produced)


@pytest.mark.parametrize("family,topic,payload", SAFETY_ALARMS)
def test_a_safety_alarm_from_any_family_goes_to_the_high_queue_and_opens_an_incident(family, topic, payload):
    routing = load_routing_config()
    event_type = adapt(family, topic, payload)
    assert routing.priority.for_event_type(event_type) == "high"
    rule = routing.automation.rule_for(event_type)
    assert rule is not None and rule.incident


@pytest.mark.parametrize("family,topic,payload", DEVICE_HEALTH)
def test_availability_battery_and_heartbeat_reports_are_operational_events(family, topic, payload):
    event_type = adapt(family, topic, payload)
    assert event_type in load_routing_config().monitoring.event_types


def test_simulated_traffic_holds_only_catalog_types_from_every_family():
    catalog = load_event_catalog()
    seen = defaultdict(set)
    for msg in Simulator(["site-001", "site-002"], internal=0.05).messages(
        3000, start=datetime(2024, 1, 15, tzinfo=UTC)
    ):
        event_type = (
            json.loads(msg.raw)["event_type"] if msg.family == "edge" else adapt(msg.family, msg.topic, msg.raw)
        )
        seen[event_type].add(msg.family)
    assert set(seen) <= set(catalog.names), f"not in the catalog: {sorted(set(seen) - set(catalog.names))}"
    assert set().union(*seen.values()) == set(FAMILIES)


def test_simulator_plays_the_site_systems_through_the_edge_services_internal_event_api():
    stop, emitted = threading.Event(), []

    class EdgeAdmin:  # stands in for AdminClient: POST /events
        def emit(self, event_type: str, payload: dict, device_id: str) -> dict:
            emitted.append(event_type)
            if len(emitted) == 30:
                stop.set()
            return {}

    sent = Simulator(["site-001"], internal=1.0).run({}, rate=10_000, duration=5, stop=stop, admin=EdgeAdmin())
    assert sent == 30 and set(emitted) == set(INTERNAL_EVENTS) == load_event_catalog().produced_by("edge")


CATALOG = {
    "version": 1,
    "event_types": {
        "panic_button": {
            "meaning": "A panic button was pressed.",
            "families": ["ajax"],
            "priority": "high",
            "incident": True,
        }
    },
}


def test_misspelled_catalog_key_is_named_with_its_path():
    bad = {**CATALOG, "event_types": {"panic_button": {**CATALOG["event_types"]["panic_button"], "incidnt": True}}}
    with pytest.raises(EventCatalogError, match=r"event_types\.panic_button\.incidnt: Extra inputs"):
        parse_event_catalog(bad)


@pytest.mark.parametrize(
    "change,path",
    [
        ({"version": None}, r"version"),
        (
            {"event_types": {"panic_button": {**CATALOG["event_types"]["panic_button"], "families": ["sia"]}}},
            r"event_types\.panic_button\.families\[0\]",
        ),
        (
            {"event_types": {"panic_button": {**CATALOG["event_types"]["panic_button"], "priority": "urgent"}}},
            r"event_types\.panic_button\.priority",
        ),
        (
            {"event_types": {"Panic Button": CATALOG["event_types"]["panic_button"]}},
            r"event_types\.Panic Button: String should match",
        ),
    ],
)
def test_catalog_without_a_version_a_known_family_a_priority_or_a_plain_name_is_refused(change, path):
    with pytest.raises(EventCatalogError, match=path):
        parse_event_catalog({**CATALOG, **change})


def test_an_event_type_given_twice_in_the_catalog_file_is_refused(tmp_path):
    path = tmp_path / "events.yaml"
    entry = "    meaning: m\n    families: [ajax]\n    priority: low\n"
    path.write_text(f"version: 1\nevent_types:\n  arm:\n{entry}  arm:\n{entry}")
    with pytest.raises(EventCatalogError, match="'arm' is given twice"):
        load_event_catalog(path)


def test_catalog_path_comes_from_the_environment_and_a_changed_file_is_read_again(tmp_path, monkeypatch):
    import yaml

    path = tmp_path / "events.yaml"
    path.write_text(yaml.safe_dump(CATALOG))
    monkeypatch.setenv("EVENT_CATALOG", str(path))
    assert load_event_catalog().names == ("panic_button",)
    extra = {"meaning": "A sensor reports the temperature outside.", "families": ["zigbee"], "priority": "low"}
    path.write_text(
        yaml.safe_dump({**CATALOG, "event_types": {**CATALOG["event_types"], "outdoor_temperature": extra}})
    )
    assert set(load_event_catalog().names) == {"panic_button", "outdoor_temperature"}
