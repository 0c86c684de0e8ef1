"""Draining the SQS `events` queue: receive a bounded window, validate, de-duplicate, delete.

Plain Python, no Dagster: the drain job's ops call these. Messages are deleted only after every
destination has durably accepted them (or durably quarantined what it could not take); until then
SQS's visibility timeout keeps them safe.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple

from edge_bridge.claim_check import verify_and_fetch
from edge_bridge.envelope import Envelope, EnvelopeRejected, claim_check_pointer, parse_envelope

log = logging.getLogger(__name__)

QUARANTINE_PREFIX = "quarantine"  # in the archive bucket
# A cloud-side re-send (a replay of events-dlq, a quarantine release) gets a new SentTimestamp; it carries
# the first one in this message attribute (ISO-8601 UTC), so the archive keeps when the edge handed it over.
QUEUED_AT_ATTRIBUTE = "queued_at"


@dataclass(frozen=True)
class QueueMessage:
    message_id: str
    receipt_handle: str
    body: str
    receive_count: int
    sent_at: datetime | None = None  # SQS's SentTimestamp: when the edge's send was accepted
    resent: bool = False  # a cloud-side re-send (it carries QUEUED_AT_ATTRIBUTE), not a message the edge made


def sent_at(attributes: dict, message_attributes: dict | None = None) -> datetime | None:
    """When the edge's send was accepted: the `queued_at` a re-send carried, else SQS's own SentTimestamp
    (epoch milliseconds, stamped by SQS, not by any site clock); None if neither is readable."""
    carried = ((message_attributes or {}).get(QUEUED_AT_ATTRIBUTE) or {}).get("StringValue")
    try:
        if carried and (when := datetime.fromisoformat(carried)).tzinfo is not None:
            return when.astimezone(UTC)
    except ValueError:
        pass
    try:
        return datetime.fromtimestamp(int(attributes["SentTimestamp"]) / 1000, tz=UTC)
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        return None


@dataclass
class Window:
    """One drain run's share of the queue."""

    messages: list[QueueMessage] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.messages)


class RejectedMessage(NamedTuple):
    """A message the drain refused as input: kept in the quarantine with its reason, then deleted."""

    message: QueueMessage
    reason: str  # an `EnvelopeRejected` reason, or "unreadable" for anything unforeseen
    detail: str
    error_type: str = "EnvelopeRejected"


@dataclass
class ParsedWindow:
    """A window's unique events, and what became of every other message.

    Dagster hands this from op to op through its IO manager, which pickles it: its state is therefore
    each event's wire text (flat strings, already validated), never the decoded payload trees, so no
    event's shape can make that hand-over fail. `events` decodes the text again where it is used.
    """

    bodies: list[str]  # the JSON of each unique event, as received (claim checks resolved)
    # Receipt handles of every message whose event is represented in `bodies` (duplicates included).
    receipts: list[str]
    quarantined: list[RejectedMessage]
    duplicates: int
    held: int = 0  # messages left in SQS for redelivery (a claim check S3 could not serve)
    # When the edge handed each event in `bodies` to SQS (ISO-8601 UTC, "" if SQS did not say): the
    # SentTimestamp of its first copy in the window (of the pointer message for a claim check).
    queued_at: list[str] = field(default_factory=list)
    # Every message behind `bodies` (duplicates included), as (index into bodies, message id, resent):
    # what the drain received, for reconciliation (pipeline.reconciliation).
    received: list[tuple[int, str, bool]] = field(default_factory=list)
    _events: list[Envelope] | None = field(default=None, repr=False, compare=False)

    @property
    def events(self) -> list[Envelope]:
        if self._events is None:
            self._events = [parse_envelope(body) for body in self.bodies]
        return self._events

    @property
    def queued_times(self) -> list[datetime | None]:
        """`queued_at` as times, one per event of `events` (None where SQS did not say)."""
        return [datetime.fromisoformat(text) if text else None for text in self.queued_at] or [None] * len(self.bodies)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_events": None}


