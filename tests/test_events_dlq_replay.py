"""The 02:00 events-dlq replay sends back what failed with its window and quarantines what never can drain:
poison is skipped, reported and kept in the cloud quarantine with its reason. Real SQS + S3 emulator."""

import json

import pytest

from edge_bridge.claim_check import ClaimChecker
from edge_bridge.envelope import EnvelopeRejected, parse_envelope
from pipeline.replay import events_dlq_replay_job
from pipeline.resources import ArchiveStore, SQSResource
from pipeline.routing.dlq_replay import REPLAY_COUNT, record_drain_failure, replay_events_dlq
from pipeline.stack import aws_client
from tests.conftest import queue_counts, receive_all, sample_envelope

RESOURCES = {"sqs": SQSResource(events_queue="events"), "archive": ArchiveStore(bucket="events-archive")}


def deep(levels: int) -> str:
    good = json.loads(sample_envelope().to_json())
    good["payload"] = "@"
    return json.dumps(good).replace('"@"', "[" * levels + "]" * levels)


def reason_of(body: str) -> str:
    with pytest.raises(EnvelopeRejected) as rejected:
        parse_envelope(body)
    return rejected.value.reason


def to_dlq(aws, bodies: list[str]) -> list[str]:
    """Put bodies in events-dlq as SQS's redrive would; returns their message ids."""
    sqs = aws_client("sqs")
    return [sqs.send_message(QueueUrl=aws.provisioned.queues["events-dlq"], MessageBody=b)["MessageId"] for b in bodies]


def quarantined(prefix: str = "quarantine/") -> list[dict]:
    s3 = aws_client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="events-archive", Prefix=prefix).get("Contents", [])]
    return [
        json.loads(line)
        for key in keys
        for line in s3.get_object(Bucket="events-archive", Key=key)["Body"].read().decode().splitlines()
        if line
    ]


def replay(aws, **overrides):
    kwargs = {
        "s3": aws_client("s3"),
        "archive_bucket": "events-archive",
        "claim_check_bucket": "events-claim-check",
        "run_id": "run-1",
    }
    queues = aws.provisioned.queues
    return replay_events_dlq(
        aws_client("sqs"),
        queues["events-dlq"],
        overrides.pop("events_url", queues["events"]),
        overrides.pop("reasons", {}),
        **{**kwargs, **overrides},
    )


def test_replay_quarantines_poison_with_its_reason_and_sends_every_valid_envelope_back(aws):
    good = [sample_envelope(device_id=f"door-{i}") for i in range(3)]
    big = sample_envelope(device_id="door-big")
    pointer = ClaimChecker(aws_client("s3"), "events-claim-check", 262144).check_in(
        big.event_id, big.site_id, big.to_json()
    )
    poison = {
        "{not json": "bad_json",
        deep(5000): reason_of(deep(5000)),
        good[0].to_json().replace('"door_access"', '"door access!"'): reason_of(
            good[0].to_json().replace('"door_access"', '"door access!"')
        ),
        '{"claim_check": {"bucket": "events-claim-check"}, "event_id": "e", "site_id": "s"}': "bad_claim_check",
        pointer.replace("events-claim-check", "someone-elses-bucket"): "bad_claim_check",
    }
    ids = to_dlq(
        aws, [good[0].to_json(), *list(poison)[:3], good[1].to_json(), pointer, *list(poison)[3:], good[2].to_json()]
    )

    result = events_dlq_replay_job.execute_in_process(resources=RESOURCES)

    assert result.success and result.output_for_node("replay_events_dlq_into_events") == 4
    assert sorted(
        b["event_id"] for b in receive_all(aws.provisioned.queues["events"], timeout=1.5, delete=False)
    ) == sorted(e.event_id for e in good + [big])
    assert queue_counts(aws.provisioned.queues["events-dlq"]) == (0, 0), (
        "poison is deleted from the DLQ once quarantined"
    )
    kept = quarantined()
    assert {line["body"]: line["reason"] for line in kept} == poison
    assert all(line["stage"] == "events_dlq_replay" and line["message_id"] in ids and line["detail"] for line in kept)
    metadata = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"][0].event_specific_data.metadata
    assert sorted(s["reason"] for s in metadata["skipped"].value) == sorted(poison.values())
    assert metadata["quarantined"].value == len(poison) and metadata["moved"].value == 4


