"""Device adapters: realistic native messages of each family become envelopes; broken ones are refused with a reason."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from pysiaalarm import SIAAccount, SIAEvent

from edge_bridge.adapters import ADAPTERS, AdapterRejected, ajax, idp, nvr, zigbee
from edge_bridge.catalog import load_event_catalog
from edge_bridge.ingress.sia import HUB_EVENT_SIA_CODES, build_frame

SITE = "site-123"
RECEIVED = datetime(2024, 1, 15, 10, 30, 5, tzinfo=UTC)

AJAX_INTRUSION = {
    "hubId": "002A3F1C",
    "deviceId": "3B41F2",
    "deviceType": "MotionProtect",
    "eventCode": "INTRUSION",
    "room": "Lobby",
    "timestamp": 1705314600123,
    "userName": None,
}
ZIGBEE_CONTACT = {
    "contact": False,
    "battery": 91,
    "linkquality": 120,
    "voltage": 2995,
    "last_seen": "2024-01-15T10:30:00.000Z",
}
NVR_LINE = {
    "ipAddress": "10.0.3.21",
    "macAddress": "44:19:B6:0A:11:02",
    "channelID": 4,
    "dateTime": "2024-01-15T11:30:00+01:00",
    "eventType": "linedetection",
    "eventState": "active",
    "eventDescription": "Line crossing alarm",
    "regionID": 2,
}
IDP_DENIED = {
    "eventId": "a9f3c0",
    "occurredAt": "2024-01-15T10:30:00Z",
    "door": {"id": "door-456", "name": "Main"},
    "credential": {"type": "card", "id": "card-77"},
    "decision": "denied",
    "reason": "outside schedule",
}


def raw(data) -> bytes:
    return json.dumps(data).encode()


def test_ajax_intrusion_becomes_an_intrusion_alert_at_the_hub_time():
    env = ajax.adapt(SITE, "ajax/events", raw(AJAX_INTRUSION))
    assert (env.source, env.event_type, env.device_id) == ("ajax", "intrusion_alert", "ajax-002A3F1C-3B41F2")
    assert env.timestamp == datetime(2024, 1, 15, 10, 30, 0, 123000, tzinfo=UTC)
    assert env.topic == "sites/site-123/events/ajax/intrusion_alert"
    assert env.payload["room"] == "Lobby"


@pytest.mark.parametrize(
    "code,event_type",
    [
        ("ARM", "arm"),
        ("DISARM", "disarm"),
        ("FIRE", "fire_alarm"),
        ("SMOKE", "fire_alarm"),
        ("LEAK", "water_leak"),
        ("TAMPER", "tamper"),
        ("PANIC", "panic_button"),
        ("BATTERY_LOW", "battery_low"),
        ("CONNECTION_LOST", "device_offline"),
        ("CONNECTION_RESTORED", "device_online"),
        ("PERIODIC_TEST", "device_heartbeat"),
    ],
)
def test_every_ajax_event_family_maps_to_its_event_type(code, event_type):
    assert ajax.adapt(SITE, "ajax/events", raw({**AJAX_INTRUSION, "eventCode": code})).event_type == event_type


FRAME_TIME = datetime(2024, 1, 15, 10, 30, 0, tzinfo=UTC)


def sia_event(code: str, zone: int = 0, seq: int = 42, account: str = "A1B2C3", area: int = 1):
    """A hub's DC-09 frame (SIA-DCS for a two-letter code, ADM-CID for a Contact ID code) as the receiver parses it."""
    frame = build_frame(account, code, zone=zone, seq=seq, timestamp=FRAME_TIME, area=area)
    return SIAEvent.from_line(frame.strip().decode("ascii"), {account: SIAAccount(account)})


def adapt_frame(code: str, **kwargs):
    return ajax.adapt_sia(SITE, sia_event(code, **kwargs), RECEIVED)


def test_ajax_sia_burglary_frame_becomes_an_intrusion_alert_of_its_zone_at_the_frame_time():
    env = adapt_frame("BA", zone=3)
    assert (env.source, env.event_type, env.device_id) == ("ajax", "intrusion_alert", "ajax-A1B2C3-zone-3")
    assert env.timestamp == FRAME_TIME and env.received_at == RECEIVED
    assert {k: env.payload[k] for k in ("protocol", "account", "sequence", "code", "area", "zone", "restore")} == {
        "protocol": "SIA-DCS",
        "account": "A1B2C3",
        "sequence": "0042",
        "code": "BA",
        "area": 1,
        "zone": 3,
        "restore": False,
    }


