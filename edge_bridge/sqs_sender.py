"""Batched sends to the SQS `events` queue: one SendMessageBatch per up to ten events."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import boto3
from botocore.config import Config

log = logging.getLogger(__name__)

SQS_BATCH_MAX = 10


@dataclass(frozen=True)
class Outgoing:
    """One event ready for SQS: `key` is the caller's handle for the outcome (e.g. an MQTT mid)."""

    key: object
    event_id: str
    site_id: str
    body: str


@dataclass
class BatchOutcome:
    sent: list[Outgoing]
    failed: list[tuple[Outgoing, str]]  # (event, error), the entries SQS or the network refused
    call_error: str | None = None  # set when the call itself failed (network, throttling): SQS may be down


def sqs_client(connect_timeout: float = 2.0, read_timeout: float = 10.0):
    """A client that fails fast: the caller, not botocore, decides what happens on failure."""
    config = Config(
        retries={"max_attempts": 1, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=32,
        # The requests are built here, never from user input; client-side validation would cost
        # about a tenth of every SendMessageBatch call's CPU. SQS still validates them.
        parameter_validation=False,
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # boto3 reads AWS_ENDPOINT_URL itself, so the same code reaches the local endpoint or AWS.
    return boto3.session.Session().client("sqs", region_name=region, config=config)


class SqsBatchSender:
    def __init__(self, client, queue_url: str, fifo: bool = False) -> None:
        self.client = client
        self.queue_url = queue_url
        self.fifo = fifo

    def send(self, events: list[Outgoing]) -> BatchOutcome:
        """Send up to ten events in one call; a network failure fails the whole batch, never raises."""
        if len(events) > SQS_BATCH_MAX:
            raise ValueError(f"SendMessageBatch takes at most {SQS_BATCH_MAX} entries")
        entries = []
        for i, event in enumerate(events):
            entry = {"Id": str(i), "MessageBody": event.body}
            if self.fifo:
                entry["MessageGroupId"] = event.site_id
                entry["MessageDeduplicationId"] = event.event_id
            entries.append(entry)
        try:
            response = self.client.send_message_batch(QueueUrl=self.queue_url, Entries=entries)
        except Exception as exc:  # noqa: BLE001 - any failure means "not in SQS"; the caller keeps the events
            error = f"{type(exc).__name__}: {exc}"
            return BatchOutcome(sent=[], failed=[(event, error) for event in events], call_error=error)
        ok_ids = {item["Id"] for item in response.get("Successful", [])}
        failed_entries = {
            item["Id"]: f"{item.get('Code')}: {item.get('Message', '')}" for item in response.get("Failed", [])
        }
        sent, failed = [], []
        for i, event in enumerate(events):
            if str(i) in ok_ids:
                sent.append(event)
            else:
                failed.append((event, failed_entries.get(str(i), "missing from SendMessageBatch response")))
        return BatchOutcome(sent=sent, failed=failed)
