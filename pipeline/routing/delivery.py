"""Partner webhook delivery from the partner's own queue, with backoff held by SQS, not by a sleeper.

A failed attempt leaves the message in the queue and sets its visibility to the next delay of the
configured list, so the wait costs no worker and survives a crash; SQS's receive count is the attempt
number. After the last attempt the message goes to the partner's DLQ. One partner's run touches only
that partner's queue, so a partner that is down never slows another.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests

from edge_bridge.envelope import utc_now
from pipeline.routing.config import PartnerConfig
from pipeline.routing.logs import AttemptLog
from pipeline.routing.webhooks import WebhookResult, post_signed

log = logging.getLogger(__name__)


@dataclass
class DeliveryStats:
    delivered: int = 0
    failed: int = 0
    dead_lettered: int = 0
    malformed: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def attempts(self) -> int:
        return self.delivered + self.failed + self.dead_lettered

    @property
    def success_rate(self) -> float:
        return self.delivered / self.attempts if self.attempts else 1.0


@dataclass
class PartnerQueues:
    url: str
    dlq_url: str


def _pending(sqs, url: str) -> int:
    attrs = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible", "ApproximateNumberOfMessagesDelayed"],
    )["Attributes"]
    return sum(int(v) for v in attrs.values())


class PartnerDelivery:
    """Deliver one partner's queue for up to `max_seconds` (or until it is empty)."""

    def __init__(self, partner: PartnerConfig, sqs, queues: PartnerQueues, delays: tuple[int, ...], attempt_log: AttemptLog | None, parallelism: int = 8) -> None:
        self.partner, self.sqs, self.queues, self.delays = partner, sqs, queues, tuple(delays)
        self.attempt_log = attempt_log
        self.secret = partner.secret()
        self.session = requests.Session()
        self.pool = ThreadPoolExecutor(max_workers=parallelism)
        self.stats = DeliveryStats()
        self._lock = threading.Lock()

    @property
    def max_attempts(self) -> int:
        return 1 + len(self.delays)

    def run(self, max_seconds: float = 60.0, stop_when_idle: bool = True, wait_time_s: int = 1) -> DeliveryStats:
        deadline = time.monotonic() + max_seconds
        try:
            while time.monotonic() < deadline:
                batch = self.sqs.receive_message(
                    QueueUrl=self.queues.url,
                    MaxNumberOfMessages=10,
                    WaitTimeSeconds=wait_time_s,
                    MessageSystemAttributeNames=["ApproximateReceiveCount"],
                ).get("Messages", [])
                if batch:
                    list(self.pool.map(self._handle, batch))
                elif stop_when_idle and _pending(self.sqs, self.queues.url) == 0:
                    break
                if self.attempt_log:
                    self.attempt_log.flush()
        finally:
            if self.attempt_log:
                self.attempt_log.flush()
            self.pool.shutdown(wait=True)
        return self.stats

    def _handle(self, message: dict) -> None:
        attempt = int(message.get("Attributes", {}).get("ApproximateReceiveCount", 1))
        try:
            item = json.loads(message["Body"])
            event_id, body = item["event_id"], item["body"]
        except (ValueError, KeyError, TypeError) as exc:
            # Not something a drain run wrote: keep it in the DLQ for a person, never block the queue.
            with self._lock:
                self.stats.malformed += 1
            self._dead_letter(message, f"malformed partner message: {exc}")
            return
        attempted_at = utc_now()
        result = post_signed(self.session, self.partner.url(), self.secret, event_id, body, self.partner.timeout_s)
        if result.ok:
            self.sqs.delete_message(QueueUrl=self.queues.url, ReceiptHandle=message["ReceiptHandle"])
            outcome = "delivered"
        elif attempt < self.max_attempts:
            self.sqs.change_message_visibility(QueueUrl=self.queues.url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=self.delays[attempt - 1])
            outcome = "failed"
        else:
            self._dead_letter(message, result.error or "failed")
            outcome = "dead_lettered"
        with self._lock:
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
            if result.error:
                key = result.error.split(":")[0]
                self.stats.errors[key] = self.stats.errors.get(key, 0) + 1
        self._record(event_id, attempt, attempted_at, result, outcome)

    def _dead_letter(self, message: dict, reason: str) -> None:
        self.sqs.send_message(
            QueueUrl=self.queues.dlq_url,
            MessageBody=message["Body"],
            MessageAttributes={"failure_reason": {"DataType": "String", "StringValue": reason[:1000]}},
        )
        self.sqs.delete_message(QueueUrl=self.queues.url, ReceiptHandle=message["ReceiptHandle"])

    def _record(self, event_id: str, attempt: int, attempted_at, result: WebhookResult, outcome: str) -> None:
        if self.attempt_log:
            self.attempt_log.record(
                event_id=event_id,
                partner=self.partner.name,
                attempt=attempt,
                attempted_at=attempted_at,
                status_code=result.status_code,
                latency_ms=result.latency_ms,
                outcome=outcome,
                error=result.error,
            )


