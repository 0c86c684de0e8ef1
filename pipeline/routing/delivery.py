"""Partner webhook delivery from the partner's own queue, with backoff held by SQS, not by a sleeper.

A failed attempt leaves the message in the queue and sets its visibility to the next delay of the
configured list, so the wait costs no worker and survives a crash; SQS's receive count is the attempt
number. After the last attempt the message goes to the partner's DLQ. One partner's run touches only
that partner's queue, so a partner that is down never slows another.

A message that cannot be delivered for its own reason (not JSON, a field missing or of the wrong type,
a header value the HTTP library refuses, any exception while it is handled) is poison: it goes to the
DLQ at once with `failure_reason` (one of `POISON_REASONS`) and `failure_detail` (the exception type
and message), is counted, and is never sent back by redelivery; its batch-mates are delivered as usual.

Every attempt is logged with what exactly was sent (the body's SHA-256 and size, the webhook-id, site,
signature timestamp and the contract version the message was transformed under, which also goes out
as the `X-Contract-Version` header), so `pipeline.audit` can later prove what a partner received.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime

import requests
from botocore.exceptions import ClientError

from edge_bridge.envelope import utc_now
from pipeline.routing import fifo
from pipeline.routing.config import PartnerConfig
from pipeline.routing.logs import AttemptLog
from pipeline.routing.webhooks import WebhookResult, check_endpoint, prepare_signed, send_signed

log = logging.getLogger(__name__)

# failure_reason of a message dead-lettered for its own fault; an exhausted one carries ATTEMPTS_EXHAUSTED.
POISON_REASONS = ("bad_json", "not_an_object", "missing_field", "bad_field", "request_refused", "unexpected_error")
ATTEMPTS_EXHAUSTED = "attempts_exhausted"
_ATTRIBUTE_NAMES = ["failure_reason", "failure_detail"]


class PoisonMessage(Exception):
    """This message cannot be delivered whatever the partner does; `reason` is one of POISON_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _described(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class PartnerMessage:
    """What a drain run puts in a partner queue: the event's identity, the contract and the partner's body."""

    event_id: str
    webhook_id: str  # the Standard Webhooks id: the drain's dedupe id when it sent one, else the event_id
    body: str
    site_id: str | None = None
    contract_version: str | None = None  # the contract the body was made under (absent in older messages)
    archive_hour: str | None = None

    @classmethod
    def from_sqs(cls, raw: object) -> PartnerMessage:
        try:
            item = json.loads(raw)
        except (ValueError, TypeError, RecursionError) as exc:
            raise PoisonMessage("bad_json", _described(exc)) from None
        if not isinstance(item, dict):
            raise PoisonMessage("not_an_object", type(item).__name__)
        missing = [key for key in ("event_id", "body") if key not in item]
        if missing:
            raise PoisonMessage("missing_field", ", ".join(missing))
        webhook_id = item.get("webhook_id") or item["event_id"]
        for name, value in (("event_id", item["event_id"]), ("webhook_id", webhook_id), ("body", item["body"])):
            if not isinstance(value, str) or not value:
                raise PoisonMessage(
                    "bad_field", f"{name} is {type(value).__name__} {str(value)[:60]!r}, not a non-empty string"
                )
        for name in ("site_id", "contract_version", "archive_hour"):
            value = item.get(name)
            if value is not None and not isinstance(value, str):
                raise PoisonMessage("bad_field", f"{name} is {type(value).__name__}, not a string")
        return cls(
            item["event_id"],
            webhook_id,
            item["body"],
            item.get("site_id"),
            item.get("contract_version"),
            item.get("archive_hour"),
        )

    def request(self, session: requests.Session, url: str, secret: str) -> requests.PreparedRequest:
        try:
            return prepare_signed(session, url, secret, self.webhook_id, self.body, self.contract_version)
        except Exception as exc:  # noqa: BLE001 - the endpoint was checked; what is left is this message's
            raise PoisonMessage("request_refused", _described(exc)) from None

    def audit_fields(self, request: requests.PreparedRequest) -> dict:
        """The attempt-log columns that say exactly what was sent: body hash and size, ids, contract, signature time."""
        sent = request.body if isinstance(request.body, bytes) else str(request.body or "").encode("utf-8")
        return {
            "event_id": self.event_id,
            "webhook_id": self.webhook_id,
            "site_id": self.site_id,
            "contract_version": self.contract_version,
            "body_sha256": hashlib.sha256(sent).hexdigest(),
            "body_bytes": len(sent),
            "webhook_timestamp": datetime.fromtimestamp(int(request.headers["webhook-timestamp"]), UTC),
            "archive_hour": self.archive_hour,
        }


def poison_reason(message: dict, session: requests.Session, url: str, secret: str) -> tuple[str, str] | None:
    """(reason, detail) if an SQS message from a partner queue or DLQ is poison, else None."""
    attributes = message.get("MessageAttributes") or {}
    reason = attributes.get("failure_reason", {}).get("StringValue")
    if reason in POISON_REASONS:
        return reason, attributes.get("failure_detail", {}).get("StringValue", "")
    try:
        PartnerMessage.from_sqs(message["Body"]).request(session, url, secret)
    except PoisonMessage as exc:
        return exc.reason, exc.detail
    return None


def _attribute_text(text: str, limit: int = 1000) -> str:
    """Printable ASCII, so SQS takes it whatever the message carried (control characters, lone surrogates)."""
    return ascii(text)[1:-1][:limit] or "-"


def set_aside(sqs, dlq_url: str, message: dict, source_url: str, reason: str, detail: str) -> str:
    """Put `message` in the DLQ with its reason, then delete it from `source_url` (send first: never lost).

    Returns the DLQ copy's message id."""
    sent = sqs.send_message(
        QueueUrl=dlq_url,
        MessageBody=message["Body"],
        MessageAttributes={
            "failure_reason": {"DataType": "String", "StringValue": _attribute_text(reason, 100)},
            "failure_detail": {"DataType": "String", "StringValue": _attribute_text(detail)},
        },
        **fifo.send_fields(dlq_url, message["Body"], message["MessageId"]),
    )
    sqs.delete_message(QueueUrl=source_url, ReceiptHandle=message["ReceiptHandle"])
    return sent["MessageId"]


@dataclass
class DeliveryStats:
    delivered: int = 0
    failed: int = 0
    dead_lettered: int = 0
    malformed: int = 0  # poison: dead-lettered at once for its own fault, never attempted again
    malformed_reasons: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    delivered_by_contract: dict[str, int] = field(default_factory=dict)  # contract version -> bodies delivered under it

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
        AttributeNames=[
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ],
    )["Attributes"]
    return sum(int(v) for v in attrs.values())


