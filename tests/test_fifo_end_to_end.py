"""The cloud side with the events queue standard and FIFO (`fifo: true` in config/stack.yaml): a drain to
the archive, partner and priority queues, the events-dlq replay, and a partner DLQ's redelivery.

With `fifo: true` the events queue and its DLQ are FIFO (`events.fifo`, `events-dlq.fifo`): the edge
groups by site and deduplicates by event id. Partner and priority queues stay standard (a partner's
backoff holds a message invisible, which in a FIFO group would hold every later event of its site),
but the moves between queues work on FIFO queues too, which the last test checks with FIFO partner
queues made for it. Real queues on the local emulator.
"""

from __future__ import annotations

import json

import pyarrow.compute as pc
import pytest
import yaml
from dagster import materialize

from edge_bridge.sqs_sender import Outgoing, SqsBatchSender
from pipeline.archive import hour_key, read_archive_hour
from pipeline.assets import events_archive
from pipeline.jobs import drain_events_job
from pipeline.provisioning import ensure_queue_with_dlq, provision
from pipeline.replay import events_dlq_replay_job
from pipeline.resources import ArchiveStore, DrainSettings, RoutingSettings, SQSResource
from pipeline.routing.delivery import PartnerDelivery, PartnerQueues, move_messages, redeliver_partner_dlq
from pipeline.routing.fifo import UNPARSEABLE_GROUP, group_of, send_fields
from pipeline.routing.logs import AttemptLog
from pipeline.stack import EventsQueueConfig, StackConfig, aws_client, s3_filesystem
from tests.conftest import queue_counts, receive_all, sample_envelope
from tests.helpers.routing import partner_routing

SITES = ("site-a", "site-b")


@pytest.fixture(params=["standard", "fifo"])
def events_queue(request, aws, tmp_path, monkeypatch):
    """The stack provisioned from a config/stack.yaml with `fifo` false or true; yields (name, url, dlq url)."""
    config = StackConfig(events_queue=EventsQueueConfig(fifo=request.param == "fifo"))
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    monkeypatch.setenv("PIPELINE_STACK_CONFIG", str(path))
    queues = provision(config).queues
    name = config.events_queue.queue_name
    monkeypatch.setenv("PIPELINE_EVENTS_QUEUE", name)
    assert name.endswith(".fifo") == (request.param == "fifo")
    return name, queues[name], queues[config.events_queue.dlq_name]


def send_as_the_edge(url: str, events) -> None:
    """What the edge's sender does: on a FIFO queue, group = site and deduplication id = event id."""
    sender = SqsBatchSender(aws_client("sqs"), url, fifo=url.endswith(".fifo"))
    for start in range(0, len(events), 10):
        chunk = events[start : start + 10]
        outcome = sender.send(
            [Outgoing(key=i, event_id=e.event_id, site_id=e.site_id, body=e.to_json()) for i, e in enumerate(chunk)]
        )
        assert len(outcome.sent) == len(chunk), outcome


def events_of(n: int, kinds=("door_access", "intrusion_alert", "motion")):
    return [
        sample_envelope(site_id=SITES[i % 2], event_type=kinds[i % len(kinds)], device_id=f"dev-{i}") for i in range(n)
    ]


def resources(queue_name: str, routing_path=None):
    return {
        "sqs": SQSResource(events_queue=queue_name),
        "archive": ArchiveStore(bucket="events-archive"),
        "drain_settings": DrainSettings(window_seconds=5),
        "routing": RoutingSettings(config_path=str(routing_path) if routing_path else None),
    }


def drain_until_empty(queue_name: str, url: str, routing_path, max_runs: int = 12) -> int:
    """Drain runs while the queue has visible messages, as events_queue_sensor launches them; returns the runs.

    A FIFO queue hides a site's later messages while its earlier ones are in a drain's window, so a run
    takes one receive per site (one message per site on the emulator, up to ten on SQS) and the next run
    takes the next."""
    runs = 0
    while queue_counts(url)[0]:
        assert runs < max_runs, f"still {queue_counts(url)} in the queue after {runs} drain runs"
        assert drain_events_job.execute_in_process(resources=resources(queue_name, routing_path)).success
        runs += 1
    return runs


@pytest.fixture
def routed(tmp_path, monkeypatch, events_queue):
    with partner_routing(
        tmp_path,
        monkeypatch,
        ["door_access", "intrusion_alert"],
        ["event_id", "event_type", "timestamp", "site_id", "payload.door.*"],
        priority={"rules": {"intrusion_alert": "high", "door_access": "medium"}, "default": "low"},
        delays=(1, 1, 2),
    ) as routed:
        yield routed


def test_a_drain_takes_the_events_queue_to_the_archive_partner_and_priority_queues(events_queue, routed):
    name, url, _ = events_queue
    routing, path, urls, _ = routed
    events = events_of(6)
    send_as_the_edge(url, events)
    send_as_the_edge(url, events[:3])  # the edge resending after a lost answer

    drain_until_empty(name, url, path)

    assert queue_counts(url) == (0, 0)
    partner = receive_all(urls["partner-acme"], timeout=0.5)
    assert sorted({m["event_id"] for m in partner}) == sorted(
        e.event_id for e in events if e.event_type in ("door_access", "intrusion_alert")
    )
    per_priority = {
        p: {b["event_id"] for b in receive_all(urls[routing.priority.queue_for(p)], timeout=0.5)}
        for p in ("high", "medium", "low")
    }
    assert {p: len(ids) for p, ids in per_priority.items()} == {"high": 2, "medium": 2, "low": 2}
    hour = hour_key(events[0].timestamp)
    assert materialize([events_archive], partition_key=hour, resources=resources(name, path)).success
    archived = read_archive_hour(s3_filesystem(), "events-archive", hour)
    assert sorted(pc.unique(archived.column("event_id")).to_pylist()) == sorted(e.event_id for e in events)
    assert archived.num_rows == len(events), "each event once, whatever the queue delivered twice"