@dataclass
class RedeliveryReport:
    probed: bool
    partner_answered: bool
    moved: int
    reason: str


def redeliver_partner_dlq(partner: PartnerConfig, sqs, queues: PartnerQueues, attempt_log: AttemptLog | None, max_messages: int = 10000) -> RedeliveryReport:
    """Once the partner answers again, move its DLQ back to its queue for a fresh round of attempts.

    The probe is a real delivery of the oldest dead-lettered event (signed, same webhook-id), so
    "answers again" means "accepts our webhooks", not merely "the host is up".
    """
    first = sqs.receive_message(QueueUrl=queues.dlq_url, MaxNumberOfMessages=1, WaitTimeSeconds=0, VisibilityTimeout=30).get("Messages", [])
    if not first:
        return RedeliveryReport(False, False, 0, "DLQ is empty")
    message = first[0]
    item = json.loads(message["Body"])
    session = requests.Session()
    attempted_at = utc_now()
    result = post_signed(session, partner.url(), partner.secret(), item["event_id"], item["body"], partner.timeout_s)
    if attempt_log:
        outcome = "delivered" if result.ok else "failed"
        attempt_log.record(event_id=item["event_id"], partner=partner.name, attempt=0, attempted_at=attempted_at, status_code=result.status_code, latency_ms=result.latency_ms, outcome=outcome, error=result.error)
        attempt_log.flush()
    if not result.ok:
        sqs.change_message_visibility(QueueUrl=queues.dlq_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0)
        return RedeliveryReport(True, False, 0, f"partner still failing ({result.error}); DLQ left in place")
    sqs.delete_message(QueueUrl=queues.dlq_url, ReceiptHandle=message["ReceiptHandle"])
    moved = move_messages(sqs, queues.dlq_url, queues.url, max_messages)
    return RedeliveryReport(True, True, moved, "partner answered; DLQ moved back for delivery")


def move_messages(sqs, source_url: str, target_url: str, max_messages: int) -> int:
    """Send to the target first, then delete from the source: a crash in between duplicates, never loses."""
    moved = 0
    while moved < max_messages:
        batch = sqs.receive_message(QueueUrl=source_url, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=60).get("Messages", [])
        if not batch:
            break
        response = sqs.send_message_batch(QueueUrl=target_url, Entries=[{"Id": str(i), "MessageBody": m["Body"]} for i, m in enumerate(batch)])
        sent = {int(e["Id"]) for e in response.get("Successful", [])}
        done = [batch[i] for i in sorted(sent)]
        if done:
            sqs.delete_message_batch(QueueUrl=source_url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)])
        moved += len(done)
        if len(done) < len(batch):
            log.warning("%d messages could not be moved now; they stay in %s", len(batch) - len(done), source_url)
            break
    return moved
