"""The HTTP ingresses against a real broker and real HTTP clients: Hikvision ISAPI notifications and signed
door-access webhooks are answered 200 only once the site broker acknowledged the envelope, 503 while it has
not, and what cannot be read is refused with a 4xx and a quarantine entry."""

from __future__ import annotations

import json
import time

import pytest
import requests

from devstack.tcp_proxy import TcpProxy
from edge_bridge.adapters import nvr
from edge_bridge.forwarder import Forwarder
from edge_bridge.ingress.http import IDP_PATH, NVR_PATH, HttpIngress, sign
from tests.conftest import wait_until
from tests.helpers.forwarder import SiteSubscriber

SITE = "site-h"
SECRET = "door-system-shared-secret"
LINE_CROSSING = {
    "ipAddress": "10.0.3.21",
    "macAddress": "44:19:b6:0a:11:02",
    "channelID": "4",
    "dateTime": "2024-01-15T11:30:00+01:00",
    "activePostCount": "1",
    "eventType": "linedetection",
    "eventState": "active",
    "eventDescription": "linedetection alarm",
    "channelName": "Gate",
    "regionID": "2",
}
ACCESS = {
    "eventId": "e-1",
    "occurredAt": "2024-01-15T10:30:00Z",
    "door": {"id": "door-456", "name": "Main"},
    "credential": {"type": "card", "id": "card-77"},
    "decision": "denied",
    "reason": "outside schedule",
}


def quarantined(forwarder: Forwarder) -> list[dict]:
    return [json.loads(line) for line in forwarder.quarantine.path.read_text().splitlines()]


@pytest.fixture
def proxy(mosquitto):
    """The forwarder reaches the site broker through this, so a test can hold the broker's acks back."""
    proxy = TcpProxy(mosquitto.port).open()
    yield proxy
    proxy.close()


@pytest.fixture
def site(mosquitto, proxy, tmp_path):
    forwarder = Forwarder.connect(SITE, "127.0.0.1", proxy.port, tmp_path / "fwd")
    subscriber = SiteSubscriber(mosquitto.port)
    ingress = HttpIngress(
        forwarder, "127.0.0.1", 0, nvr=True, idp_secret=SECRET, max_body_bytes=256 * 1024, publish_timeout=3
    ).start()
    yield ingress, forwarder, subscriber
    ingress.stop()
    subscriber.close()
    forwarder.close(timeout=0)


@pytest.fixture
def direct_site(mosquitto, tmp_path):
    """The forwarder straight on the broker, so it sees the broker go at once."""
    forwarder = Forwarder.connect(SITE, "127.0.0.1", mosquitto.port, tmp_path / "fwd")
    subscriber = SiteSubscriber(mosquitto.port)
    ingress = HttpIngress(forwarder, "127.0.0.1", 0, nvr=True, idp_secret=SECRET, publish_timeout=3).start()
    yield ingress, forwarder, subscriber
    ingress.stop()
    subscriber.close()
    forwarder.close(timeout=0)


def post_nvr(ingress: HttpIngress, body: bytes, content_type: str = "application/xml", **kwargs) -> requests.Response:
    return requests.post(
        f"http://127.0.0.1:{ingress.port}{NVR_PATH}",
        data=body,
        headers={"Content-Type": content_type},
        timeout=30,
        **kwargs,
    )


def post_idp(ingress: HttpIngress, body: bytes, signature: str | None) -> requests.Response:
    headers = {"Content-Type": "application/json"} | ({"X-Signature": signature} if signature else {})
    return requests.post(f"http://127.0.0.1:{ingress.port}{IDP_PATH}", data=body, headers=headers, timeout=30)