class PartnerDelivery:
    """Deliver one partner's queue for up to `max_seconds` (or until it is empty)."""

    def __init__(
        self,
        partner: PartnerConfig,
        sqs,
        queues: PartnerQueues,
        delays: tuple[int, ...],
        attempt_log: AttemptLog | None,
        parallelism: int = 8,
    ) -> None:
        self.partner, self.sqs, self.queues, self.delays = partner, sqs, queues, tuple(delays)
        self.attempt_log = attempt_log
        self.secret = partner.secret()
        self.url = partner.url()
        self.session = requests.Session()
        # A bad URL or secret would make every message look like poison: fail the run instead.
        check_endpoint(self.session, self.url, self.secret)
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
                    self._handle_batch(batch)
                elif stop_when_idle and _pending(self.sqs, self.queues.url) == 0:
                    break
                if self.attempt_log:
                    self.attempt_log.flush()
        finally:
            if self.attempt_log:
                self.attempt_log.flush()
            self.pool.shutdown(wait=True)
        return self.stats

    def _handle_batch(self, batch: list[dict]) -> None:
        """Every message of the batch is settled before an error ends the run, and only a shared one does."""
        futures = [self.pool.submit(self._handle, message) for message in batch]
        wait(futures)
        shared = None
        for future in futures:
            exc = future.exception()
            if exc is None:
                continue
            if isinstance(exc, ClientError):
                # SQS refused one call about one message; it stays in the queue, and the queue's
                # redrive policy ends its round trips if this keeps happening.
                log.warning(
                    "%s: SQS refused a call for one message, which stays in the queue: %s", self.partner.name, exc
                )
                self._count("errors", f"sqs {exc.response.get('Error', {}).get('Code', 'error')}")
            else:
                shared = shared or exc
        if shared is not None:
            raise shared

    def _count(self, name: str, key: str) -> None:
        with self._lock:
            counts = getattr(self.stats, name)
            counts[key] = counts.get(key, 0) + 1

    def _handle(self, message: dict) -> None:
        attempt = int(message.get("Attributes", {}).get("ApproximateReceiveCount", 1))
        try:
            item = PartnerMessage.from_sqs(message["Body"])
            request = item.request(self.session, self.url, self.secret)
            sent = item.audit_fields(request)
            attempted_at = utc_now()
            result = send_signed(self.session, request, self.partner.timeout_s)
        except Exception as exc:  # noqa: BLE001 - whatever it is, it is this message's alone
            poison = exc if isinstance(exc, PoisonMessage) else PoisonMessage("unexpected_error", _described(exc))
            log.warning("%s: message %s set aside in the DLQ: %s", self.partner.name, message.get("MessageId"), poison)
            set_aside(self.sqs, self.queues.dlq_url, message, self.queues.url, poison.reason, poison.detail)
            with self._lock:
                self.stats.malformed += 1
            self._count("malformed_reasons", poison.reason)
            return
        if result.ok:
            self.sqs.delete_message(QueueUrl=self.queues.url, ReceiptHandle=message["ReceiptHandle"])
            outcome = "delivered"
        elif attempt < self.max_attempts:
            self.sqs.change_message_visibility(
                QueueUrl=self.queues.url,
                ReceiptHandle=message["ReceiptHandle"],
                VisibilityTimeout=self.delays[attempt - 1],
            )
            outcome = "failed"
        else:
            set_aside(
                self.sqs, self.queues.dlq_url, message, self.queues.url, ATTEMPTS_EXHAUSTED, result.error or "failed"
            )
            outcome = "dead_lettered"
        with self._lock:
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        if result.error:
            self._count("errors", result.error.split(":")[0])
        if result.ok:
            self._count("delivered_by_contract", item.contract_version or "unknown")
        self._record(sent, attempt, attempted_at, result, outcome)

    def _record(self, sent: dict, attempt: int, attempted_at, result: WebhookResult, outcome: str) -> None:
        if self.attempt_log:
            self.attempt_log.record(
                **sent,
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
    # Poison messages seen in the DLQ, each {"message_id", "reason", "detail"}: they stay there for a person.
    poison: list[dict] = field(default_factory=list)


def redeliver_partner_dlq(
    partner: PartnerConfig, sqs, queues: PartnerQueues, attempt_log: AttemptLog | None, max_messages: int = 10000
) -> RedeliveryReport:
    """Once the partner answers again, move its DLQ back to its queue for a fresh round of attempts.

    The probe is a real delivery of a dead-lettered event (signed, same webhook-id), so "answers again"
    means "accepts our webhooks", not merely "the host is up". Poison messages are never probed nor
    moved: they stay in the DLQ with their reason and are listed in the report. A message whose probe
    raises is poison too (it is put back in the DLQ with that reason) and the next one is probed.
    """
    session, url, secret = requests.Session(), partner.url(), partner.secret()
    check_endpoint(session, url, secret)
    poison: dict[str, dict] = {}
    kept: dict[str, str] = {}  # message id -> latest receipt handle of a poison message held invisible

    def is_poison(message: dict) -> bool:
        if message["MessageId"] not in poison:
            found = poison_reason(message, session, url, secret)
            if found is None:
                return False
            poison[message["MessageId"]] = {"message_id": message["MessageId"], "reason": found[0], "detail": found[1]}
        kept[message["MessageId"]] = message["ReceiptHandle"]
        return True

    try:
        return _probe_and_move(partner, sqs, queues, attempt_log, max_messages, session, url, secret, is_poison, poison)
    finally:
        # Poison was held invisible only so that this pass would not take it twice; leave it in view.
        _release(sqs, queues.dlq_url, list(kept.values()))


def _probe_and_move(
    partner, sqs, queues, attempt_log, max_messages, session, url, secret, is_poison, poison
) -> RedeliveryReport:
    seen: set[str] = set()
    while True:
        batch = sqs.receive_message(
            QueueUrl=queues.dlq_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0,
            VisibilityTimeout=30,
            MessageAttributeNames=_ATTRIBUTE_NAMES,
        ).get("Messages", [])
        fresh = [m for m in batch if m["MessageId"] not in seen]
        seen.update(m["MessageId"] for m in fresh)
        candidates = [m for m in batch if not is_poison(m)]
        if not fresh:
            _release(sqs, queues.dlq_url, [m["ReceiptHandle"] for m in candidates])
            reason = (
                f"no well-formed message in the DLQ; {len(poison)} poison left in place" if poison else "DLQ is empty"
            )
            return RedeliveryReport(False, False, 0, reason, list(poison.values()))
        if candidates[1:]:  # back in line for the move
            _release(sqs, queues.dlq_url, [m["ReceiptHandle"] for m in candidates[1:]])
            seen.difference_update(m["MessageId"] for m in candidates[1:])
        if not candidates:
            continue
        message = candidates[0]
        item = PartnerMessage.from_sqs(message["Body"])
        attempted_at = utc_now()
        try:
            request = item.request(session, url, secret)
            sent = item.audit_fields(request)
            result = send_signed(session, request, partner.timeout_s)
        except Exception as exc:  # noqa: BLE001 - the probe failed on this message, not on the partner
            found = exc if isinstance(exc, PoisonMessage) else PoisonMessage("unexpected_error", _described(exc))
            log.warning("%s: probe message %s set aside in the DLQ: %s", partner.name, message["MessageId"], found)
            # Marked in place (a copy with its reason, then the original deleted), so no later move takes it.
            copy_id = set_aside(sqs, queues.dlq_url, message, queues.dlq_url, found.reason, found.detail)
            poison[copy_id] = {"message_id": copy_id, "reason": found.reason, "detail": found.detail}
            continue
        break
    if attempt_log:
        outcome = "delivered" if result.ok else "failed"
        attempt_log.record(
            **sent,
            partner=partner.name,
            attempt=0,
            attempted_at=attempted_at,
            status_code=result.status_code,
            latency_ms=result.latency_ms,
            outcome=outcome,
            error=result.error,
        )
        attempt_log.flush()
    if not result.ok:
        _release(sqs, queues.dlq_url, [message["ReceiptHandle"]])
        return RedeliveryReport(
            True, False, 0, f"partner still failing ({result.error}); DLQ left in place", list(poison.values())
        )
    sqs.delete_message(QueueUrl=queues.dlq_url, ReceiptHandle=message["ReceiptHandle"])
    moved = move_messages(sqs, queues.dlq_url, queues.url, max_messages, keep=is_poison)
    reason = "partner answered; DLQ moved back for delivery" + (
        f"; {len(poison)} poison left in the DLQ" if poison else ""
    )
    return RedeliveryReport(True, True, moved, reason, list(poison.values()))


def _release(sqs, url: str, receipt_handles: list[str]) -> None:
    """Make received messages visible again now instead of at the end of their visibility timeout."""
    for start in range(0, len(receipt_handles), 10):
        chunk = receipt_handles[start : start + 10]
        try:
            sqs.change_message_visibility_batch(
                QueueUrl=url,
                Entries=[{"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": 0} for i, h in enumerate(chunk)],
            )
        except ClientError as exc:  # they come back at the end of their timeout instead
            log.warning("could not make %d messages visible again in %s: %s", len(chunk), url, exc)


def move_messages(sqs, source_url: str, target_url: str, max_messages: int, keep=None) -> int:
    """Send to the target first, then delete from the source: a crash in between duplicates, never loses.

    `keep(message)` true leaves a message where it is (invisible until this move is over, so it is not
    taken again); a receive that brings nothing new ends the move.
    """
    moved, seen = 0, set()
    while moved < max_messages:
        batch = sqs.receive_message(
            QueueUrl=source_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0,
            VisibilityTimeout=60,
            MessageAttributeNames=_ATTRIBUTE_NAMES,
        ).get("Messages", [])
        movable = [m for m in batch if not (keep and keep(m))]
        fresh = {m["MessageId"] for m in batch} - seen
        if not fresh:
            break
        seen.update(fresh)
        batch = [m for m in movable if m["MessageId"] in fresh]
        if not batch:
            continue
        response = sqs.send_message_batch(
            QueueUrl=target_url,
            Entries=[
                {"Id": str(i), "MessageBody": m["Body"], **fifo.send_fields(target_url, m["Body"], m["MessageId"])}
                for i, m in enumerate(batch)
            ],
        )
        sent = {int(e["Id"]) for e in response.get("Successful", [])}
        done = [batch[i] for i in sorted(sent)]
        if done:
            sqs.delete_message_batch(
                QueueUrl=source_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)],
            )
        moved += len(done)
        if len(done) < len(batch):
            log.warning("%d messages could not be moved now; they stay in %s", len(batch) - len(done), source_url)
            break
    return moved
