"""Provisioning creates what config/stack.yaml and config/routing.yaml imply, idempotently, standard or FIFO;
every queue that feeds a consumer has a redrive policy."""

import json

from edge_bridge.sqs_sender import Outgoing, SqsBatchSender
from pipeline.provisioning import provision
from pipeline.stack import EventsQueueConfig, StackConfig, aws_client
from tests.conftest import receive_all, sample_envelope, wait_until


def test_events_queue_has_the_seed_settings_and_redrives_to_the_dlq_after_three_receives(aws):
    sqs = aws_client("sqs")
    attrs = sqs.get_queue_attributes(QueueUrl=aws.provisioned.queues["events"], AttributeNames=["All"])["Attributes"]
    assert attrs["VisibilityTimeout"] == "300"
    assert attrs["MessageRetentionPeriod"] == "1209600"
    redrive = json.loads(attrs["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"].endswith(":events-dlq") and int(redrive["maxReceiveCount"]) == 3


def test_provisioning_twice_changes_nothing(aws):
    again = provision()
    assert again.queues == aws.provisioned.queues
    assert aws_client("s3").head_bucket(Bucket="events-archive")["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_fifo_config_groups_by_site_and_deduplicates_by_event_id(aws):
    config = StackConfig(events_queue=EventsQueueConfig(fifo=True))
    result = provision(config)
    url = result.queues["events.fifo"]
    assert "events-dlq.fifo" in result.queues
    sender = SqsBatchSender(aws_client("sqs"), url, fifo=True)
    env = sample_envelope()
    out = Outgoing(key=1, event_id=env.event_id, site_id=env.site_id, body=env.to_json())
    assert len(sender.send([out]).sent) == 1
    assert len(sender.send([out]).sent) == 1  # accepted again, but SQS drops the duplicate
    assert [b["event_id"] for b in receive_all(url, timeout=1)] == [env.event_id]


def redrive_policies(sqs) -> dict[str, dict | None]:
    """Every queue on the endpoint -> its redrive policy (None when it has none)."""
    policies = {}
    for url in sqs.list_queues().get("QueueUrls", []):
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        policies[attrs["QueueArn"].rsplit(":", 1)[1]] = (
            json.loads(attrs["RedrivePolicy"]) if "RedrivePolicy" in attrs else None
        )
    return policies


def test_every_provisioned_queue_except_a_dead_letter_queue_has_a_redrive_policy(aws):
    policies = redrive_policies(aws_client("sqs"))
    assert set(aws.provisioned.queues) <= set(policies), "list_queues shows every provisioned queue"
    dead_letter_queues = {p["deadLetterTargetArn"].rsplit(":", 1)[1] for p in policies.values() if p}
    assert dead_letter_queues <= set(policies), "every redrive target exists"
    without = sorted(name for name, policy in policies.items() if policy is None and name not in dead_letter_queues)
    assert without == [], f"queues that would retry a poison message for ever: {without}"
    assert all(policies[name] is None for name in dead_letter_queues), "a DLQ keeps what it holds"
    for name in ("events-high", "events-medium", "events-low"):
        assert (
            policies[name]["deadLetterTargetArn"].endswith(f":{name}-dlq")
            and int(policies[name]["maxReceiveCount"]) == 5
        )
    assert any(name.startswith("partner-") for name in policies), "the shipped routing config has partners"


def test_a_priority_message_received_max_receive_count_times_moves_to_its_dead_letter_queue(aws):
    sqs = aws_client("sqs")
    url, dlq_url = aws.provisioned.queues["events-high"], aws.provisioned.queues["events-high-dlq"]
    sqs.send_message(QueueUrl=url, MessageBody="a message no consumer can commit")
    for _ in range(5):  # a consumer that takes it and dies before the delete, five times
        wait_until(
            lambda: sqs.receive_message(QueueUrl=url, VisibilityTimeout=0, WaitTimeSeconds=0).get("Messages"),
            10,
            message="the message to come back",
        )
    assert sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1).get("Messages") is None, "not a sixth time"
    assert [m["Body"] for m in sqs.receive_message(QueueUrl=dlq_url, WaitTimeSeconds=1)["Messages"]] == [
        "a message no consumer can commit"
    ]


def test_fifo_priority_queues_get_fifo_dead_letter_queues_with_the_configured_receive_count(aws):
    from pipeline.routing.config import parse_routing_config
    from pipeline.routing.provisioning import provision_routing
    from pipeline.stack import PriorityDeadLetterConfig, PriorityQueuesConfig

    routing = parse_routing_config(
        {"priority": {"queues": {"high": "urgent.fifo", "medium": "business.fifo", "low": "analytics"}}}
    )
    stack = StackConfig(priority_queues=PriorityQueuesConfig(dead_letter=PriorityDeadLetterConfig(max_receive_count=2)))
    sqs = aws_client("sqs")
    queues = provision_routing(sqs, routing, stack)
    assert provision_routing(sqs, routing, stack) == queues, "idempotent"
    assert {"urgent-dlq.fifo", "business-dlq.fifo", "analytics-dlq"} <= set(queues)
    policies = redrive_policies(sqs)
    for name, dlq in [
        ("urgent.fifo", "urgent-dlq.fifo"),
        ("business.fifo", "business-dlq.fifo"),
        ("analytics", "analytics-dlq"),
    ]:
        assert policies[name]["deadLetterTargetArn"].endswith(f":{dlq}") and int(policies[name]["maxReceiveCount"]) == 2
    attrs = sqs.get_queue_attributes(QueueUrl=queues["urgent-dlq.fifo"], AttributeNames=["FifoQueue"])["Attributes"]
    assert attrs["FifoQueue"] == "true"


def test_every_queue_the_drain_feeds_takes_no_bigger_message_than_the_drain_packs_for(aws):
    """The drain sends a claim-check pointer beyond events_queue.max_message_bytes; the queues agree."""
    from pipeline.stack import load_stack_config

    sqs, limit = aws_client("sqs"), str(load_stack_config().events_queue.max_message_bytes)
    fed = [
        name
        for name in aws.provisioned.queues
        if name.startswith(("events-high", "events-medium", "events-low", "partner-")) and "dlq" not in name
    ]
    assert len(fed) >= 4
    for name in fed:
        attrs = sqs.get_queue_attributes(QueueUrl=aws.provisioned.queues[name], AttributeNames=["MaximumMessageSize"])[
            "Attributes"
        ]
        assert attrs["MaximumMessageSize"] == limit, name
