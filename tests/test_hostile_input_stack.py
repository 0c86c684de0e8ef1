"""Hostile input through the real stack: Mosquitto -> edge service -> SQS -> drain -> partner, priority
consumer, archive.

A corpus with one message of every bad class this pipeline has met (and the good events that tend to
break it: QoS 0, a 2 MiB event, two sites reusing one event id, a redelivered duplicate) is published
in the middle of good traffic from three sites. Then every good event must be archived once, reach
the partner (only its whitelisted fields) and the priority consumer once; every bad one must be in a
quarantine exactly once with its reason; no window may reach `events-dlq`, and no process may have
restarted or reconnected. A few bodies that a compromised or older edge could put straight into SQS
check the cloud's own refusals the same way.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import duckdb
import paho.mqtt.client as mqtt
import pyarrow.parquet as pq
import pytest
import requests
from dagster import materialize
from paho.mqtt.enums import CallbackAPIVersion

from edge_bridge.envelope import MAX_PAYLOAD_DEPTH, new_event_id
from pipeline.archive import archive_dir, hour_key
from pipeline.assets import events_archive
from pipeline.consumers.service import ConsumerSettings, PriorityConsumer
from pipeline.jobs import drain_events_job
from pipeline.resources import ArchiveStore, DrainSettings, RoutingSettings, SQSResource
from pipeline.routing.delivery import PartnerDelivery, PartnerQueues
from pipeline.stack import aws_client, s3_filesystem
from tests.conftest import queue_counts, sample_envelope, wait_until
from tests.helpers.routing import partner_routing

SITES = ("site-a", "site-b", "site-c")
SUBSCRIBED = ("door_access", "intrusion_alert")
ALLOWED = ["event_id", "event_type", "timestamp", "site_id", "payload.door", "payload.zone"]


def good_event(site: str, n: int, event_type: str | None = None, **overrides):
    kinds = ("door_access", "intrusion_alert", "motion", "temperature")
    payload = overrides.pop("payload", {"door": f"d{n}", "zone": f"z{n % 3}", "credential": "secret-card", "n": n})
    return sample_envelope(
        site_id=site,
        event_type=event_type or kinds[n % len(kinds)],
        device_id=f"{site}-dev-{n % 5}",
        payload=payload,
        **overrides,
    )


def wire(**changes) -> dict:
    data = json.loads(good_event("site-a", 0).to_json())
    data.update(changes)
    return data


def with_payload(text: str) -> bytes:
    head = json.dumps(wire(payload={}))
    return head.replace('"payload": {}', '"payload": ' + text).encode()


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def edge_corpus() -> list[tuple[str, bytes, str]]:
    """(topic, payload, expected quarantine reason): one of each class the edge must refuse."""
    topic = "sites/site-a/events/ajax/door_access"
    pointer = {"bucket": "events-claim-check", "key": "claim-check/site-b/secret.json", "bytes": 10, "sha256": "0" * 64}
    return [
        (topic, b"\xff\xfe\x00garbage", "not_utf8"),
        (topic, b"{not json at all", "bad_json"),
        (topic, b"[1, 2, 3]", "not_an_object"),
        (
            topic,
            json.dumps({k: v for k, v in wire().items() if k != "schema_version"}).encode(),
            "missing_schema_version",
        ),
        (topic, json.dumps(wire(schema_version="2.0")).encode(), "unsupported_major"),
        (topic, json.dumps({k: v for k, v in wire().items() if k != "device_id"}).encode(), "invalid_field"),
        (topic, with_payload(nested(2_000)), "too_deep"),
        (topic, with_payload(nested(MAX_PAYLOAD_DEPTH + 300)), "too_deep"),
        (topic, with_payload('{"reading": NaN}'), "non_finite_number"),
        (topic, with_payload('{"reading": 1e999}'), "non_finite_number"),
        (topic, with_payload('{"name": "\\ud800"}'), "invalid_unicode"),
        (topic, json.dumps(wire(event_id="evt-1\r\nX-Evil: yes")).encode(), "control_characters"),
        (topic, json.dumps(wire(timestamp=1_705_314_600)).encode(), "bad_timestamp"),
        (topic, json.dumps(wire(timestamp="2099-01-01T00:00:00Z")).encode(), "future_timestamp"),
        (topic, json.dumps({"claim_check": pointer, **wire()}).encode(), "reserved_field"),
        (topic, json.dumps(wire(site_id="site-b")).encode(), "site_mismatch"),
        (topic, with_payload(json.dumps({"blob": "x" * (4 * 1024 * 1024 + 10)})), "too_large"),
    ]


def cloud_corpus(events_bucket_pointer_body) -> list[tuple[str, str]]:
    """(SQS body, expected reason): what only the cloud can catch (an edge that did not check)."""
    forged_bucket = json.dumps(
        {
            "claim_check": {
                "bucket": "events-archive",
                "key": "claim-check/site-a/x.json",
                "bytes": 5,
                "sha256": "0" * 64,
            },
            "event_id": "x",
            "site_id": "site-a",
        }
    )
    return [
        (with_payload(nested(400)).decode(), "too_deep"),
        (with_payload('{"v": Infinity}').decode(), "non_finite_number"),
        (forged_bucket, "bad_claim_check"),
        (events_bucket_pointer_body, "claim_check_mismatch"),
    ]


class MqttPublisher:
    """One QoS-1 connection that waits for every PUBACK (QoS 0 messages are fire-and-forget)."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="hostile-publisher")
        self.client.max_inflight_messages_set(100)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.infos = []

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        self.infos.append(self.client.publish(topic, payload, qos=qos))

    def close(self) -> None:
        for info in self.infos:
            info.wait_for_publish(30)
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def routed(tmp_path, aws, monkeypatch):
    with partner_routing(
        tmp_path,
        monkeypatch,
        list(SUBSCRIBED),
        ALLOWED,
        priority={"rules": {"intrusion_alert": "high", "door_access": "medium"}, "default": "low"},
        automation={"rules": [{"event_type": "intrusion_alert", "incident": True}]},
    ) as routed:
        yield routed