def test_ajax_periodic_test_report_is_a_heartbeat_of_the_hub():
    env = adapt_frame("RP")
    assert (env.event_type, env.device_id) == ("device_heartbeat", "ajax-A1B2C3")


def test_ajax_closing_report_arms_and_names_the_user_not_a_zone():
    env = adapt_frame("CL", zone=5)
    assert (env.event_type, env.device_id, env.payload["user"], env.payload["zone"]) == ("arm", "ajax-A1B2C3", 5, None)


@pytest.mark.parametrize(
    "code,event_type",
    [
        ("BA", "intrusion_alert"),
        ("BV", "intrusion_alert"),
        ("BT", "intrusion_alert"),
        ("FA", "fire_alarm"),
        ("PA", "panic_button"),
        ("HA", "panic_button"),
        ("WA", "water_leak"),
        ("TA", "tamper"),
        ("YT", "battery_low"),
        ("YM", "battery_low"),
        ("RP", "device_heartbeat"),
        ("RX", "device_heartbeat"),
        ("YS", "device_offline"),
        ("YC", "device_offline"),
        ("YK", "device_online"),
        ("CL", "arm"),
        ("OP", "disarm"),
        # Contact ID: qualifier 1 a new event, 3 its restore (an opening/closing: 1 disarmed, 3 armed)
        ("1130", "intrusion_alert"),
        ("1110", "fire_alarm"),
        ("1120", "panic_button"),
        ("1154", "water_leak"),
        ("1383", "tamper"),
        ("1144", "tamper"),
        ("1302", "battery_low"),
        ("1384", "battery_low"),
        ("1602", "device_heartbeat"),
        ("1381", "device_offline"),
        ("3381", "device_online"),
        ("1401", "disarm"),
        ("3401", "arm"),
    ],
)
def test_every_sia_and_contact_id_code_maps_to_its_event_type(code, event_type):
    assert adapt_frame(code, zone=2).event_type == event_type


@pytest.mark.parametrize(
    "code,restores",
    [
        ("BR", "intrusion_alert"),
        ("FH", "fire_alarm"),
        ("WH", "water_leak"),
        ("TR", "tamper"),
        ("3130", "intrusion_alert"),
        ("3110", "fire_alarm"),
    ],
)
def test_an_alarm_restoral_is_a_heartbeat_naming_the_condition_it_ends(code, restores):
    env = adapt_frame(code, zone=4)
    assert (env.event_type, env.device_id, env.payload["restore"], env.payload["restores"]) == (
        "device_heartbeat",
        "ajax-A1B2C3-zone-4",
        True,
        restores,
    )


def sia_code_table() -> list[str]:
    return (
        sorted(ajax.SIA_EVENT_TYPES)
        + sorted(ajax.SIA_RESTORALS)
        + [
            f"{q}{e}"
            for e in sorted(set(ajax.CID_EVENT_TYPES) | ajax.CID_OPEN_CLOSE)
            for q in (ajax.CID_NEW, ajax.CID_RESTORE)
        ]
    )


def test_every_sia_and_contact_id_code_is_a_catalog_type_of_the_ajax_family_and_covers_all_of_them():
    catalog = load_event_catalog()
    produced = {adapt_frame(code, zone=1).event_type for code in sia_code_table()}
    assert produced <= set(catalog.names), f"not in config/events.yaml: {sorted(produced - set(catalog.names))}"
    assert produced == catalog.produced_by("ajax")


def test_every_code_in_the_tables_is_one_the_sia_library_knows_so_it_is_never_answered_duh():
    for code in sia_code_table():
        event = sia_event(code, zone=1)
        assert event.valid_message and not event.code_not_found, code


def test_a_resent_frame_is_the_same_event_and_the_next_frame_is_another():
    first, resent, following = adapt_frame("BA", zone=3), adapt_frame("BA", zone=3), adapt_frame("BA", zone=3, seq=43)
    assert (resent.idempotency_key, resent.event_id) == (first.idempotency_key, first.event_id)
    assert first.idempotency_key == "site-123-ajax-A1B2C3-0042-2024-01-15T10:30:00Z"
    assert following.idempotency_key != first.idempotency_key and following.event_id != first.event_id


