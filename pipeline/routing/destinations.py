"""Handing a drain window's events to the routing destinations: partner queues and priority queues.

Each call returns only once SQS has accepted every message it sends or refused it for a reason of the
message's own, so the drain run may delete the window afterwards. What goes wrong with one event (its
transform raises, its body is too big for the partner, SQS refuses the entry for its content) is that
event's fate alone: it comes back as `Refused`, for the drain to quarantine, and its neighbours go on.
Only a cause every message shares (SQS unreachable, throttled, a queue missing, a refusal SQS blames
on itself) raises, so the run fails and the window stays in SQS. A run that dies half-way sends again
when the window is redelivered; consumers de-duplicate by (site_id, event_id).

Every send respects SQS's limits: a message is at most `max_message_bytes` (an event bigger than that
travels to a priority queue as a claim-check pointer) and a SendMessageBatch at most ten entries and
`max_batch_bytes` in all.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from botocore.exceptions import ClientError

from edge_bridge.envelope import Envelope
from pipeline.archive import archive_hour
from pipeline.routing.config import PartnerContract, RoutingConfig
from pipeline.routing.transform import PartnerTransform

log = logging.getLogger(__name__)

T = TypeVar("T")

SQS_MAX_BATCH_ENTRIES = 10
SQS_MAX_BYTES = 262144  # per message and per SendMessageBatch (config/stack.yaml: events_queue.max_message_bytes)

# Why a destination refused one event (the quarantine's `reason`); stable, so they can be counted.
REFUSAL_REASONS = {
    "transform_failed": "the partner transform raised on this event",
    "too_large_for_partner": "the partner's body is over the SQS message limit (partners get no claim-check pointers)",
    "refused_by_sqs": "SQS refused this one entry for its content (size, characters)",
    "unexpected_error": "building this event's message raised something no other reason covers",
    "unarchivable": "the event could not be made into an archive row (found by land_in_archive)",
}

# SQS error codes that blame one entry's content, not the call: only these make an event's own fate.
# Any other refusal is treated as shared (failing the run is recoverable; quarantining a whole stream
# for a misconfigured queue would not be).
ENTRY_CONTENT_CODES = frozenset({"InvalidMessageContents", "InvalidParameterValue", "MessageTooLong"})
# Whole-call refusals that one oversized or odd entry can cause: the batch is retried one entry a call.
BATCH_CONTENT_CODES = frozenset({"BatchRequestTooLong", "InvalidMessageContents", "MessageTooLong"})


class SendFailed(RuntimeError):
    """SQS failed a send for a shared cause; the drain run must not delete its window."""


@dataclass(frozen=True)
class QueueLimits:
    """SQS's size limits as this stack configures them (`events_queue.max_message_bytes`)."""

    max_message_bytes: int = SQS_MAX_BYTES
    max_batch_bytes: int = SQS_MAX_BYTES
    max_batch_entries: int = SQS_MAX_BATCH_ENTRIES

    @classmethod
    def from_stack(cls, stack=None) -> QueueLimits:
        from pipeline.stack import load_stack_config

        stack = stack or load_stack_config()
        size = stack.events_queue.max_message_bytes
        return cls(max_message_bytes=size, max_batch_bytes=size)


@dataclass(frozen=True)
class Refused:
    """One event a destination could not take for a reason of its own: quarantine it, do not retry it."""

    event: Envelope
    destination: str  # "partner:<name>", "priority:<high|medium|low>" or "archive"
    reason: str  # one of REFUSAL_REASONS
    error_type: str  # the exception's type, or SQS's error code
    detail: str


@dataclass
class HandOver:
    """What one destination did with a window: messages accepted per queue, and the events it refused."""

    accepted: dict[str, int] = field(default_factory=dict)
    refused: list[Refused] = field(default_factory=list)
    contracts: dict[str, str] = field(default_factory=dict)  # partner -> contract version its bodies were made under


@dataclass(frozen=True)
class Outgoing(Generic[T]):
    tag: T  # whatever the caller needs back if SQS refuses this entry
    body: str


def body_bytes(body: str) -> int:
    return len(body) if body.isascii() else len(body.encode("utf-8"))


def error_code(exc: ClientError) -> str:
    code = exc.response.get("Error", {}).get("Code", "") or ""
    return code.rsplit(".", 1)[-1]  # "AWS.SimpleQueueService.BatchRequestTooLong" -> "BatchRequestTooLong"


