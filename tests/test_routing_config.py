"""The routing config is validated when loaded: a bad key fails loudly and says where it is; every event type
it names is in the event catalog, which supplies priorities, incidents and the monitoring list."""

import re

import pytest
import yaml

from edge_bridge.catalog import load_event_catalog
from pipeline.routing.config import RoutingConfigError, load_routing_config, parse_routing_config

PARTNER = {
    "name": "acme",
    "webhook": "http://127.0.0.1:1/events",
    "secret_env": "ACME_SECRET",
    "subscriptions": ["door_access"],
    "allowed_fields": ["event_id", "event_type"],
}


def routing_file(tmp_path, partners, delays=(1, 1, 2), **extra):
    """A routing config for a test; returns its path (point PIPELINE_ROUTING_CONFIG or RoutingSettings at it)."""
    path = tmp_path / "routing.yaml"
    path.write_text(yaml.safe_dump({"retry_delays_s": list(delays), "partners": partners, **extra}))
    return path


def test_shipped_routing_config_loads_with_the_seed_backoff_list():
    config = load_routing_config()
    assert config.retry_delays_s == (1, 5, 15, 60, 300) and config.max_attempts == 6
    assert config.partners and config.priority.for_event_type("intrusion_alert") == "high"
    assert all(p.allowed_fields for p in config.partners)


def test_misspelled_transform_key_is_named_in_the_error(tmp_path):
    path = routing_file(tmp_path, [{**PARTNER, "transform": {"rnme": {"site_id": "location_id"}}}])
    with pytest.raises(RoutingConfigError, match=r"partners\[0\]\.transform\.rnme"):
        load_routing_config(path)


def test_unknown_priority_is_named_in_the_error():
    with pytest.raises(RoutingConfigError, match=r"priority\.rules\.door_access"):
        parse_routing_config({"priority": {"rules": {"door_access": "urgent"}}})


def test_whitelisting_a_field_the_envelope_does_not_have_is_refused():
    with pytest.raises(RoutingConfigError, match=r"partners\[0\]\.allowed_fields.*'credential'"):
        parse_routing_config({"partners": [{**PARTNER, "allowed_fields": ["event_id", "credential"]}]})


def test_renaming_onto_a_field_the_partner_already_gets_is_refused():
    with pytest.raises(RoutingConfigError, match="collide"):
        parse_routing_config(
            {
                "partners": [
                    {
                        **PARTNER,
                        "allowed_fields": ["site_id", "device_id"],
                        "transform": {"rename": {"site_id": "device_id"}},
                    }
                ]
            }
        )


def test_renaming_a_path_the_whitelist_does_not_name_is_refused():
    with pytest.raises(
        RoutingConfigError, match=r"partners\[0\]: .*rename sources \['payload.zone'\] are not in allowed_fields"
    ):
        parse_routing_config({"partners": [{**PARTNER, "transform": {"rename": {"payload.zone": "zone"}}}]})


def contract_version(**changes):
    return parse_routing_config({"partners": [{**PARTNER, **changes}]}).partners[0].contract_version


def test_a_contract_version_changes_with_subscriptions_whitelist_or_transform_and_with_nothing_else():
    base = contract_version()
    assert len(base) == 12 and int(base, 16) >= 0
    assert contract_version(allowed_fields=["event_type", "event_id", "event_id"]) == base, (
        "order and repeats do not make a new contract"
    )
    assert contract_version(webhook="http://127.0.0.1:2/x", secret_env="OTHER", timeout_s=3) == base, (
        "where and how it is sent is not the contract"
    )
    changed = [
        contract_version(subscriptions=["door_access", "motion"]),
        contract_version(allowed_fields=["event_id", "event_type", "payload.zone"]),
        contract_version(allowed_fields=["event_id", "event_type", "payload.zone.*"]),
        contract_version(transform={"strip_fields": ["credential"]}),
        contract_version(transform={"rename": {"event_id": "id"}}),
    ]
    assert len({base, *changed}) == 1 + len(changed)