def test_a_frame_event_id_sorts_by_the_frame_time():
    early = ajax.frame_event_id("k", FRAME_TIME)
    late = ajax.frame_event_id("k", FRAME_TIME.replace(minute=31))
    assert uuid.UUID(early).version == 7 and early < late


def test_every_hub_event_the_simulator_plays_has_a_sia_code_of_the_same_event_type():
    for hub_code, (sia_code, is_zone) in HUB_EVENT_SIA_CODES.items():
        env = adapt_frame(sia_code, zone=7 if is_zone else 0)
        assert env.event_type == ajax.EVENT_TYPES[hub_code], hub_code
        assert env.device_id == ("ajax-A1B2C3-zone-7" if is_zone else "ajax-A1B2C3"), hub_code
    assert set(HUB_EVENT_SIA_CODES) == set(ajax.EVENT_TYPES)


@pytest.mark.parametrize("code", ["GA", "1151", "6130"])
def test_a_valid_sia_code_no_catalog_type_fits_is_refused_as_unknown_event_type(code):
    with pytest.raises(AdapterRejected) as refused:
        adapt_frame(code)
    assert refused.value.reason == "unknown_event_type"


def test_zigbee_contact_state_becomes_a_contact_event_keeping_every_field():
    env = zigbee.adapt(SITE, "zigbee2mqtt/front_door", raw(ZIGBEE_CONTACT), RECEIVED)
    assert (env.source, env.event_type, env.device_id) == ("zigbee", "contact", "zigbee-front_door")
    assert env.payload["battery"] == 91 and env.payload["linkquality"] == 120
    assert env.timestamp == datetime(2024, 1, 15, 10, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    "state,event_type",
    [
        ({"occupancy": True, "battery": 80}, "occupancy"),
        ({"water_leak": True, "battery": 80}, "water_leak"),
        ({"smoke": True, "battery": 80}, "fire_alarm"),
        ({"contact": True, "tamper": True}, "tamper"),
        ({"temperature": 21.5, "humidity": 45.2, "linkquality": 90}, "climate"),
        ({"battery": 15, "linkquality": 90}, "device_heartbeat"),
        ({"linkquality": 33}, "device_heartbeat"),
        ({"water_leak": False, "battery_low": False, "battery": 80}, "device_heartbeat"),
    ],
)
def test_zigbee_state_is_typed_by_the_fact_it_reports(state, event_type):
    assert zigbee.adapt(SITE, "zigbee2mqtt/sensor_1", raw(state), RECEIVED).event_type == event_type


@pytest.mark.parametrize(
    "state,event_type",
    [
        ({"contact": False, "battery_low": True, "tamper": False}, "battery_low"),
        ({"water_leak": True, "battery_low": True}, "water_leak"),
        ({"smoke": True, "tamper": True}, "fire_alarm"),
    ],
)
def test_zigbee_state_with_several_facts_is_typed_by_the_most_urgent_one_that_holds(state, event_type):
    env = zigbee.adapt(SITE, "zigbee2mqtt/sensor_1", raw(state), RECEIVED)
    assert env.event_type == event_type and env.payload == state


@pytest.mark.parametrize(
    "payload,event_type",
    [
        (raw({"state": "offline"}), "device_offline"),
        (raw({"state": "online"}), "device_online"),
        (b"offline", "device_offline"),
        (b"online", "device_online"),
    ],
)
def test_zigbee_availability_becomes_device_offline_or_online_at_the_receive_time(payload, event_type):
    env = zigbee.adapt(SITE, "zigbee2mqtt/front_door/availability", payload, RECEIVED)
    assert (env.event_type, env.device_id, env.timestamp) == (event_type, "zigbee-front_door", RECEIVED)
    assert env.payload == {"state": event_type.removeprefix("device_")}


def test_zigbee_without_last_seen_takes_the_receive_time_so_the_key_stays_deterministic():
    first = zigbee.adapt(SITE, "zigbee2mqtt/hall", raw({"occupancy": True}), RECEIVED)
    again = zigbee.adapt(SITE, "zigbee2mqtt/hall", raw({"occupancy": True}), RECEIVED)
    assert first.timestamp == RECEIVED
    assert first.idempotency_key == again.idempotency_key
    assert first.event_id != again.event_id


def test_nvr_line_crossing_is_normalised_to_utc_per_channel():
    env = nvr.adapt(SITE, "nvr/alarms", raw(NVR_LINE))
    assert (env.source, env.event_type, env.device_id) == ("nvr", "line_crossing", "nvr-4419b60a1102-ch4")
    assert env.timestamp == datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
    assert env.payload["region_id"] == 2


