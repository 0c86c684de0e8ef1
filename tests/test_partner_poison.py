"""A poison partner message is its own fate alone: delivery and redelivery set it aside with its reason
and go on with the rest; partner answers are read with a bound. Real SQS emulator, real HTTP receivers."""

import json
import threading
import time

import pytest
import requests

from devstack.partner_receiver import PartnerReceiver
from pipeline.routing.delivery import PartnerDelivery, redeliver_partner_dlq
from pipeline.routing.webhooks import RESPONSE_READ_LIMIT, post_signed
from pipeline.stack import aws_client
from tests.conftest import queue_counts
from tests.test_partner_delivery import new_secret, partners  # noqa: F401 - the fixture


def partner_message(event_id: str, webhook_id: str | None = None, **body) -> str:
    item = {"event_id": event_id, "body": json.dumps({"event_id": event_id, **body})}
    if webhook_id is not None:
        item["webhook_id"] = webhook_id
    return json.dumps(item)


POISON = {
    "{not a partner message": "bad_json",
    "[1, 2]": "not_an_object",
    json.dumps({"event_id": "no-body"}): "missing_field",
    json.dumps({"event_id": "dict-body", "body": {"zone": "z1"}}): "bad_field",
    json.dumps({"event_id": "crlf\r\nx-injected: 1", "body": "{}"}): "request_refused",
    partner_message("boom"): "unexpected_error",
}


@pytest.fixture
def boom(monkeypatch):
    """The HTTP library raises something unforeseen while posting the message whose webhook-id is 'boom'."""
    real_send = requests.adapters.HTTPAdapter.send

    def send(self, request, *args, **kwargs):
        if request.headers.get("webhook-id") == "boom":
            raise RuntimeError("an exception nobody foresaw")
        return real_send(self, request, *args, **kwargs)

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", send)


def send_bodies(url: str, bodies: list[str]) -> None:
    sqs = aws_client("sqs")
    for start in range(0, len(bodies), 10):
        sqs.send_message_batch(
            QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies[start : start + 10])]
        )


def dlq_contents(url: str) -> dict[str, tuple[str, str]]:
    """body -> (failure_reason, failure_detail) of every message in a DLQ, left in place."""
    sqs, found = aws_client("sqs"), {}
    while batch := sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=30, MessageAttributeNames=["All"]
    ).get("Messages", []):
        for m in batch:
            attrs = m.get("MessageAttributes", {})
            found[m["Body"]] = (
                attrs.get("failure_reason", {}).get("StringValue"),
                attrs.get("failure_detail", {}).get("StringValue"),
            )
    return found


def deliver(routing, queues, name):
    return PartnerDelivery(routing.partner(name), aws_client("sqs"), queues[name], routing.retry_delays_s, None).run(
        max_seconds=30
    )


def test_each_poison_message_is_dead_lettered_alone_with_its_reason_and_its_batch_mates_are_delivered(partners, boom):
    routing, receivers, queues = partners
    good = [partner_message(f"good-{i}") for i in range(4)]
    send_bodies(queues["healthy"].url, good[:2] + list(POISON) + good[2:])  # ten: one receive batch

    stats = deliver(routing, queues, "healthy")

    assert set(receivers["healthy"].accepted) == {f"good-{i}" for i in range(4)}
    assert stats.delivered == 4 and stats.malformed == len(POISON)
    assert stats.malformed_reasons == {reason: 1 for reason in POISON.values()}
    dead = dlq_contents(queues["healthy"].dlq_url)
    assert {body: reason for body, (reason, _) in dead.items()} == POISON
    assert dead[partner_message("boom")][1] == "RuntimeError: an exception nobody foresaw"
    assert dead[json.dumps({"event_id": "dict-body", "body": {"zone": "z1"}})][1].startswith("body is dict")
    assert queue_counts(queues["healthy"].url) == (0, 0)


def test_delivery_signs_with_the_drains_webhook_id_and_falls_back_to_the_event_id(partners):
    routing, receivers, queues = partners
    send_bodies(
        queues["healthy"].url,
        [
            partner_message("e-1", webhook_id="site-a/e-1"),
            partner_message("e-2"),
            partner_message("e-3", webhook_id=""),
        ],
    )

    deliver(routing, queues, "healthy")

    assert set(receivers["healthy"].accepted) == {"site-a/e-1", "e-2", "e-3"}
    assert receivers["healthy"].accepted["site-a/e-1"]["event_id"] == "e-1"