def drain_resources(config_path):
    return {
        "sqs": SQSResource(events_queue="events"),
        "archive": ArchiveStore(bucket="events-archive"),
        "drain_settings": DrainSettings(window_seconds=5),
        "routing": RoutingSettings(config_path=str(config_path)),
    }


def edge_quarantine(edge) -> list[dict]:
    path = Path(edge.env["EDGE_STATE_DIR"]) / "quarantine.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def cloud_quarantine() -> list[dict]:
    s3 = aws_client("s3")
    entries = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="events-archive", Prefix="quarantine/"):
        for obj in page.get("Contents", []):
            text = s3.get_object(Bucket="events-archive", Key=obj["Key"])["Body"].read().decode()
            entries += [json.loads(line) for line in text.splitlines() if line.strip()]
    return entries


def archived_keys(hours: set[str]) -> list[tuple[str, str]]:
    filesystem = s3_filesystem()
    keys = []
    for hour in hours:
        from pyarrow.fs import FileSelector

        for info in filesystem.get_file_info(FileSelector(archive_dir("events-archive", hour), allow_not_found=True)):
            table = pq.read_table(info.path, columns=["site_id", "event_id"], filesystem=filesystem)
            keys += list(zip(table.column("site_id").to_pylist(), table.column("event_id").to_pylist()))
    return keys


