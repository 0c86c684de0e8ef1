"""Re-sending a time range of the archive to one partner (the domain half of `archive_replay_job`).

A partner that was onboarded late wants history, or one that lost data must be made whole: the
archive holds every event exactly once, so the range is read from it, hour by hour, filtered by the
partner's subscriptions and transformed with the partner's *current* contract, and put on the partner's
own queue in the message shape the drain writes. Delivery then happens as for live traffic (signed,
backoff, DLQ, attempt log), with the event's `site_id/event_id` as `webhook-id` (as the drain sends
it), so a partner that already has an event de-duplicates it.

The replay says which contract it used (`RangeReplay.contract_version`, in every message, every
delivery's `X-Contract-Version` header and attempt-log row) and records that contract in the history
first, so a back-fill under a new contract can be told apart from the original deliveries and audited.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import fs

from edge_bridge.envelope import Envelope
from pipeline.archive import hour_key, read_archive_hour
from pipeline.routing.config import PartnerConfig, RoutingConfig
from pipeline.routing.contracts import ContractHistory
from pipeline.routing.destinations import Outgoing, QueueLimits, Refused, partner_shares, send_all

log = logging.getLogger(__name__)

MAX_RANGE = timedelta(days=93)


class ReplayRangeError(ValueError):
    """A range that cannot be replayed (empty, reversed, naive, or longer than MAX_RANGE)."""


def parse_utc(text: str) -> datetime:
    """ISO 8601 with an offset or Z; a time without an offset is refused rather than guessed."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ReplayRangeError(f"{text!r} is not an ISO 8601 time such as 2024-01-15T10:00:00Z") from None
    if value.tzinfo is None:
        raise ReplayRangeError(f"{text!r} has no UTC offset; write it as 2024-01-15T10:00:00Z")
    return value.astimezone(UTC)


def hours_in_range(start: datetime, end: datetime) -> list[str]:
    """The archive partitions (hour keys) that can hold events with start <= timestamp < end."""
    if end <= start:
        raise ReplayRangeError(f"end {end.isoformat()} is not after start {start.isoformat()}")
    if end - start > MAX_RANGE:
        raise ReplayRangeError(f"{end - start} is longer than {MAX_RANGE.days} days; replay it in several runs")
    hour = start.replace(minute=0, second=0, microsecond=0)
    hours = []
    while hour < end:
        hours.append(hour_key(hour))
        hour += timedelta(hours=1)
    return hours


def envelopes_from_archive(table: pa.Table, skipped: list[str] | None = None) -> list[Envelope]:
    """Archive rows back into envelopes (the payload column is JSON text); a row that is no longer a
    valid envelope is reported in `skipped` (raised without it) instead of stopping the others."""
    envelopes = []
    for row in table.to_pylist():
        try:
            envelopes.append(
                Envelope(
                    schema_version=row["schema_version"],
                    event_id=row["event_id"],
                    idempotency_key=row["idempotency_key"],
                    event_type=row["event_type"],
                    source=row["source"],
                    site_id=row["site_id"],
                    device_id=row["device_id"],
                    timestamp=row["timestamp"],
                    received_at=row["received_at"],
                    payload=json.loads(row["payload"]) if row["payload"] else {},
                )
            )
        except Exception as exc:  # noqa: BLE001 - this row's fate alone
            if skipped is None:
                raise
            skipped.append(
                f"{row.get('site_id')}/{row.get('event_id')}: unreadable archive row ({type(exc).__name__}: {str(exc)[:200]})"
            )
    return envelopes


@dataclass
class RangeReplay:
    partner: str
    start: datetime
    end: datetime
    contract_version: str = ""  # the contract every queued body was made under
    hours: int = 0
    events_in_range: int = 0
    sent: int = 0
    by_event_type: dict[str, int] = field(default_factory=dict)
    # Events that could not be queued for a reason of their own ("site/event_id: reason"), skipped
    # so that one of them cannot stop the range.
    skipped: list[str] = field(default_factory=list)


def subscribed_in_range(
    table: pa.Table, partner: PartnerConfig, start: datetime, end: datetime
) -> tuple[int, pa.Table]:
    """(rows of the archive hour in [start, end), those of them the partner subscribes to)."""
    if not table.num_rows:
        return 0, table
    ts = table.column("timestamp")
    in_range = table.filter(
        pc.and_(pc.greater_equal(ts, pa.scalar(start, ts.type)), pc.less(ts, pa.scalar(end, ts.type)))
    )
    return in_range.num_rows, in_range.filter(
        pc.is_in(in_range.column("event_type"), pa.array(sorted(partner.subscriptions), pa.string()))
    )


def replay_messages(
    table: pa.Table, partner: PartnerConfig, limits: QueueLimits, refused: list[Refused], skipped: list[str]
) -> list[Outgoing[Envelope]]:
    """The partner queue messages for archive rows, made exactly as the drain makes them (same transform,
    same message shape, the partner's current contract version)."""
    return partner_shares(RoutingConfig(partners=(partner,)), envelopes_from_archive(table, skipped), limits, refused)[
        partner.name
    ]


def replay_range_to_partner(
    filesystem: fs.FileSystem,
    bucket: str,
    sqs,
    partner: PartnerConfig,
    partner_queue_url: str,
    start: datetime,
    end: datetime,
    history: ContractHistory | None = None,
) -> RangeReplay:
    """Put every archived event of [start, end) that `partner` subscribes to on its queue, transformed now.

    Hour by hour, so memory holds one archive hour at a time; returns once SQS accepted every message
    (a run that dies half-way can simply be run again: the partner de-duplicates by webhook-id). An
    event whose transform fails, whose body is too big, or that SQS refuses for its content is
    skipped and reported, as the drain would quarantine it. With a contract `history`, the contract is
    recorded there before the first message is queued.
    """
    hours = hours_in_range(start, end)
    limits = QueueLimits.from_stack()
    report = RangeReplay(partner.name, start, end, contract_version=partner.contract_version)
    if history is not None:
        history.record(partner.name, partner.contract)
    log.info(
        "replay to %s under contract %s: %d hours from %s",
        partner.name,
        report.contract_version,
        len(hours),
        start.isoformat(),
    )
    for hour in hours:
        table = read_archive_hour(filesystem, bucket, hour)
        report.hours += 1
        in_range, subscribed = subscribed_in_range(table, partner, start, end)
        report.events_in_range += in_range
        if not subscribed.num_rows:
            continue
        refused: list[Refused] = []
        messages = replay_messages(subscribed, partner, limits, refused, report.skipped)
        refusals: list = []
        send_all(sqs, {partner_queue_url: messages}, limits, refusals)
        skipped = [(r.event, f"{r.reason} ({r.error_type}): {r.detail}") for r in refused] + [
            (event, f"refused_by_sqs ({code}): {text}") for event, code, text in refusals
        ]
        for event, why in skipped:
            report.skipped.append(f"{event.dedupe_id}: {why}")
            log.warning("replay to %s: skipped %s: %s", partner.name, event.dedupe_id, why)
        refused_ids = {id(event) for event, _ in skipped}
        for item in messages:
            if id(item.tag) not in refused_ids:
                report.by_event_type[item.tag.event_type] = report.by_event_type.get(item.tag.event_type, 0) + 1
                report.sent += 1
        log.info(
            "replay to %s: hour %s, %d of %d events sent", partner.name, hour, len(messages) - len(refusals), in_range
        )
    return report