def multipart(notification: bytes, kind: str = "application/xml") -> tuple[bytes, str]:
    """A recorder's post with a picture: the notification part, then a JPEG part."""
    boundary = "MIME_boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="linedetection"\r\nContent-Type: {kind}\r\n'
            f"Content-Length: {len(notification)}\r\n\r\n"
        ).encode()
        + notification
        + (
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="linedetectionPicture"; filename="p.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + b"\xff\xd8\xff\xe0"
        + b"\x00" * 2048
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_an_nvr_notification_in_xml_json_or_multipart_reaches_the_site_broker(site):
    ingress, forwarder, subscriber = site
    assert post_nvr(ingress, nvr.to_xml(LINE_CROSSING)).status_code == 200
    assert (
        post_nvr(
            ingress, nvr.to_json({**LINE_CROSSING, "eventType": "VMD", "channelID": 5}), "application/json"
        ).status_code
        == 200
    )
    assert (
        post_nvr(ingress, *multipart(nvr.to_xml({**LINE_CROSSING, "eventType": "fielddetection"}))).status_code == 200
    )
    keepalive = {**LINE_CROSSING, "eventType": "videoloss", "eventState": "inactive"}
    assert (
        post_nvr(
            ingress, *multipart(json.dumps({"EventNotificationAlert": keepalive}).encode(), "application/json")
        ).status_code
        == 200
    )
    wait_until(lambda: len(subscriber.snapshot()) == 4, 10, message="four notifications at the site broker")
    got = [(m["device_id"], m["event_type"]) for m in subscriber.snapshot()]
    assert got == [
        ("nvr-4419b60a1102-ch4", "line_crossing"),
        ("nvr-4419b60a1102-ch5", "motion"),
        ("nvr-4419b60a1102-ch4", "intrusion_zone"),
        ("nvr-4419b60a1102-ch4", "device_heartbeat"),
    ]
    first = subscriber.snapshot()[0]
    assert first["timestamp"] == "2024-01-15T10:30:00Z"
    assert first["payload"] == {
        "channel": 4,
        "state": "active",
        "description": "linedetection alarm",
        "region_id": 2,
        "nvr_ip": "10.0.3.21",
        "channel_name": "Gate",
        "active_post_count": 1,
    }


def test_an_nvr_is_answered_only_after_the_site_broker_acknowledged_and_503_when_it_did_not_in_time(site, proxy):
    ingress, forwarder, subscriber = site
    proxy.slow(1.5)  # the broker's PUBACK reaches the forwarder 1.5 s late
    started = time.monotonic()
    answer = post_nvr(ingress, nvr.to_xml(LINE_CROSSING))
    took = time.monotonic() - started
    assert answer.status_code == 200 and took >= 1.4, f"answered {answer.status_code} after {took:.2f} s"
    proxy.slow(5)  # later than the ingress waits (3 s): the recorder is told to send again
    answer = post_nvr(ingress, nvr.to_xml({**LINE_CROSSING, "channelID": "6"}))
    assert answer.status_code == 503 and answer.headers["Retry-After"]
    proxy.slow(0)


def test_with_the_site_broker_down_devices_get_503_and_their_resend_arrives_once_it_is_back(direct_site, mosquitto):
    ingress, forwarder, subscriber = direct_site
    mosquitto.stop()
    wait_until(lambda: not forwarder.client.is_connected(), 10, message="the forwarder to see the broker gone")
    assert post_nvr(ingress, nvr.to_xml(LINE_CROSSING)).status_code == 503
    assert post_idp(ingress, json.dumps(ACCESS).encode(), sign(SECRET, json.dumps(ACCESS).encode())).status_code == 503
    mosquitto.start()
    answer = wait_until(
        lambda: post_nvr(ingress, nvr.to_xml(LINE_CROSSING)).status_code == 200,
        20,
        interval=0.5,
        message="the resend answered 200",
    )
    assert answer
    wait_until(lambda: subscriber.snapshot(), 10, message="the notification at the site broker")
    assert [m["event_type"] for m in subscriber.snapshot()] == ["line_crossing"]
    assert quarantined(forwarder) == []


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<EventNotificationAlert><eventDescription>&lol3;</eventDescription></EventNotificationAlert>"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<EventNotificationAlert><eventDescription>&x;</eventDescription></EventNotificationAlert>"""


@pytest.mark.parametrize(
    "body,content_type,reason",
    [
        (b"<EventNotificationAlert><ipAddress>10.0.3.21", "application/xml", "bad_xml"),
        (b"<html><body>hello</body></html>", "text/html", "bad_xml"),
        (BILLION_LAUGHS, "application/xml", "forbidden_xml"),
        (EXTERNAL_ENTITY, "application/xml", "forbidden_xml"),
        (b"\xff\xfe not json", "application/json", "not_utf8"),
        (
            b"--x\r\nContent-Type: image/jpeg\r\n\r\n\xff\xd8\r\n--x--\r\n",
            "multipart/form-data; boundary=x",
            "bad_multipart",
        ),
    ],
)
def test_an_nvr_body_that_is_no_notification_is_refused_400_quarantined_and_the_next_one_arrives(
    site, body, content_type, reason
):
    ingress, forwarder, subscriber = site
    answer = post_nvr(ingress, body, content_type)
    assert answer.status_code == 400 and answer.json()["error"] == reason
    assert post_nvr(ingress, nvr.to_xml(LINE_CROSSING)).status_code == 200
    wait_until(lambda: subscriber.snapshot(), 10, message="the next notification at the site broker")
    [entry] = quarantined(forwarder)
    assert (entry["topic"], entry["reason"]) == ("nvr/isapi", reason)


def test_an_nvr_event_the_catalog_has_no_type_for_is_quarantined_and_answered_200_so_it_is_not_resent(site):
    ingress, forwarder, subscriber = site
    assert post_nvr(ingress, nvr.to_xml({**LINE_CROSSING, "eventType": "diskfull"})).status_code == 200
    [entry] = quarantined(forwarder)
    assert (entry["reason"], entry["detail"]) == ("unknown_event_type", "nvr eventType 'diskfull'")
    assert forwarder.counts[("nvr", "quarantined")] == 1


def test_an_nvr_body_over_the_bound_is_refused_413_unread_and_one_without_length_411(site):
    ingress, forwarder, subscriber = site
    answer = post_nvr(ingress, b"<" + b"x" * (300 * 1024))
    assert answer.status_code == 413
    [entry] = quarantined(forwarder)
    assert entry["reason"] == "too_large" and entry["payload_bytes"] == 0
    chunked = post_nvr(ingress, iter([nvr.to_xml(LINE_CROSSING)]))  # a generator body goes chunked, without a length
    assert chunked.status_code == 411
    assert post_nvr(ingress, nvr.to_xml(LINE_CROSSING)).status_code == 200


def test_a_signed_door_decision_reaches_the_site_broker(site):
    ingress, forwarder, subscriber = site
    body = json.dumps(ACCESS).encode()
    assert post_idp(ingress, body, sign(SECRET, body)).status_code == 200
    bare_hex = sign(SECRET, body.replace(b"e-1", b"e-2")).removeprefix("sha256=")
    assert post_idp(ingress, body.replace(b"e-1", b"e-2"), bare_hex).status_code == 200
    wait_until(lambda: len(subscriber.snapshot()) == 2, 10, message="the decisions at the site broker")
    assert [
        (m["event_type"], m["device_id"], m["payload"]["idp_event_id"], m["payload"]["result"])
        for m in subscriber.snapshot()
    ] == [
        ("door_access", "idp-door-456", "e-1", "denied"),
        ("door_access", "idp-door-456", "e-2", "denied"),
    ]


@pytest.mark.parametrize(
    "signature", [None, "sha256=" + "0" * 64, "not-hex", sign("another-secret", json.dumps(ACCESS).encode())]
)
def test_a_door_webhook_without_the_right_signature_is_401_counted_and_goes_nowhere(site, signature):
    ingress, forwarder, subscriber = site
    body = json.dumps(ACCESS).encode()
    assert post_idp(ingress, body, signature).status_code == 401
    assert post_idp(ingress, body, sign(SECRET, body)).status_code == 200  # the same body, signed, goes through
    wait_until(lambda: subscriber.snapshot(), 10, message="the signed decision at the site broker")
    assert len(subscriber.snapshot()) == 1
    assert quarantined(forwarder) == []
    assert ingress.counts["idp:bad_signature"] == 1


def test_a_signed_door_decision_that_cannot_be_read_is_refused_400_and_quarantined(site):
    ingress, forwarder, subscriber = site
    for body in (b"[1, 2, 3]", json.dumps({**ACCESS, "decision": "maybe"}).encode()):
        assert post_idp(ingress, body, sign(SECRET, body)).status_code == 400
    assert [e["reason"] for e in quarantined(forwarder)] == ["not_an_object", "unknown_event_type"]


def test_status_and_metrics_count_each_familys_messages_and_answers(site):
    ingress, forwarder, subscriber = site
    assert post_nvr(ingress, nvr.to_xml(LINE_CROSSING)).status_code == 200
    assert post_nvr(ingress, b"garbage", "text/plain").status_code == 400
    status = requests.get(f"http://127.0.0.1:{ingress.port}/status", timeout=5).json()
    assert status["counts"] == {"nvr:200": 1, "nvr:400": 1}
    assert forwarder.counts[("nvr", "forwarded")] == 1 and forwarder.counts[("nvr", "quarantined")] == 1
    assert requests.get(f"http://127.0.0.1:{ingress.port}/nothing", timeout=5).status_code == 404
