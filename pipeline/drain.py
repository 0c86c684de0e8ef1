"""Draining the SQS `events` queue: receive a bounded window, validate, de-duplicate, delete.

Plain Python, no Dagster: the drain job's ops call these. Messages are deleted only after every
destination has durably accepted them; until then SQS's visibility timeout keeps them safe.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from edge_bridge.envelope import Envelope, EnvelopeRejected, claim_check_pointer, parse_envelope

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueMessage:
    message_id: str
    receipt_handle: str
    body: str
    receive_count: int


@dataclass
class Window:
    """One drain run's share of the queue."""

    messages: list[QueueMessage] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.messages)


@dataclass
class ParsedWindow:
    events: list[Envelope]
    # Receipt handles of every message whose event is represented in `events` (duplicates included).
    receipts: list[str]
    quarantined: list[tuple[QueueMessage, str, str]]  # (message, reason, detail)
    duplicates: int


def receive_window(sqs, queue_url: str, max_messages: int, wait_time_s: int = 1, max_seconds: float = 30.0) -> Window:
    """Receive up to `max_messages`, stopping early once the queue runs dry or time is up.

    Only the first receive long-polls; a later short receive that comes back less than full means
    the backlog is taken, so the run moves on instead of trickling for its whole time budget.
    """
    window = Window()
    deadline = time.monotonic() + max_seconds
    while len(window) < max_messages and time.monotonic() < deadline:
        wanted = min(10, max_messages - len(window))
        response = sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=wanted,
            WaitTimeSeconds=wait_time_s if not window.messages else 0,
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )
        batch = response.get("Messages", [])
        for msg in batch:
            window.messages.append(
                QueueMessage(
                    message_id=msg["MessageId"],
                    receipt_handle=msg["ReceiptHandle"],
                    body=msg["Body"],
                    receive_count=int(msg.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
                )
            )
        if len(batch) < wanted:
            break
    return window


def parse_window(window: Window, s3_client=None, claim_check_bucket: str | None = None) -> ParsedWindow:
    """Validate every message and keep one event per event_id; the rest are duplicates or quarantined.

    A claim-check pointer (an event the edge stored in S3 because it exceeded the SQS size limit) is
    resolved here, so nothing downstream ever sees one. If S3 cannot be read the message is left out
    of `receipts` (not deleted), so SQS redelivers it later.
    """
    events: dict[str, Envelope] = {}
    receipts, quarantined, duplicates = [], [], 0
    for msg in window.messages:
        try:
            body = msg.body
            pointer = claim_check_pointer(body)
            if pointer is not None:
                from edge_bridge.claim_check import verify_and_fetch

                if s3_client is None:
                    from pipeline.stack import aws_client

                    s3_client = aws_client("s3")
                if claim_check_bucket is None:
                    from pipeline.stack import load_stack_config

                    claim_check_bucket = load_stack_config().claim_check.bucket
                try:
                    body = verify_and_fetch(s3_client, body, bucket=claim_check_bucket)
                except EnvelopeRejected:
                    raise
                except Exception as exc:  # noqa: BLE001 - S3 unavailable: leave the message for redelivery
                    log.warning("claim check s3://%s/%s unresolved (%s); leaving the message in SQS", pointer.bucket, pointer.key, exc)
                    continue
            env = parse_envelope(body)
        except EnvelopeRejected as exc:
            quarantined.append((msg, exc.reason, exc.detail))
            continue
        receipts.append(msg.receipt_handle)
        if env.event_id in events:
            duplicates += 1
            continue
        events[env.event_id] = env
    return ParsedWindow(list(events.values()), receipts, quarantined, duplicates)


def delete_messages(sqs, queue_url: str, receipt_handles: list[str]) -> int:
    """DeleteMessageBatch in tens; returns how many SQS confirmed. Failures stay for redelivery."""
    deleted = 0
    for start in range(0, len(receipt_handles), 10):
        chunk = receipt_handles[start : start + 10]
        response = sqs.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(i), "ReceiptHandle": handle} for i, handle in enumerate(chunk)],
        )
        deleted += len(response.get("Successful", []))
        for failure in response.get("Failed", []):
            log.warning("delete failed (message will be redelivered): %s", failure)
    return deleted


def queue_depth(sqs, queue_url: str) -> tuple[int, int]:
    """(visible, in flight) as SQS approximates them: cheap enough for a sensor tick."""
    attrs = sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs.get("ApproximateNumberOfMessages", 0)), int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0))