@pytest.mark.parametrize(
    "kind,event_type",
    [
        ("VMD", "motion"),
        ("fielddetection", "intrusion_zone"),
        ("videoloss", "video_loss"),
        ("shelteralarm", "tamper"),
        ("tamperdetection", "tamper"),
    ],
)
def test_every_nvr_alarm_maps_to_its_event_type(kind, event_type):
    assert nvr.adapt(SITE, "nvr/alarms", raw({**NVR_LINE, "eventType": kind})).event_type == event_type


def test_nvr_inactive_videoloss_is_the_recorders_keepalive_not_a_lost_signal():
    env = nvr.adapt(SITE, "nvr/alarms", raw({**NVR_LINE, "eventType": "videoloss", "eventState": "inactive"}))
    assert env.event_type == "device_heartbeat" and env.payload["state"] == "inactive"


def test_idp_denied_access_keeps_door_credential_and_result():
    env = idp.adapt(SITE, "idp/access", raw(IDP_DENIED))
    assert (env.source, env.event_type, env.device_id) == ("idp", "door_access", "idp-door-456")
    assert {k: env.payload[k] for k in ("door", "credential", "result")} == {
        "door": "door-456",
        "credential": "card-77",
        "result": "denied",
    }
    assert env.idempotency_key == "site-123-idp-door-456-door_access-2024-01-15T10:30:00Z"


def test_the_same_device_message_always_yields_the_same_key_and_a_fresh_event_id():
    for family, topic, data in [
        ("ajax", "ajax/events", AJAX_INTRUSION),
        ("nvr", "nvr/alarms", NVR_LINE),
        ("idp", "idp/access", IDP_DENIED),
    ]:
        a, b = (ADAPTERS[family](SITE, topic, raw(data), RECEIVED) for _ in range(2))
        assert a.idempotency_key == b.idempotency_key
        assert a.event_id != b.event_id


@pytest.mark.parametrize(
    "family,topic,payload,reason",
    [
        ("ajax", "ajax/events", b'{"hubId": "002A3F1C", "eventCode": "INTRUSION"', "bad_json"),
        ("ajax", "ajax/events", raw({**AJAX_INTRUSION, "eventCode": "SELF_DESTRUCT"}), "unknown_event_type"),
        ("ajax", "ajax/events", raw({k: v for k, v in AJAX_INTRUSION.items() if k != "deviceId"}), "missing_field"),
        ("ajax", "ajax/events", raw({**AJAX_INTRUSION, "timestamp": "yesterday"}), "bad_timestamp"),
        ("zigbee", "zigbee2mqtt/front_door", b"\xff\xfe\x00binary", "not_utf8"),
        ("zigbee", "zigbee2mqtt/front_door", raw({"color_temp": 370}), "unknown_event_type"),
        ("zigbee", "zigbee2mqtt/bridge/state", raw({"state": "online"}), "not_a_device_topic"),
        ("zigbee", "zigbee2mqtt/front_door/set", raw({"state": "ON"}), "not_a_device_topic"),
        ("zigbee", "zigbee2mqtt/front_door/availability", raw({"state": "asleep"}), "unknown_event_type"),
        ("zigbee", "zigbee2mqtt/front_door/availability", b"half-online", "bad_json"),
        ("nvr", "nvr/alarms", raw({"eventType": "VMD"}), "missing_field"),
        ("nvr", "nvr/alarms", raw({**NVR_LINE, "eventType": "audioexception"}), "unknown_event_type"),
        ("nvr", "nvr/alarms", raw({**NVR_LINE, "dateTime": "2024-01-15T10:30:00"}), "bad_timestamp"),
        ("idp", "idp/access", b"[1, 2, 3]", "not_an_object"),
        ("idp", "idp/access", raw({**IDP_DENIED, "decision": "maybe"}), "unknown_event_type"),
        ("idp", "idp/access", raw({**IDP_DENIED, "credential": {"type": "card"}}), "missing_field"),
        ("idp", "idp/access", b'{"pad": "' + b"x" * (5 * 1024 * 1024) + b'"}', "too_large"),
    ],
)
def test_malformed_device_message_is_refused_with_a_stable_reason(family, topic, payload, reason):
    with pytest.raises(AdapterRejected) as refused:
        ADAPTERS[family](SITE, topic, payload, RECEIVED)
    assert refused.value.reason == reason