def test_a_message_whose_recorded_failure_was_its_own_is_quarantined_and_its_window_mates_go_back(aws):
    own, shared = sample_envelope(device_id="door-own"), sample_envelope(device_id="door-shared")
    own_id, shared_id = to_dlq(aws, [own.to_json(), shared.to_json()])
    s3 = aws_client("s3")
    record_drain_failure(
        s3,
        "events-archive",
        "drain-1",
        "route_to_priority_queues",
        [shared_id],
        "EndpointConnectionError: SQS unreachable",
    )
    record_drain_failure(
        s3,
        "events-archive",
        "drain-2",
        "route_to_partner_queues",
        [own_id],
        "RecursionError: maximum recursion depth exceeded",
        scope="message",
    )

    result = events_dlq_replay_job.execute_in_process(resources=RESOURCES)

    assert result.success and result.output_for_node("replay_events_dlq_into_events") == 1
    assert [b["event_id"] for b in receive_all(aws.provisioned.queues["events"], timeout=1.5)] == [shared.event_id]
    [line] = quarantined()
    assert (line["reason"], line["event_id"], line["site_id"]) == ("failed_on_its_own", own.event_id, own.site_id)
    assert line["detail"] == "route_to_partner_queues: RecursionError: maximum recursion depth exceeded"
    metadata = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"][0].event_specific_data.metadata
    assert [m["reason"] for m in metadata["messages"].value] == [
        "route_to_priority_queues: EndpointConnectionError: SQS unreachable"
    ]


def test_a_message_dead_lettered_again_after_max_replays_is_quarantined_instead_of_replayed_every_night(aws):
    sqs, events_url, dlq_url = aws_client("sqs"), aws.provisioned.queues["events"], aws.provisioned.queues["events-dlq"]
    event = sample_envelope()
    sqs.send_message(QueueUrl=events_url, MessageBody=event.to_json())

    def drain_fails_until_dead_lettered(receives: int = 3):
        """Three receives without a delete (three failed drain runs); SQS's redrive does the rest."""
        for _ in range(receives):
            assert sqs.receive_message(QueueUrl=events_url, VisibilityTimeout=0, WaitTimeSeconds=1).get("Messages")
        assert sqs.receive_message(QueueUrl=events_url, WaitTimeSeconds=0).get("Messages") is None
        assert queue_counts(dlq_url) == (1, 0)

    drain_fails_until_dead_lettered()
    first = replay(aws, max_replays=2)
    drain_fails_until_dead_lettered()
    second = replay(aws, max_replays=2)
    assert (first.moved, second.moved) == (1, 1)
    [back] = sqs.receive_message(QueueUrl=events_url, MessageAttributeNames=[REPLAY_COUNT], VisibilityTimeout=0)[
        "Messages"
    ]  # a first failed drain
    assert back["MessageAttributes"][REPLAY_COUNT]["StringValue"] == "2"
    drain_fails_until_dead_lettered(receives=2)

    third = replay(aws, max_replays=2)

    assert third.moved == 0 and [q["reason"] for q in third.quarantined] == ["replayed_too_often"]
    assert queue_counts(events_url) == (0, 0) and queue_counts(dlq_url) == (0, 0)
    [line] = quarantined()
    assert line["reason"] == "replayed_too_often" and line["event_id"] == event.event_id


def test_a_quarantine_that_cannot_be_written_leaves_the_whole_batch_in_the_dlq(aws):
    to_dlq(aws, [sample_envelope().to_json(), "{not json"])

    with pytest.raises(Exception, match="NoSuchBucket|does not exist"):
        replay(aws, archive_bucket="no-such-bucket")

    visible, in_flight = queue_counts(aws.provisioned.queues["events-dlq"])
    assert visible + in_flight == 2 and queue_counts(aws.provisioned.queues["events"]) == (0, 0)


def test_a_send_sqs_refuses_leaves_the_valid_envelopes_in_the_dlq(aws):
    to_dlq(aws, [sample_envelope(device_id=f"door-{i}").to_json() for i in range(3)])
    sqs = aws_client("sqs")
    gone = sqs.create_queue(QueueName="events-gone")["QueueUrl"]
    sqs.delete_queue(QueueUrl=gone)

    with pytest.raises(Exception, match="NonExistentQueue|does not exist"):
        replay(aws, events_url=gone)

    visible, in_flight = queue_counts(aws.provisioned.queues["events-dlq"])
    assert visible + in_flight == 3
