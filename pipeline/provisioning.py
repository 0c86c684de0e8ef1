"""Idempotent provisioning of every queue and bucket the stack config implies.

Run at every start of the local endpoint (it keeps no state) and safe to run against AWS: existing
resources are looked up and their attributes brought to the configured values.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field

from botocore.exceptions import ClientError

from pipeline.stack import StackConfig, aws_client, load_stack_config

log = logging.getLogger(__name__)


@dataclass
class Provisioned:
    queues: dict[str, str] = field(default_factory=dict)  # name -> url
    buckets: list[str] = field(default_factory=list)


def ensure_queue(sqs, name: str, attributes: dict[str, str]) -> str:
    """Create `name` or, when it exists, set its attributes; returns the queue URL."""
    attrs = {k: str(v) for k, v in attributes.items()}
    if name.endswith(".fifo"):
        attrs["FifoQueue"] = "true"
    try:
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    except ClientError as exc:
        if "NonExistentQueue" not in str(exc) and "QueueDoesNotExist" not in str(exc):
            raise
        return sqs.create_queue(QueueName=name, Attributes=attrs)["QueueUrl"]
    mutable = {k: v for k, v in attrs.items() if k != "FifoQueue"}
    if mutable:
        sqs.set_queue_attributes(QueueUrl=url, Attributes=mutable)
    return url


def queue_arn(sqs, url: str) -> str:
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def ensure_queue_with_dlq(sqs, name: str, dlq_name: str, max_receive_count: int, attributes: dict) -> tuple[str, str]:
    dlq_url = ensure_queue(sqs, dlq_name, {"MessageRetentionPeriod": 1209600})
    redrive = {"deadLetterTargetArn": queue_arn(sqs, dlq_url), "maxReceiveCount": str(max_receive_count)}
    url = ensure_queue(sqs, name, {**attributes, "RedrivePolicy": json.dumps(redrive)})
    return url, dlq_url


def ensure_bucket(s3, bucket: str, region: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except ClientError:
        pass
    kwargs = {"Bucket": bucket}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(**kwargs)
    except ClientError as exc:
        if "BucketAlreadyOwnedByYou" not in str(exc):
            raise


def provision(config: StackConfig | None = None) -> Provisioned:
    config = config or load_stack_config()
    sqs, s3 = aws_client("sqs"), aws_client("s3")
    out = Provisioned()
    q = config.events_queue
    url, dlq_url = ensure_queue_with_dlq(
        sqs,
        q.queue_name,
        q.dlq_name,
        q.dead_letter.max_receive_count,
        {
            "VisibilityTimeout": q.visibility_timeout_s,
            "MessageRetentionPeriod": q.retention_s,
            "MaximumMessageSize": q.max_message_bytes,
        },
    )
    out.queues[q.queue_name] = url
    out.queues[q.dlq_name] = dlq_url
    ensure_bucket(s3, config.archive.bucket, config.region)
    out.buckets.append(config.archive.bucket)
    ensure_bucket(s3, config.claim_check.bucket, config.region)
    out.buckets.append(config.claim_check.bucket)
    from pipeline.routing.provisioning import provision_routing

    out.queues.update(provision_routing(sqs, stack=config))
    log.info("provisioned queues=%s buckets=%s", sorted(out.queues), out.buckets)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Create or update the queues and buckets of the stack config.")
    parser.add_argument("--config", help="stack config YAML (default: config/stack.yaml)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = provision(load_stack_config(args.config))
    for name, url in sorted(result.queues.items()):
        print(f"queue  {name:30s} {url}")
    for bucket in result.buckets:
        print(f"bucket {bucket}")


if __name__ == "__main__":
    main()