def test_the_events_dlq_replay_sends_every_valid_envelope_back_and_quarantines_the_rest(events_queue):
    name, url, dlq_url = events_queue
    sqs = aws_client("sqs")
    good = events_of(6)
    poison = "{not json"
    for i, (body, site) in enumerate([*((e.to_json(), e.site_id) for e in good), (poison, "x")]):
        extra = {"MessageGroupId": site, "MessageDeduplicationId": f"dead-{i}"} if dlq_url.endswith(".fifo") else {}
        sqs.send_message(QueueUrl=dlq_url, MessageBody=body, **extra)

    result = events_dlq_replay_job.execute_in_process(resources=resources(name))

    assert result.success and result.output_for_node("replay_events_dlq_into_events") == len(good)
    assert queue_counts(dlq_url) == (0, 0), "the poison is quarantined, everything else went back"
    back = []
    while batch := sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0, MessageSystemAttributeNames=["All"]
    ).get("Messages", []):
        back += batch
        sqs.delete_message_batch(
            QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)]
        )
    assert sorted(json.loads(m["Body"])["event_id"] for m in back) == sorted(e.event_id for e in good)
    if url.endswith(".fifo"):
        assert {m["Attributes"]["MessageGroupId"] for m in back} == set(SITES), (
            "each replayed event in its site's group"
        )
        per_site = {
            site: [json.loads(m["Body"])["event_id"] for m in back if m["Attributes"]["MessageGroupId"] == site]
            for site in SITES
        }
        assert per_site == {site: [e.event_id for e in good if e.site_id == site] for site in SITES}, (
            "in their order within a site"
        )


def test_a_replayed_message_is_grouped_by_its_site_and_deduplicated_by_its_body_and_message_id():
    body = sample_envelope(site_id="site-9").to_json()
    fields = send_fields("https://sqs/q/events.fifo", body, "m-1")
    assert fields["MessageGroupId"] == "site-9"
    assert (
        fields["MessageDeduplicationId"]
        == send_fields("https://sqs/q/events.fifo", body, "m-1")["MessageDeduplicationId"]
    )
    assert (
        fields["MessageDeduplicationId"]
        != send_fields("https://sqs/q/events.fifo", body, "m-2")["MessageDeduplicationId"]
    )
    assert send_fields("https://sqs/q/events", body, "m-1") == {}
    assert group_of("{not json") == group_of("[1]") == group_of('{"site_id": "a b"}') == UNPARSEABLE_GROUP


@pytest.fixture
def partner_queues(events_queue, routed):
    """The partner's queue and DLQ: as provisioned (standard) next to a standard events queue, FIFO ones
    made for the test next to a FIFO events queue, so set_aside and the moves run on FIFO queues."""
    routing, _, urls, receiver = routed
    partner = routing.partner("acme")
    if not events_queue[0].endswith(".fifo"):
        return PartnerQueues(urls[partner.queue_name], urls[partner.dlq_name])
    url, dlq = ensure_queue_with_dlq(
        aws_client("sqs"),
        f"{partner.queue_name}.fifo",
        f"{partner.dlq_name}.fifo",
        routing.max_attempts + 3,
        {"FifoQueue": "true", "VisibilityTimeout": "30"},
    )
    return PartnerQueues(url, dlq)


def test_a_partner_dlq_is_redelivered_once_the_partner_answers_again(events_queue, routed, partner_queues):
    name, url, _ = events_queue
    routing, path, urls, receiver = routed
    partner = routing.partner("acme")
    events = events_of(4, kinds=("door_access",))
    send_as_the_edge(url, events)
    drain_until_empty(name, url, path)
    if partner_queues.url != urls[partner.queue_name]:
        assert move_messages(aws_client("sqs"), urls[partner.queue_name], partner_queues.url, 100) == len(events)
    receiver.always_fail = True
    log = AttemptLog(s3_filesystem(), "events-archive", tag="acme-")
    PartnerDelivery(partner, aws_client("sqs"), partner_queues, routing.retry_delays_s, log).run(max_seconds=60)
    assert queue_counts(partner_queues.dlq_url)[0] == len(events), (
        "every message set aside in the DLQ after its attempts"
    )

    receiver.always_fail = False
    report = redeliver_partner_dlq(partner, aws_client("sqs"), partner_queues, None)
    assert report.partner_answered and report.moved == len(events) - 1, report
    PartnerDelivery(partner, aws_client("sqs"), partner_queues, routing.retry_delays_s, log).run(max_seconds=30)

    assert set(receiver.accepted) == {e.dedupe_id for e in events}
    assert queue_counts(partner_queues.dlq_url) == (0, 0) and queue_counts(partner_queues.url) == (0, 0)