def pack(items: list[Outgoing[T]], limits: QueueLimits) -> list[list[Outgoing[T]]]:
    """Batches of at most `max_batch_entries` entries and `max_batch_bytes` in all, in order."""
    batches: list[list[Outgoing[T]]] = []
    current: list[Outgoing[T]] = []
    size = 0
    for item in items:
        n = body_bytes(item.body)
        if current and (len(current) >= limits.max_batch_entries or size + n > limits.max_batch_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += n
    if current:
        batches.append(current)
    return batches


def _send_batch(sqs, queue_url: str, batch: list[Outgoing[T]]) -> list[tuple[T, str, str]]:
    """One SendMessageBatch; returns (tag, code, message) for each entry SQS refused for its content."""
    try:
        response = sqs.send_message_batch(
            QueueUrl=queue_url, Entries=[{"Id": str(i), "MessageBody": item.body} for i, item in enumerate(batch)]
        )
    except ClientError as exc:
        code = error_code(exc)
        if code in BATCH_CONTENT_CODES:
            if len(batch) > 1:  # find the entry (or entries) it was about
                return [refusal for item in batch for refusal in _send_batch(sqs, queue_url, [item])]
            return [(batch[0].tag, code, str(exc)[:300])]
        raise
    refused, shared = [], []
    for failure in response.get("Failed", []):
        code = (failure.get("Code") or "").rsplit(".", 1)[-1]
        if failure.get("SenderFault") and code in ENTRY_CONTENT_CODES:
            refused.append((batch[int(failure["Id"])].tag, code, str(failure.get("Message", ""))[:300]))
        else:
            shared.append(failure)
    if shared:
        raise SendFailed(f"{queue_url}: {len(shared)} of {len(batch)} refused for a shared cause, e.g. {shared[0]}")
    return refused


def send_all(
    sqs,
    batches: dict[str, list[Outgoing[T]] | list[str]],
    limits: QueueLimits = QueueLimits(),
    refusals: list[tuple[T, str, str]] | None = None,
    parallelism: int = 4,
) -> None:
    """Send every message to its queue URL within SQS's limits, a few calls in parallel.

    An entry SQS refuses for its own content is added to `refusals` as (tag, code, message) and the
    rest go on; without a `refusals` list it raises `SendFailed` instead. Anything shared always
    raises. Plain strings may be given instead of `Outgoing` (their tag is the body's index).
    """
    calls = []
    for url, items in batches.items():
        outgoing = [item if isinstance(item, Outgoing) else Outgoing(i, item) for i, item in enumerate(items)]
        calls += [(url, batch) for batch in pack(outgoing, limits)]
    if not calls:
        return
    with ThreadPoolExecutor(max_workers=min(parallelism, len(calls))) as pool:
        futures = [pool.submit(_send_batch, sqs, url, batch) for url, batch in calls]
        refused = [refusal for future in futures for refusal in future.result()]
    if refused and refusals is None:
        raise SendFailed(f"{len(refused)} entries refused, e.g. {refused[0][1]}: {refused[0][2]}")
    if refusals is not None:
        refusals.extend(refused)


def partner_body_text(body: dict) -> str:
    """The exact text a partner is sent and that is signed: canonical, so an audit can re-create it byte
    for byte from the archive and the contract (`pipeline.audit`)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, sort_keys=True, allow_nan=False)


def partner_message(partner: str, event: Envelope, body: dict, contract_version: str | None = None) -> str:
    """What a partner queue holds: the transformed body (signed as-is on delivery) and the event's identity.

    `webhook_id` is the id partners de-duplicate by: `site_id/event_id`, because an event id alone is
    chosen by a site's publisher and one site must not make a partner drop another site's event. It is
    kept readable (not hashed) so an operator can trace a partner's webhook-id straight to the event.
    `contract_version` is the contract the body was made under, so a message transformed before a
    config change is delivered and logged under its own version; `archive_hour` is where the event is
    archived, so an audit finds it without a scan.
    """
    return json.dumps(
        {
            "event_id": event.event_id,
            "site_id": event.site_id,
            "webhook_id": event.dedupe_id,
            "event_type": event.event_type,
            "partner": partner,
            "contract_version": contract_version,
            "archive_hour": archive_hour(event.timestamp, event.received_at),
            "body": partner_body_text(body),
        }
    )


def described(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def partner_shares(
    routing: RoutingConfig,
    events: Iterable[Envelope],
    limits: QueueLimits = QueueLimits(),
    refused: list[Refused] | None = None,
) -> dict[str, list[Outgoing[Envelope]]]:
    """partner name -> messages for its queue: subscribed event types only, already in its schema.

    An event whose transform raises, or whose body is over the message limit, is added to `refused`
    (or raised, when no list is given) and the others go on.
    """
    transforms = {p.name: PartnerTransform(p) for p in routing.partners}
    shares: dict[str, list[Outgoing[Envelope]]] = {name: [] for name in transforms}
    for event in events:
        wire = None
        for name, transform in transforms.items():
            if not transform.subscribes(event.event_type):
                continue
            try:
                wire = wire or event.to_wire()
                body = transform.apply(wire)
            except Exception as exc:  # noqa: BLE001 - this event's fate alone
                if refused is None:
                    raise
                refused.append(
                    Refused(event, f"partner:{name}", "transform_failed", type(exc).__name__, described(exc))
                )
                continue
            try:
                message = partner_message(name, event, body, transform.version)
            except Exception as exc:  # noqa: BLE001 - this event's fate alone
                if refused is None:
                    raise
                refused.append(
                    Refused(event, f"partner:{name}", "unexpected_error", type(exc).__name__, described(exc))
                )
                continue
            if body_bytes(message) > limits.max_message_bytes:
                detail = f"{body_bytes(message)} bytes for partner {name}, limit {limits.max_message_bytes}"
                if refused is None:
                    raise ValueError(detail)
                refused.append(Refused(event, f"partner:{name}", "too_large_for_partner", "MessageTooLarge", detail))
                continue
            shares[name].append(Outgoing(event, message))
    return shares


class ContractRecorder(Protocol):
    def record(self, partner: str, contract: PartnerContract) -> bool: ...


def route_to_partner_queues(
    sqs,
    routing: RoutingConfig,
    events: list[Envelope],
    queue_url: Callable[[str], str],
    limits: QueueLimits = QueueLimits(),
    history: ContractRecorder | None = None,
) -> HandOver:
    """Each partner's share, transformed, into its queue; refused events come back for quarantine.

    With a contract `history`, each partner's contract is recorded before any body made under it is
    queued (a failure there is shared and raises), so every delivered body can later be re-created.
    """
    result = HandOver(contracts={p.name: p.contract_version for p in routing.partners})
    shares = partner_shares(routing, events, limits, result.refused)
    if history is not None:
        for partner in routing.partners:
            if shares[partner.name]:
                history.record(partner.name, partner.contract)
    names = {p.name: p.queue_name for p in routing.partners}
    batches = {
        queue_url(names[name]): [Outgoing((name, item.tag), item.body) for item in items]
        for name, items in shares.items()
        if items
    }
    refusals: list = []
    send_all(sqs, batches, limits, refusals)
    refused_per_partner: Counter = Counter()
    for (name, event), code, message in refusals:
        result.refused.append(Refused(event, f"partner:{name}", "refused_by_sqs", code, message))
        refused_per_partner[name] += 1
    result.accepted = {name: len(items) - refused_per_partner[name] for name, items in shares.items()}
    return result


def priority_body(event: Envelope) -> str:
    """The envelope as a priority queue carries it: ASCII JSON, so SQS cannot refuse a character of it
    (it refuses U+FFFE, U+FFFF and most control characters, which a JSON string may hold)."""
    return json.dumps(event.to_wire(), separators=(",", ":"), ensure_ascii=True, allow_nan=False)


ClaimCheckIn = Callable[[Envelope, str], str]  # (event, body) -> the pointer body that replaces it


def route_to_priority_queues(
    sqs,
    routing: RoutingConfig,
    events: list[Envelope],
    queue_url: Callable[[str], str],
    limits: QueueLimits = QueueLimits(),
    check_in: ClaimCheckIn | None = None,
) -> HandOver:
    """Every event goes to exactly one priority queue, chosen by its event_type (or the default).

    An event over the message limit travels as a claim-check pointer made by `check_in` (the consumer
    resolves it); without `check_in` it is refused. `check_in` raising (S3 unreachable) is shared.
    """
    result = HandOver()
    by_priority: dict[str, list[Outgoing[Envelope]]] = defaultdict(list)
    for event in events:
        priority = routing.priority.for_event_type(event.event_type)
        try:
            body = priority_body(event)
        except Exception as exc:  # noqa: BLE001 - this event's fate alone
            result.refused.append(
                Refused(event, f"priority:{priority}", "unexpected_error", type(exc).__name__, described(exc))
            )
            continue
        if body_bytes(body) > limits.max_message_bytes:
            if check_in is None:
                result.refused.append(
                    Refused(
                        event,
                        f"priority:{priority}",
                        "refused_by_sqs",
                        "MessageTooLarge",
                        f"{body_bytes(body)} bytes and no claim check",
                    )
                )
                continue
            body = check_in(event, body)
        by_priority[priority].append(Outgoing((priority, event), body))
    refusals: list = []
    send_all(
        sqs, {queue_url(routing.priority.queue_for(p)): items for p, items in by_priority.items()}, limits, refusals
    )
    refused_per_priority: Counter = Counter()
    for (priority, event), code, message in refusals:
        result.refused.append(Refused(event, f"priority:{priority}", "refused_by_sqs", code, message))
        refused_per_priority[priority] += 1
    result.accepted = {p: len(items) - refused_per_priority[p] for p, items in by_priority.items()}
    return result
