"""Provisioning creates what config/stack.yaml implies, idempotently, standard or FIFO."""

import json

from edge_bridge.sqs_sender import Outgoing, SqsBatchSender
from pipeline.provisioning import provision
from pipeline.stack import EventsQueueConfig, StackConfig, aws_client
from tests.conftest import receive_all, sample_envelope


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
