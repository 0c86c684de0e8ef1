"""Partner webhooks against real local HTTP receivers: signing, retries held by SQS, DLQ, redelivery."""

import base64
import hashlib
import json
import os
import threading
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from devstack.partner_receiver import PartnerReceiver
from pipeline.routing.config import load_routing_config
from pipeline.routing.delivery import PartnerDelivery, PartnerQueues, redeliver_partner_dlq
from pipeline.routing.destinations import route_to_partner_queues
from pipeline.routing.logs import AttemptLog, read_log
from pipeline.routing.provisioning import provision_routing
from pipeline.routing.webhooks import signed_headers
from pipeline.stack import aws_client, s3_filesystem
from tests.conftest import queue_counts, sample_envelope, wait_until
from tests.test_routing_config import routing_file

DELAYS = (1, 1, 2)
ALLOWED = [
    "event_id",
    "event_type",
    "site_id",
    "payload.door",
    "payload.result",
]  # sample_envelope's payload also has a credential


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


@pytest.fixture
def partners(tmp_path, aws, monkeypatch):
    """Three partners with their own receivers: recovering (500 twice), always failing, healthy."""
    receivers = {
        "recovering": PartnerReceiver(new_secret(), fail_first=2).start(),
        "down": PartnerReceiver(new_secret(), always_fail=True).start(),
        "healthy": PartnerReceiver(new_secret()).start(),
    }
    config = []
    for name, receiver in receivers.items():
        env = f"PARTNER_{name.upper()}_SECRET"
        monkeypatch.setenv(env, receiver.secret)
        config.append(
            {
                "name": name,
                "webhook": receiver.url,
                "secret_env": env,
                "subscriptions": ["door_access", "intrusion_alert"],
                "allowed_fields": ALLOWED,
                "timeout_s": 3,
            }
        )
    routing = load_routing_config(routing_file(tmp_path, config, delays=DELAYS))
    queues = provision_routing(aws_client("sqs"), routing)
    yield (
        routing,
        receivers,
        {p.name: PartnerQueues(queues[p.queue_name], queues[p.dlq_name]) for p in routing.partners},
    )
    for receiver in receivers.values():
        receiver.stop()


def run_delivery(routing, queues, name, max_seconds=30.0):
    log = AttemptLog(s3_filesystem(), "events-archive", tag=f"{name}-")
    return PartnerDelivery(routing.partner(name), aws_client("sqs"), queues[name], routing.retry_delays_s, log).run(
        max_seconds=max_seconds
    )


def route(routing, events):
    sqs = aws_client("sqs")
    return route_to_partner_queues(sqs, routing, events, lambda n: sqs.get_queue_url(QueueName=n)["QueueUrl"])


