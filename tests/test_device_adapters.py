"""The devices' own vocabulary: zigbee2mqtt's buttons, plugs, sirens and `last_seen` formats, and Hikvision's
ISAPI notifications in XML and JSON, become the right catalog types at the right times."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from edge_bridge.adapters import AdapterRejected, nvr, zigbee
from edge_bridge.catalog import load_event_catalog

SITE = "site-123"
RECEIVED = datetime(2024, 1, 15, 10, 30, 5, tzinfo=UTC)


def adapt_state(state: dict, name: str = "device_1"):
    return zigbee.adapt(SITE, f"zigbee2mqtt/{name}", json.dumps(state).encode(), RECEIVED)


@pytest.mark.parametrize(
    "state,event_type",
    [
        (
            {"action": "emergency", "battery": 100, "linkquality": 80},
            "panic_button",
        ),  # an SOS button (Heiman, Tuya, Develco)
        ({"action": "SOS"}, "panic_button"),
        ({"sos": True, "battery": 90}, "panic_button"),
        ({"sos": False, "battery": 90}, "device_heartbeat"),
        ({"action": "single", "battery": 100, "linkquality": 80}, "button_press"),
        ({"action": "brightness_move_up", "linkquality": 80}, "button_press"),
        (
            {"action": "double", "battery_low": True},
            "button_press",
        ),  # the press is what happened; the battery rides along
        ({"action": "", "battery": 100, "linkquality": 80}, "device_heartbeat"),  # zigbee2mqtt's cleared action
        ({"action": "single", "smoke": True}, "fire_alarm"),
        (
            {"state": "ON", "power": 1250.5, "energy": 3.2, "voltage": 230, "current": 5.4, "linkquality": 120},
            "switch_state",
        ),
        ({"state": "OFF", "linkquality": 120}, "switch_state"),
        ({"power": 0.4, "linkquality": 120}, "switch_state"),
        ({"state": "ON", "brightness": 254, "color_temp": 370}, "switch_state"),  # a light
        ({"alarm": True, "battery": 90, "linkquality": 70, "volume": "high"}, "siren"),
        ({"alarm": False, "battery": 90, "linkquality": 70}, "siren"),
        ({"alarm": False, "battery_low": True}, "siren"),
        ({"alarm": True, "tamper": True}, "tamper"),
        ({"contact": True, "state": "ON"}, "contact"),
    ],
)
def test_a_zigbee_state_is_typed_by_what_the_device_reports(state, event_type):
    env = adapt_state(state)
    assert env.event_type == event_type and env.payload == state
    assert event_type in load_event_catalog() and "zigbee" in load_event_catalog()[event_type].families


@pytest.mark.parametrize(
    "last_seen,expected",
    [
        ("2024-01-15T10:30:00.000Z", datetime(2024, 1, 15, 10, 30, tzinfo=UTC)),  # ISO_8601
        ("2024-01-15T11:30:00.000+0100", datetime(2024, 1, 15, 10, 30, tzinfo=UTC)),  # ISO_8601_local, older
        ("2024-01-15T11:30:00+01:00", datetime(2024, 1, 15, 10, 30, tzinfo=UTC)),  # ISO_8601_local
        (1705314600123, datetime(2024, 1, 15, 10, 30, 0, 123000, tzinfo=UTC)),  # epoch (ms)
        ("1705314600123", datetime(2024, 1, 15, 10, 30, 0, 123000, tzinfo=UTC)),
        ("5 seconds ago", RECEIVED - timedelta(seconds=5)),  # relative
        ("2 min ago", RECEIVED - timedelta(minutes=2)),
        ("just now", RECEIVED),
        ("disable", RECEIVED),  # unreadable: the state still counts, at the receive time
        ("2024-01-15T10:30:00", RECEIVED),  # no offset: not a time to trust
        (None, RECEIVED),
    ],
)
def test_last_seen_in_each_of_zigbee2mqtts_formats_is_the_event_time(last_seen, expected):
    env = adapt_state({"contact": True, "last_seen": last_seen})
    assert env.event_type == "contact" and env.timestamp == expected
    assert env.payload["last_seen"] == last_seen


@pytest.mark.parametrize(
    "topic,kind",
    [
        ("zigbee2mqtt/front_door", "state"),
        ("zigbee2mqtt/ground_floor/front_door", "state"),  # a friendly name with a slash
        ("zigbee2mqtt/ground_floor/front_door/availability", "availability"),
        ("zigbee2mqtt/bridge/state", "bridge"),
        ("zigbee2mqtt/bridge/response/device/rename", "bridge"),
        ("zigbee2mqtt/front_door/set", "command"),
        ("zigbee2mqtt/front_door/set/state", "command"),
        ("zigbee2mqtt/front_door/get", "command"),
        ("homeassistant/sensor/x/config", "foreign"),
    ],
)
def test_a_zigbee2mqtt_topic_says_whether_it_is_a_device_event(topic, kind):
    assert zigbee.topic_kind(topic)[0] == kind


def test_a_friendly_name_with_a_slash_is_the_device_id():
    env = zigbee.adapt(SITE, "zigbee2mqtt/ground_floor/front_door/availability", b"offline", RECEIVED)
    assert (env.event_type, env.device_id) == ("device_offline", "zigbee-ground_floor/front_door")


def test_a_base_topic_of_the_sites_own_is_read_with_it():
    assert zigbee.topic_kind("z2m/site-a/front_door/availability", "z2m/site-a") == (
        "availability",
        "front_door/availability",
    )
    assert zigbee.topic_kind("z2m/site-a/bridge/state", "z2m/site-a/") == ("bridge", "bridge/state")


LINE = {
    "ipAddress": "10.0.3.21",
    "macAddress": "44:19:b6:0a:11:02",
    "channelID": "4",
    "dateTime": "2024-01-15T11:30:00+01:00",
    "activePostCount": "3",
    "eventType": "linedetection",
    "eventState": "active",
    "eventDescription": "linedetection alarm",
    "channelName": "Gate",
    "regionID": "2",
}
# As a DS-7600 series recorder posts it: namespaced, with coordinates that stay out of the envelope.
RECORDER_XML = b"""<?xml version="1.0" encoding="UTF-8"?>
<EventNotificationAlert version="2.0" xmlns="http://www.hikvision.com/ver20/XMLSchema">
<ipAddress>10.0.3.21</ipAddress>
<ipv6Address>::ffff:10.0.3.21</ipv6Address>
<portNo>80</portNo>
<protocol>HTTP</protocol>
<macAddress>44:19:b6:0a:11:02</macAddress>
<dynChannelID>7</dynChannelID>
<dateTime>2024-01-15T11:30:00+01:00</dateTime>
<activePostCount>1</activePostCount>
<eventType>fielddetection</eventType>
<eventState>active</eventState>
<eventDescription>fielddetection alarm</eventDescription>
<channelName>Yard</channelName>
<DetectionRegionList>
<DetectionRegionEntry>
<regionID>3</regionID>
<sensitivityLevel>50</sensitivityLevel>
<RegionCoordinatesList><RegionCoordinates><positionX>100</positionX><positionY>200</positionY></RegionCoordinates></RegionCoordinatesList>
</DetectionRegionEntry>
</DetectionRegionList>
</EventNotificationAlert>"""


def test_an_isapi_xml_notification_as_a_recorder_posts_it_becomes_its_event():
    env = nvr.adapt(SITE, "nvr/isapi", RECORDER_XML, RECEIVED)
    assert (env.event_type, env.device_id, env.timestamp) == (
        "intrusion_zone",
        "nvr-4419b60a1102-ch7",
        datetime(2024, 1, 15, 10, 30, tzinfo=UTC),
    )
    assert env.payload == {
        "channel": 7,
        "state": "active",
        "description": "fielddetection alarm",
        "region_id": 3,
        "nvr_ip": "10.0.3.21",
        "channel_name": "Yard",
        "active_post_count": 1,
    }


@pytest.mark.parametrize(
    "encode",
    [nvr.to_xml, nvr.to_json, lambda d: json.dumps({"EventNotificationAlert": d}).encode()],
    ids=["xml", "json", "wrapped-json"],
)
def test_the_xml_and_json_forms_of_one_notification_are_the_same_envelope(encode):
    env = nvr.adapt(SITE, "nvr/isapi", encode(LINE), RECEIVED)
    assert (env.event_type, env.device_id, env.idempotency_key) == (
        "line_crossing",
        "nvr-4419b60a1102-ch4",
        "site-123-nvr-4419b60a1102-ch4-line_crossing-2024-01-15T10:30:00Z",
    )
    assert env.payload["region_id"] == 2 and env.payload["channel_name"] == "Gate"


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"<EventNotificationAlert><eventType>VMD", "bad_xml"),
        (b"<other/>", "bad_xml"),
        (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><EventNotificationAlert/>', "forbidden_xml"),
        (nvr.to_xml({**LINE, "macAddress": None}), "missing_field"),
        (nvr.to_xml({**LINE, "channelID": "four"}), "invalid_field"),
        (nvr.to_xml({**LINE, "dateTime": "2024-01-15T11:30:00"}), "bad_timestamp"),
        (nvr.to_xml({**LINE, "eventType": "diskfull"}), "unknown_event_type"),
    ],
)
def test_an_isapi_notification_that_cannot_be_read_is_refused_with_a_reason(raw, reason):
    with pytest.raises(AdapterRejected) as refused:
        nvr.adapt(SITE, "nvr/isapi", raw, RECEIVED)
    assert refused.value.reason == reason
