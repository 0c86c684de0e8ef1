"""The routing config is validated when loaded: a bad key fails loudly and says where it is."""

import pytest
import yaml

from pipeline.routing.config import RoutingConfigError, load_routing_config, parse_routing_config

PARTNER = {"name": "acme", "webhook": "http://127.0.0.1:1/events", "secret_env": "ACME_SECRET", "subscriptions": ["door_access"]}


def routing_file(tmp_path, partners, delays=(1, 1, 2), **extra):
    """A routing config for a test; returns its path (point PIPELINE_ROUTING_CONFIG or RoutingSettings at it)."""
    path = tmp_path / "routing.yaml"
    path.write_text(yaml.safe_dump({"retry_delays_s": list(delays), "partners": partners, **extra}))
    return path


def test_shipped_routing_config_loads_with_the_seed_backoff_list():
    config = load_routing_config()
    assert config.retry_delays_s == (1, 5, 15, 60, 300) and config.max_attempts == 6
    assert config.partners and config.priority.for_event_type("intrusion_alert") == "high"


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
        parse_routing_config({"partners": [{**PARTNER, "allowed_fields": ["site_id", "device_id"], "transform": {"rename": {"site_id": "device_id"}}}]})


def test_missing_partner_secret_names_the_environment_variable(monkeypatch):
    monkeypatch.delenv("ACME_SECRET", raising=False)
    partner = parse_routing_config({"partners": [PARTNER]}).partners[0]
    with pytest.raises(RoutingConfigError, match="ACME_SECRET"):
        partner.secret()