def test_config_check_prints_each_partners_contract_version(tmp_path):
    import subprocess
    import sys

    path = routing_file(
        tmp_path, [PARTNER, {**PARTNER, "name": "globex", "allowed_fields": ["site_id", "payload.zone.*"]}]
    )
    routing = load_routing_config(path)

    out = subprocess.run(
        [sys.executable, "-m", "pipeline.routing.config", "--check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert out.returncode == 0, out.stderr
    for partner in routing.partners:
        assert f"{partner.name}: contract {partner.contract_version}" in out.stdout


def test_config_check_fails_on_a_partner_without_a_whitelist_naming_its_key_path(tmp_path):
    import subprocess
    import sys

    path = routing_file(tmp_path, [{k: v for k, v in PARTNER.items() if k != "allowed_fields"}])

    out = subprocess.run(
        [sys.executable, "-m", "pipeline.routing.config", "--check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert out.returncode == 1 and "partners[0].allowed_fields" in out.stderr


def test_missing_partner_secret_names_the_environment_variable(monkeypatch):
    monkeypatch.delenv("ACME_SECRET", raising=False)
    partner = parse_routing_config({"partners": [PARTNER]}).partners[0]
    with pytest.raises(RoutingConfigError, match="ACME_SECRET"):
        partner.secret()


def test_unknown_event_type_in_a_partner_subscription_names_its_path_and_the_catalog():
    with pytest.raises(
        RoutingConfigError,
        match=re.escape("partners[0].subscriptions[1]: unknown event type 'panic' (not in config/events.yaml)"),
    ):
        parse_routing_config({"partners": [{**PARTNER, "subscriptions": ["door_access", "panic"]}]})


@pytest.mark.parametrize(
    "section,path",
    [
        ({"priority": {"rules": {"smoke_alarm": "high"}}}, "priority.rules.smoke_alarm"),
        ({"automation": {"rules": [{"event_type": "panic", "incident": True}]}}, r"automation.rules\[0\].event_type"),
        ({"monitoring": {"event_types": ["device_heartbeat", "heartbeat"]}}, r"monitoring.event_types\[1\]"),
    ],
)
def test_unknown_event_type_in_a_priority_rule_automation_rule_or_monitoring_list_is_a_config_error(section, path):
    with pytest.raises(RoutingConfigError, match=path + ": unknown event type"):
        parse_routing_config(section)


def test_priorities_incidents_and_the_monitoring_list_come_from_the_catalog():
    catalog = load_event_catalog()
    routing = parse_routing_config({})
    for name, event_type in catalog.event_types.items():
        assert routing.priority.for_event_type(name) == event_type.priority, name
        rule = routing.automation.rule_for(name)
        assert bool(rule and rule.incident) == event_type.incident, name
        assert (name in routing.monitoring.event_types) == event_type.operational, name


def test_routing_overrides_a_catalog_priority_and_adds_a_webhook_to_a_catalog_incident():
    catalog = load_event_catalog()
    routing = parse_routing_config(
        {
            "priority": {"rules": {"motion": "high"}},
            "automation": {
                "rules": [
                    {"event_type": "panic_button", "webhook_env": "PANIC_URL"},
                    {"event_type": "fire_alarm", "incident": False},
                ]
            },
        }
    )
    assert (
        routing.priority.for_event_type("motion") == "high"
        and routing.priority.for_event_type("climate") == catalog["climate"].priority
    )
    panic = routing.automation.rule_for("panic_button")
    assert panic.incident and panic.webhook_env == "PANIC_URL"
    assert not routing.automation.rule_for("fire_alarm").incident


def test_two_automation_rules_for_one_event_type_are_refused():
    with pytest.raises(RoutingConfigError, match=r"automation.rules: .*\['arm'\]"):
        parse_routing_config(
            {"automation": {"rules": [{"event_type": "arm"}, {"event_type": "arm", "incident": False}]}}
        )


def test_an_event_type_the_catalog_lacks_still_routes_to_the_default_priority():
    routing = parse_routing_config({"priority": {"default": "medium"}})
    assert routing.priority.for_event_type("vendor_specific_event") == "medium"
    assert routing.automation.rule_for("vendor_specific_event") is None


def test_routing_config_checked_against_a_broken_catalog_names_the_catalog(tmp_path, monkeypatch):
    catalog = tmp_path / "events.yaml"
    catalog.write_text("version: 1\nevent_types: {arm: {meaning: m, families: [ajax], priority: urgent}}\n")
    monkeypatch.setenv("EVENT_CATALOG", str(catalog))
    with pytest.raises(RoutingConfigError, match=r"events.yaml: event_types\.arm\.priority"):
        load_routing_config()
