"""The priority consumer's store: events, incidents, device status, rejected messages — one interface, two
databases.

`ConsumerStore` holds what handling an event means (which events are new, the device status they leave,
the incidents they open) and the dedupe rule; `DuckDBStore` (`duckdb_store.py`, one file, one consumer
process: the demo and the tests) and `PostgresStore` (`postgres_store.py`, one server, any number of
consumer replicas: production) only say how rows reach their database. `open_store` picks one from a
location: a `postgresql://` URL, or a DuckDB file path.

Each batch is one transaction whose events insert skips events already present (`ON CONFLICT DO
NOTHING` against the `(site_id, event_id)` primary key) and returns what it added, which makes handling
idempotent: SQS may deliver an event twice, a drain run may route it twice, two replicas may hold two
copies at once; the database lets exactly one transaction insert it, and only that one opens its incident
and calls its automation. An event's identity is `(site_id, event_id)` (`Envelope.key`): a site's
publisher chooses its ids, so an id alone would let one site's events pass for another's duplicates.
"""

from __future__ import annotations

import json
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from edge_bridge.envelope import Envelope
from pipeline.routing.config import AutomationConfig

RETRYING = "retrying"  # the start of an incident's webhook_status between two attempts of its webhook

# The reasons the consumer itself gives, beside the envelope's (`edge_bridge.envelope.REJECTION_REASONS`)
# and the claim check's (`bad_claim_check`, `claim_check_mismatch`).
REJECTED_REASONS = {
    "handling_failed": "the event's own transaction failed (the detail and error_type name the exception)",
}
REJECTED_BODY_CHARS = 100_000


_TS = pa.timestamp("us", tz="UTC")
EVENT_COLUMNS = pa.schema(
    [
        ("event_id", pa.string()),
        ("event_type", pa.string()),
        ("source", pa.string()),
        ("site_id", pa.string()),
        ("device_id", pa.string()),
        ("event_time", _TS),
        ("payload", pa.string()),
        ("priority", pa.string()),
        ("enqueued_at", _TS),
        ("handled_at", _TS),
        ("latency_ms", pa.float64()),
    ]
)
STATUS_COLUMNS = pa.schema(
    [
        ("site_id", pa.string()),
        ("device_id", pa.string()),
        ("last_seen", _TS),
        ("last_event_type", pa.string()),
        ("state", pa.string()),
    ]
)
EXPORTED_KEYS = pa.schema([("site_id", pa.string()), ("event_id", pa.string())])
INCIDENT_COLUMNS = pa.schema(
    [
        ("incident_id", pa.string()),
        ("event_id", pa.string()),
        ("event_type", pa.string()),
        ("site_id", pa.string()),
        ("device_id", pa.string()),
        ("opened_at", _TS),
        ("webhook_status", pa.string()),
    ]
)
INCIDENT_FIELDS = ("incident_id", "event_id", "event_type", "site_id", "device_id", "opened_at")
EXPORT_FIELDS = ("event_id", "event_type", "site_id", "priority", "enqueued_at", "handled_at", "latency_ms")


@dataclass(frozen=True)
class Item:
    """One received message: the event (or why it is not one), where it came from, and when SQS got it."""

    priority: str
    receipt_handle: str
    enqueued_at: datetime
    event: Envelope | None
    body: str
    reject_reason: str | None = None
    error_type: str | None = None
    message_id: str = ""
    receive_count: int = 0


@dataclass
class BatchResult:
    handled: list[tuple[Item, float]] = field(default_factory=list)  # (item, latency_ms)
    duplicates: int = 0
    rejected: int = 0
    new_incidents: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class BatchStatements:
    """A database's statements for one batch, each fed the rows of its schema by `ConsumerStore._insert`."""

    events: str  # insert, skipping present (site_id, event_id); returns the keys it added
    device_status: str  # upsert; an older event never overwrites a newer one
    incidents: str


def device_state(event: Envelope) -> str:
    for key in ("state", "status", "result"):
        if isinstance(event.payload.get(key), (str, int, float, bool)):
            return str(event.payload[key])
    return event.event_type