def test_redelivery_probes_the_first_well_formed_message_and_leaves_the_poison_in_the_dlq_with_its_reason(partners):
    routing, receivers, queues = partners
    sqs, dlq = aws_client("sqs"), queues["healthy"].dlq_url
    marked = partner_message("marked")  # well-formed, but delivery found it poison and said so
    sqs.send_message(
        QueueUrl=dlq,
        MessageBody=marked,
        MessageAttributes={"failure_reason": {"DataType": "String", "StringValue": "unexpected_error"}},
    )
    poison = [
        "{not a partner message",
        json.dumps({"event_id": "dict-body", "body": {"zone": "z1"}}),
        json.dumps({"body": "{}"}),
    ]
    good = [partner_message(f"late-{i}", webhook_id=f"site-a/late-{i}") for i in range(12)]
    send_bodies(dlq, poison[:2] + good + poison[2:])  # poison ahead of the probe, and poison only the move meets

    report = redeliver_partner_dlq(routing.partner("healthy"), sqs, queues["healthy"], None)

    assert report.partner_answered and report.moved == 11
    assert sorted(p["reason"] for p in report.poison) == ["bad_field", "bad_json", "missing_field", "unexpected_error"]
    assert len(receivers["healthy"].accepted) == 1 and next(iter(receivers["healthy"].accepted)).startswith(
        "site-a/late-"
    )
    deliver(routing, queues, "healthy")
    assert set(receivers["healthy"].accepted) == {f"site-a/late-{i}" for i in range(12)}
    assert queue_counts(dlq) == (4, 0), "the poison is left in view"
    assert {body: reason for body, (reason, _) in dlq_contents(dlq).items()} == {
        marked: "unexpected_error",
        **{p: None for p in poison},
    }


def test_a_message_whose_probe_raises_is_marked_in_the_dlq_and_the_next_one_probes(partners, boom):
    routing, receivers, queues = partners
    sqs, dlq = aws_client("sqs"), queues["healthy"].dlq_url
    send_bodies(dlq, [partner_message("boom"), partner_message("e-1"), partner_message("e-2")])

    report = redeliver_partner_dlq(routing.partner("healthy"), sqs, queues["healthy"], None)

    assert report.partner_answered and report.moved == 1
    assert [(p["reason"], p["detail"]) for p in report.poison] == [
        ("unexpected_error", "RuntimeError: an exception nobody foresaw")
    ]
    assert len(receivers["healthy"].accepted) == 1
    assert queue_counts(dlq) == (1, 0), "only the marked poison is left, in view"
    assert dlq_contents(dlq) == {
        partner_message("boom"): ("unexpected_error", "RuntimeError: an exception nobody foresaw")
    }


def test_redelivery_job_lists_the_poison_each_partner_keeps(partners, tmp_path):
    from pipeline.partner_jobs import partner_redelivery_job
    from pipeline.resources import ArchiveStore, RoutingSettings, SQSResource

    routing, receivers, queues = partners
    send_bodies(queues["down"].dlq_url, ["{not a partner message"])
    send_bodies(queues["healthy"].dlq_url, [partner_message("e-1"), partner_message("e-2")])

    result = partner_redelivery_job.execute_in_process(
        resources={
            "sqs": SQSResource(events_queue="events"),
            "archive": ArchiveStore(bucket="events-archive"),
            "routing": RoutingSettings(config_path=str(tmp_path / "routing.yaml")),
        }
    )

    assert result.success and result.output_for_node("redeliver_partner_dlqs") == {
        "recovering": 0,
        "down": 0,
        "healthy": 1,
    }
    metadata = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"][0].event_specific_data.metadata
    assert [p["reason"] for p in metadata["poison"].value["down"]] == ["bad_json"]


@pytest.mark.parametrize("status_fails", [False, True], ids=["accepted", "refused"])
def test_a_partner_that_answers_with_an_endless_body_is_read_only_up_to_the_bound(status_fails):
    receiver = PartnerReceiver(new_secret(), always_fail=status_fails, stream_body=(16384, 0)).start()
    outcome = {}
    try:
        worker = threading.Thread(
            target=lambda: outcome.update(
                result=post_signed(requests.Session(), receiver.url, receiver.secret, "e-1", "{}", 5)
            ),
            daemon=True,
        )
        worker.start()
        worker.join(20)
        assert not worker.is_alive(), "still reading the partner's endless answer"
    finally:
        receiver.stop()
    result = outcome["result"]
    assert result.ok is not status_fails
    if status_fails:
        assert result.error == "HTTP 500: " + "x" * 200
    assert RESPONSE_READ_LIMIT <= receiver.streamed_bytes


def test_a_partner_that_drips_its_answer_is_read_for_no_longer_than_the_timeout():
    receiver = PartnerReceiver(new_secret(), always_fail=True, stream_body=(1, 0.05)).start()
    try:
        start = time.monotonic()
        result = post_signed(requests.Session(), receiver.url, receiver.secret, "e-1", "{}", 1)
        took = time.monotonic() - start
    finally:
        receiver.stop()
    assert result.status_code == 500 and result.error.startswith("HTTP 500: x")
    assert took < 3, f"read the dripping answer for {took:.1f}s"