def receive_window(sqs, queue_url: str, max_messages: int, wait_time_s: int = 1, max_seconds: float = 30.0) -> Window:
    """Receive up to `max_messages`, stopping early once the queue runs dry or time is up.

    Only the first receive long-polls; a later short receive that comes back less than full means
    the backlog is taken (on a FIFO queue, an empty one), so the run moves on instead of trickling
    for its whole time budget.
    """
    window = Window()
    deadline = time.monotonic() + max_seconds
    while len(window) < max_messages and time.monotonic() < deadline:
        wanted = min(10, max_messages - len(window))
        response = sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=wanted,
            WaitTimeSeconds=wait_time_s if not window.messages else 0,
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
            MessageAttributeNames=[QUEUED_AT_ATTRIBUTE],
        )
        batch = response.get("Messages", [])
        for msg in batch:
            window.messages.append(
                QueueMessage(
                    message_id=msg["MessageId"],
                    receipt_handle=msg["ReceiptHandle"],
                    body=msg["Body"],
                    receive_count=int(msg.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
                    sent_at=sent_at(msg.get("Attributes", {}), msg.get("MessageAttributes")),
                    resent=QUEUED_AT_ATTRIBUTE in (msg.get("MessageAttributes") or {}),
                )
            )
        # A short answer means the backlog is taken, except on a FIFO queue: there a receive returns
        # only groups (sites) with nothing in flight, so only an empty answer says that.
        if not batch or (len(batch) < wanted and not queue_url.endswith(".fifo")):
            break
    return window


def parse_window(window: Window, s3_client=None, claim_check_bucket: str | None = None) -> ParsedWindow:
    """Validate every message and keep one event per (site_id, event_id); the rest are duplicates or quarantined.

    The key includes the site because an event id is chosen by a site's publisher: keyed by the id
    alone, one site could make another site's events vanish as "duplicates".

    A claim-check pointer (an event the edge stored in S3 because it exceeded the SQS size limit) is
    resolved here, so nothing downstream ever sees one; `verify_and_fetch` honours it only when the
    edge made it (a bad pointer or a hash mismatch is quarantined). If S3 cannot be read the message is
    left out of `receipts` (not deleted), so SQS redelivers it later. Whatever else goes wrong with one
    message is quarantined as `unreadable`, with its exception type; its neighbours go on.
    """
    events: dict[tuple[str, str], str] = {}
    index: dict[tuple[str, str], int] = {}
    received: list[tuple[int, str, bool]] = []
    queued: list[str] = []
    parsed: list[Envelope] = []
    receipts, quarantined, duplicates, held = [], [], 0, 0
    for msg in window.messages:
        try:
            body = msg.body
            pointer = claim_check_pointer(body)
            if pointer is not None:
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
                    log.warning(
                        "claim check s3://%s/%s unresolved (%s); leaving the message in SQS",
                        pointer.bucket,
                        pointer.key,
                        exc,
                    )
                    held += 1
                    continue
            env = parse_envelope(body)
        except EnvelopeRejected as exc:
            quarantined.append(RejectedMessage(msg, exc.reason, exc.detail))
            continue
        except Exception as exc:  # noqa: BLE001 - one message's fate alone, whatever it was
            quarantined.append(
                RejectedMessage(msg, "unreadable", f"{type(exc).__name__}: {str(exc)[:200]}", type(exc).__name__)
            )
            continue
        receipts.append(msg.receipt_handle)
        if env.key in events:
            duplicates += 1
            received.append((index[env.key], msg.message_id, msg.resent))
            continue
        index[env.key] = len(events)
        received.append((index[env.key], msg.message_id, msg.resent))
        events[env.key] = body
        queued.append(msg.sent_at.isoformat() if msg.sent_at else "")
        parsed.append(env)
    return ParsedWindow(
        list(events.values()),
        receipts,
        quarantined,
        duplicates,
        held,
        queued_at=queued,
        received=received,
        _events=parsed,
    )


def quarantine_line(stage: str, reason: str, error_type: str, detail: str, body: str, **identity: str | None) -> str:
    """One JSON line of the cloud quarantine: where it was found, why, and the body to release it with."""
    return json.dumps(
        {
            "stage": stage,
            **{k: v for k, v in identity.items() if v is not None},
            "reason": reason,
            "error_type": error_type,
            "detail": detail,
            "body": body,
        }
    )


def quarantine_key(run_id: str, stage: str, now: datetime) -> str:
    """`quarantine/<date>/<run id>.<stage>.jsonl`: one object per run and stage that found something."""
    return f"{QUARANTINE_PREFIX}/{now:%Y-%m-%d}/{run_id}.{stage}.jsonl"


def write_quarantine(s3, bucket: str, key: str, lines: list[str]) -> None:
    """One PutObject: once it returns, the lines are durable and their messages may leave SQS."""
    s3.put_object(
        Bucket=bucket, Key=key, Body=("\n".join(lines) + "\n").encode("utf-8"), ContentType="application/x-ndjson"
    )


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