class ConsumerStore(ABC):
    """What the consumer's writer needs from its database. Only the writer thread of a consumer uses it."""

    automation: AutomationConfig
    statements: BatchStatements

    def handle_batch(self, items: list[Item]) -> BatchResult:
        """Insert, automate and update status for every new event of `items`, in one transaction.

        The events insert itself is the duplicate check (the primary key skips what is present and
        returns what it added), so a batch costs one indexed statement instead of a lookup and an insert.
        Rows go in key order, so two replicas' transactions always lock shared keys in the same order.
        """
        result = BatchResult()
        now = datetime.now(UTC)
        bad = [i for i in items if i.event is None]
        fresh: dict[tuple[str, str], Item] = {}
        for item in items:
            if item.event is None:
                continue
            if item.event.key in fresh:
                result.duplicates += 1
            else:
                fresh[item.event.key] = item
        fresh = dict(sorted(fresh.items()))
        with self._transaction():
            if bad:
                self._insert_rejected(now, [(i, i.reject_reason, i.error_type) for i in bad])
                result.rejected = len(bad)
            handled_at = datetime.now(UTC)
            rows, latencies = [], {}
            for key, item in fresh.items():
                e = item.event
                latencies[key] = max((handled_at - item.enqueued_at).total_seconds() * 1000, 0.0)
                rows.append(
                    (
                        e.event_id,
                        e.event_type,
                        e.source,
                        e.site_id,
                        e.device_id,
                        e.timestamp,
                        json.dumps(e.payload),
                        item.priority,
                        item.enqueued_at,
                        handled_at,
                        latencies[key],
                    )
                )
            inserted: set[tuple[str, str]] = set()
            if rows:
                inserted = set(self._insert(self.statements.events, EVENT_COLUMNS, rows))
            result.duplicates += len(fresh) - len(inserted)
            statuses, incidents = {}, []
            for key, item in fresh.items():
                if key not in inserted:
                    continue
                e = item.event
                result.handled.append((item, latencies[key]))
                device = (e.site_id, e.device_id)
                if device not in statuses or statuses[device][0] <= e.timestamp:
                    statuses[device] = (e.timestamp, e.event_type, device_state(e))
                rule = self.automation.rule_for(e.event_type)
                if rule and rule.incident:
                    status = None if rule.webhook_env and os.environ.get(rule.webhook_env) else "not_configured"
                    incident = {
                        "incident_id": str(uuid.uuid4()),
                        "event_id": e.event_id,
                        "event_type": e.event_type,
                        "site_id": e.site_id,
                        "device_id": e.device_id,
                        "opened_at": handled_at,
                        "webhook_status": status,
                    }
                    incidents.append(incident)
            if statuses:
                self._insert(
                    self.statements.device_status,
                    STATUS_COLUMNS,
                    [(s, d, ts, t, st) for (s, d), (ts, t, st) in sorted(statuses.items())],
                )
            if incidents:
                self._insert(
                    self.statements.incidents,
                    INCIDENT_COLUMNS,
                    [tuple(i[c] for c in INCIDENT_COLUMNS.names) for i in incidents],
                )
        result.new_incidents = incidents
        return result

    def reject(self, entries: list[tuple[Item, str, str]]) -> None:
        """Keep messages the consumer will not handle, each with (reason, error_type), in one transaction."""
        with self._transaction():
            self._insert_rejected(datetime.now(UTC), entries)

    def _insert(self, sql: str, schema: pa.Schema, rows: list[tuple]) -> list[tuple]:
        """Every batch statement of `handle_batch` passes here: one statement for all of a batch's rows."""
        return self._insert_rows(sql, schema, rows)

    @staticmethod
    def _rejected_rows(now: datetime, entries: list[tuple[Item, str | None, str | None]]) -> list[tuple]:
        return [
            (
                now,
                i.priority,
                (reason or "")[:2000],
                i.body[:REJECTED_BODY_CHARS],
                error_type,
                i.message_id,
                i.receive_count,
            )
            for i, reason, error_type in entries
        ]

    # -- what each database implements -----------------------------------------------------------------

    @abstractmethod
    def _transaction(self) -> AbstractContextManager:
        """Commit when the block ends, roll back if it raises."""

    @abstractmethod
    def _insert_rows(self, sql: str, schema: pa.Schema, rows: list[tuple]) -> list[tuple]:
        """Run one of `statements` over `rows` (columns as in `schema`); what it returns."""

    @abstractmethod
    def _insert_rejected(self, now: datetime, entries: list[tuple[Item, str | None, str | None]]) -> None: ...

    @abstractmethod
    def set_webhook_statuses(self, statuses: list[tuple[str, str]]) -> None:
        """Record (incident_id, webhook_status) pairs."""

    @abstractmethod
    def orphaned_webhooks(self) -> list[dict]:
        """Incidents whose webhook no running consumer is seeing to (never tried, or between two attempts),
        now this consumer's to call. Asked at start and then from time to time."""

    @abstractmethod
    def export(self, write: Callable[[list[dict]], None], limit: int = 50_000) -> int:
        """Hand up to `limit` handled rows not yet exported to `write`, and mark them once it returned.

        If `write` raises, nothing is marked and the rows are offered again next time. Returns the count.
        """

    @abstractmethod
    def close(self) -> None: ...


def open_store(location: str | Path, automation: AutomationConfig) -> ConsumerStore:
    """The store at `location`: a `postgresql://` (or `postgres://`) URL, or a DuckDB file path."""
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        from pipeline.consumers.postgres_store import PostgresStore

        return PostgresStore(text, automation)
    from pipeline.consumers.duckdb_store import DuckDBStore

    return DuckDBStore(text, automation)


def incident_dicts(rows: Iterator[tuple] | list[tuple]) -> list[dict]:
    return [dict(zip(INCIDENT_FIELDS, r)) for r in rows]


def export_dicts(rows: Iterator[tuple] | list[tuple]) -> list[dict]:
    return [dict(zip(EXPORT_FIELDS, r)) for r in rows]