def test_hostile_input_through_the_whole_stack_loses_no_good_event_and_quarantines_each_bad_one_once(
    edge_factory, mosquitto, aws, routed, tmp_path
):
    routing, config_path, urls, receiver = routed
    edge = edge_factory()
    sender_pids = requests.get(edge.admin_url + "/status", timeout=5).json()["sender_pids"]

    # Good traffic from three sites, with the good-but-awkward cases among it.
    good = [good_event(site, n) for n in range(40) for site in SITES]
    shared_id = new_event_id()
    twins = [
        good_event("site-b", 900, "intrusion_alert", event_id=shared_id),
        good_event("site-c", 901, "intrusion_alert", event_id=shared_id),
    ]
    big = good_event("site-a", 902, "door_access", payload={"door": "vault", "blob": "y" * (2 * 1024 * 1024)})
    qos0 = good_event("site-c", 903, "door_access")
    redelivered = good[7]
    good += twins + [big, qos0]
    corpus = edge_corpus()

    publisher = MqttPublisher(mosquitto.port)
    bad = iter(corpus)
    for n, event in enumerate(good):
        if event is qos0:
            publisher.publish(event.topic, event.to_json(), qos=0)
        else:
            publisher.publish(event.topic, event.to_json())
        if n % 7 == 3:  # interleave: a bad message between good ones, from one connection
            item = next(bad, None)
            if item is not None:
                publisher.publish(item[0], item[1])
    for topic, payload, _ in bad:
        publisher.publish(topic, payload)
    publisher.publish(redelivered.topic, redelivered.to_json())  # the same event again: one effect only
    publisher.close()

    # A compromised edge (or one that predates a check) puts bodies straight into SQS.
    events_url = aws.provisioned.queues["events"]
    from edge_bridge.claim_check import EDGE_PREFIX, check_in

    s3, sqs = aws_client("s3"), aws_client("sqs")
    tampered = good_event("site-b", 904, "door_access")
    tampered_pointer = check_in(
        s3, "events-claim-check", EDGE_PREFIX, tampered.site_id, tampered.event_id, tampered.to_json()
    )
    s3.put_object(
        Bucket="events-claim-check",
        Key=f"{EDGE_PREFIX}/{tampered.site_id}/{tampered.event_id}.json",
        Body=tampered.to_json().replace("d904", "XXXX").encode(),
    )
    cloud_bad = cloud_corpus(tampered_pointer)
    sqs.send_message_batch(
        QueueUrl=events_url, Entries=[{"Id": str(i), "MessageBody": body} for i, (body, _) in enumerate(cloud_bad)]
    )

    unique_good = {e.key for e in good}
    wait_until(
        lambda: sum(queue_counts(events_url)) >= len(unique_good) + len(cloud_bad),
        60,
        message="every good event in SQS",
    )
    wait_until(
        lambda: len(edge_quarantine(edge)) >= len(corpus), 30, message="every bad message in the edge quarantine"
    )

    # The cloud: drain until the queue is empty (every run must succeed), then deliver and consume.
    runs = 0
    while sum(queue_counts(events_url)) > 0:
        assert drain_events_job.execute_in_process(resources=drain_resources(config_path)).success
        runs += 1
        assert runs < 20, "the drain is not making progress"

    consumer = PriorityConsumer(routing, sqs, ConsumerSettings(db_path=str(tmp_path / "consumer.duckdb"))).start()
    partner = routing.partner("acme")
    stats = PartnerDelivery(
        partner, sqs, PartnerQueues(urls[partner.queue_name], urls[partner.dlq_name]), routing.retry_delays_s, None
    ).run(max_seconds=30)
    try:
        handled = lambda: sum(
            consumer.metrics.handled.labels(priority=p)._value.get() for p in ("high", "medium", "low")
        )  # noqa: E731
        wait_until(lambda: handled() >= len(unique_good), 30, message="the consumer to handle every good event")
        wait_until(
            lambda: all(queue_counts(urls[routing.priority.queue_for(p)]) == (0, 0) for p in ("high", "medium", "low")),
            20,
            message="priority queues to empty",
        )
    finally:
        consumer.stop()
    hours = {hour_key(e.timestamp) for e in good}
    for hour in hours:
        assert materialize([events_archive], partition_key=hour, resources=drain_resources(config_path)).success

    # Every good event: archived once, handled once, the partner's share delivered once with only its fields.
    archived = archived_keys(hours)
    assert Counter(archived) == Counter(unique_good), "archive must hold each good (site, id) exactly once"
    with duckdb.connect(str(tmp_path / "consumer.duckdb"), read_only=True) as con:
        handled_keys = con.sql("SELECT site_id, event_id FROM events").fetchall()
        incidents = con.sql("SELECT site_id, event_id FROM incidents").fetchall()
    assert Counter(handled_keys) == Counter(unique_good)
    assert {k for k in incidents} == {e.key for e in good if e.event_type == "intrusion_alert"}
    subscribed = {e.key for e in good if e.event_type in SUBSCRIBED}
    bodies = list(receiver.accepted.values())
    assert Counter((b["location_id"], b["event_id"]) for b in bodies) == Counter(subscribed)
    assert stats.dead_lettered == 0 and receiver.rejected_signatures == 0
    allowed_top = {"event_id", "event_type", "event_time", "location_id", "payload"}
    for body in bodies:
        assert set(body) <= allowed_top and set(body.get("payload", {})) <= {"door", "zone"}
        assert "secret-card" not in json.dumps(body)

    # Every bad message: quarantined exactly once, with its reason, where it was found.
    at_edge = edge_quarantine(edge)
    by_payload = Counter((base64.b64decode(e["payload_b64"]), e["reason"]) for e in at_edge)
    for _, payload, reason in corpus:
        assert by_payload[(payload[:65536], reason)] == 1, (
            f"{reason}: expected once in the edge quarantine, got {[e['reason'] for e in at_edge if base64.b64decode(e['payload_b64']) == payload[:65536]]}"
        )
    assert len(at_edge) == len(corpus), Counter(e["reason"] for e in at_edge)
    in_cloud = Counter(e["reason"] for e in cloud_quarantine())
    assert in_cloud == Counter(reason for _, reason in cloud_bad)

    # Nothing went round: no window in events-dlq, no reconnect, no restarted process.
    assert queue_counts(aws.provisioned.queues["events-dlq"]) == (0, 0)
    assert edge.proc.poll() is None and edge.log().count("connected to MQTT") == 1, edge.log()[-2000:]
    assert "disconnected" not in edge.log()
    assert requests.get(edge.admin_url + "/status", timeout=5).json()["sender_pids"] == sender_pids