def test_signature_verifies_with_the_standardwebhooks_library_and_fails_for_a_changed_body():
    secret = new_secret()
    body = json.dumps({"event_id": "e-1", "location_id": "site-123"})
    headers = signed_headers(secret, "e-1", body)
    assert Webhook(secret).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace("123", "124"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


def test_partner_receives_signed_bodies_it_can_verify_with_the_site_qualified_event_id_as_webhook_id(partners):
    routing, receivers, queues = partners
    events = [sample_envelope(device_id=f"door-{i}") for i in range(12)] + [sample_envelope(event_type="motion")]
    route(routing, events)
    stats = run_delivery(routing, queues, "healthy")
    healthy = receivers["healthy"]
    assert stats.delivered == 12 and healthy.rejected_signatures == 0
    assert set(healthy.accepted) == {e.dedupe_id for e in events if e.event_type != "motion"}


def test_down_partner_does_not_slow_others_and_recovering_partner_gets_every_event_once(partners):
    routing, receivers, queues = partners
    events = [sample_envelope(device_id=f"door-{i}") for i in range(8)]
    route(routing, events)
    results = {}
    threads = [
        threading.Thread(target=lambda n=n: results.__setitem__(n, run_delivery(routing, queues, n))) for n in receivers
    ]
    for thread in threads:
        thread.start()
    # While "down" is still retrying, a second wave arrives: the healthy partner takes it at once.
    wait_until(lambda: len(receivers["down"].requests) >= 8, 15, message="the down partner's first attempts")
    second = [sample_envelope(device_id=f"door-late-{i}") for i in range(4)]
    route(routing, second)
    for thread in threads:
        thread.join(60)
    ids = {e.dedupe_id for e in events + second}

    recovering, down, healthy = receivers["recovering"], receivers["down"], receivers["healthy"]
    assert set(recovering.accepted) == ids and set(healthy.accepted) == ids
    assert any(r.status == 500 for r in recovering.requests), "the recovering partner did fail first"
    last_healthy = max(r.at for r in healthy.requests)
    assert last_healthy < max(r.at for r in down.requests), (
        "healthy deliveries finished while the down partner was still retrying"
    )

    dlq = [json.loads(b) for b in _drain_bodies(queues["down"].dlq_url)]
    assert sorted(m["webhook_id"] for m in dlq) == sorted(ids)
    assert all(
        set(json.loads(m["body"])) == {"event_id", "event_type", "site_id", "payload"}
        and set(json.loads(m["body"])["payload"]) == {"door", "result"}
        for m in dlq
    ), "the DLQ keeps only whitelisted fields"
    assert queue_counts(queues["down"].url) == (0, 0)
    first_wave = {e.dedupe_id for e in events}
    for webhook_id in first_wave:
        stamps = [r.at for r in down.attempts_for(webhook_id)]
        assert len(stamps) == routing.max_attempts
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        for gap, delay in zip(gaps, DELAYS):
            assert delay - 0.05 <= gap < delay + 1.5, f"retry gaps {gaps} do not follow {DELAYS}"


def test_every_attempt_is_logged_as_parquet_with_the_contract_columns(partners):
    routing, receivers, queues = partners
    route(routing, [sample_envelope(device_id=f"door-{i}") for i in range(3)])
    run_delivery(routing, queues, "down")
    table = read_log(s3_filesystem(), "events-archive", "delivery_attempts").to_pylist()
    assert len(table) == 3 * routing.max_attempts
    outcomes = sorted({(r["attempt"], r["outcome"]) for r in table})
    assert outcomes == [(1, "failed"), (2, "failed"), (3, "failed"), (4, "dead_lettered")]
    assert all(r["status_code"] == 500 and r["partner"] == "down" and r["latency_ms"] >= 0 for r in table)


def test_every_delivery_carries_its_contract_version_and_its_attempt_row_says_exactly_what_was_sent(partners):
    routing, receivers, queues = partners
    events = [sample_envelope(site_id=f"site-{i % 2}", device_id=f"door-{i}") for i in range(4)]
    route(routing, events)
    started = datetime.now(UTC).replace(microsecond=0)

    run_delivery(routing, queues, "healthy")

    healthy, version = receivers["healthy"], routing.partner("healthy").contract_version
    assert {r.contract_version for r in healthy.requests} == {version}
    rows = [
        r
        for r in read_log(s3_filesystem(), "events-archive", "delivery_attempts").to_pylist()
        if r["partner"] == "healthy"
    ]
    assert sorted(r["webhook_id"] for r in rows) == sorted(e.dedupe_id for e in events)
    for row in rows:
        sent = healthy.raw[row["webhook_id"]]
        assert row["body_sha256"] == hashlib.sha256(sent).hexdigest() and row["body_bytes"] == len(sent)
        assert row["contract_version"] == version and row["site_id"] == row["webhook_id"].split("/")[0]
        assert started <= row["webhook_timestamp"] <= row["attempted_at"] + timedelta(seconds=1)
        assert row["archive_hour"] == "2024-01-15-10:00"


def test_a_message_transformed_before_a_contract_change_is_delivered_and_logged_under_its_own_version(
    partners, tmp_path
):
    routing, receivers, queues = partners
    old_version = routing.partner("healthy").contract_version
    before = sample_envelope(device_id="door-before")
    route(routing, [before])
    (tmp_path / "changed").mkdir()
    changed = [
        p.model_dump(mode="json") | ({"allowed_fields": ALLOWED + ["device_id"]} if p.name == "healthy" else {})
        for p in routing.partners
    ]
    routing = load_routing_config(routing_file(tmp_path / "changed", changed, delays=DELAYS))
    new_version = routing.partner("healthy").contract_version
    after = sample_envelope(device_id="door-after")
    route(routing, [after])

    run_delivery(routing, queues, "healthy")

    healthy = receivers["healthy"]
    assert new_version != old_version
    assert {r.webhook_id: r.contract_version for r in healthy.requests} == {
        before.dedupe_id: old_version,
        after.dedupe_id: new_version,
    }
    assert (
        "device_id" not in healthy.accepted[before.dedupe_id]
        and healthy.accepted[after.dedupe_id]["device_id"] == "door-after"
    )
    logged = {
        r["webhook_id"]: r["contract_version"]
        for r in read_log(s3_filesystem(), "events-archive", "delivery_attempts").to_pylist()
    }
    assert logged == {before.dedupe_id: old_version, after.dedupe_id: new_version}


def test_redelivery_moves_the_dlq_back_once_the_partner_answers_again(partners):
    routing, receivers, queues = partners
    events = [sample_envelope(device_id=f"door-{i}") for i in range(5)]
    route(routing, events)
    run_delivery(routing, queues, "down")
    assert queue_counts(queues["down"].dlq_url)[0] == 5

    still_down = redeliver_partner_dlq(routing.partner("down"), aws_client("sqs"), queues["down"], None)
    assert still_down.moved == 0 and not still_down.partner_answered
    wait_until(
        lambda: queue_counts(queues["down"].dlq_url) == (5, 0), 10, message="the probed message to be visible again"
    )

    receivers["down"].always_fail = False
    report = redeliver_partner_dlq(routing.partner("down"), aws_client("sqs"), queues["down"], None)
    assert report.partner_answered and report.moved == 4
    run_delivery(routing, queues, "down")
    assert set(receivers["down"].accepted) == {e.dedupe_id for e in events}
    assert queue_counts(queues["down"].dlq_url) == (0, 0)


def _drain_bodies(url):
    from tests.conftest import receive_all

    return [json.dumps(b) for b in receive_all(url, timeout=1.0)]


def test_partner_sensor_requests_one_run_per_partner_with_waiting_events(partners, tmp_path):
    from dagster import DagsterInstance, build_sensor_context

    from pipeline.partner_jobs import CONTRACT_TAG, PARTNER_TAG, partner_queues_sensor
    from pipeline.resources import RoutingSettings, SQSResource

    routing, _, _ = partners
    route(routing, [sample_envelope()])
    resources = {
        "sqs": SQSResource(events_queue="events"),
        "routing": RoutingSettings(config_path=str(tmp_path / "routing.yaml")),
    }
    with DagsterInstance.ephemeral() as instance:
        requests = partner_queues_sensor(build_sensor_context(instance=instance, resources=resources))
    assert sorted(r.tags[PARTNER_TAG] for r in requests) == ["down", "healthy", "recovering"]
    assert {r.tags[PARTNER_TAG]: r.tags[CONTRACT_TAG] for r in requests} == {
        p.name: p.contract_version for p in routing.partners
    }
    assert {r.run_config["ops"]["deliver_partner_queue"]["config"]["partner"] for r in requests} == {
        "down",
        "healthy",
        "recovering",
    }


def test_partner_delivery_job_delivers_one_partner_and_reports_its_success_rate(partners, tmp_path):
    from pipeline.partner_jobs import partner_delivery_job
    from pipeline.resources import ArchiveStore, RoutingSettings, SQSResource

    routing, receivers, queues = partners
    route(routing, [sample_envelope(device_id=f"door-{i}") for i in range(3)])
    result = partner_delivery_job.execute_in_process(
        run_config={"ops": {"deliver_partner_queue": {"config": {"partner": "healthy"}}}},
        resources={
            "sqs": SQSResource(events_queue="events"),
            "archive": ArchiveStore(bucket="events-archive"),
            "routing": RoutingSettings(config_path=str(tmp_path / "routing.yaml"), delivery_run_seconds=20),
        },
    )
    assert result.output_for_node("deliver_partner_queue") == {
        "delivered": 3,
        "failed": 0,
        "dead_lettered": 0,
        "malformed": 0,
    }
    [materialization] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = materialization.event_specific_data.metadata
    version = routing.partner("healthy").contract_version
    assert metadata["contract_version"].value == version and metadata["delivered_by_contract"].value == {version: 3}
    assert len(receivers["healthy"].accepted) == 3 and not receivers["down"].requests, (
        "other partners' queues untouched"
    )


def test_malformed_partner_message_goes_to_the_dlq_with_its_reason_without_blocking_the_queue(partners):
    routing, receivers, queues = partners
    sqs = aws_client("sqs")
    sqs.send_message(QueueUrl=queues["healthy"].url, MessageBody="{not a partner message")
    route(routing, [sample_envelope()])
    stats = run_delivery(routing, queues, "healthy")
    assert stats.malformed == 1 and stats.delivered == 1 and len(receivers["healthy"].accepted) == 1
    dead = sqs.receive_message(QueueUrl=queues["healthy"].dlq_url, MessageAttributeNames=["All"], WaitTimeSeconds=1)[
        "Messages"
    ]
    assert dead[0]["Body"] == "{not a partner message"
    assert dead[0]["MessageAttributes"]["failure_reason"]["StringValue"] == "bad_json"
    assert dead[0]["MessageAttributes"]["failure_detail"]["StringValue"].startswith("JSONDecodeError: ")
