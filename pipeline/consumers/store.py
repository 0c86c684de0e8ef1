"""The priority consumer's database (DuckDB): events, incidents, device status, rejected messages.

DuckDB allows one writing process, so only the consumer service opens it, from one thread. Each
batch is one transaction whose insert skips events already present, which makes handling
idempotent: SQS may deliver an event twice (or a drain run may route it twice), its side effects
happen once. An event's identity is `(site_id, event_id)` (`Envelope.key`): a site's publisher chooses
its ids, so an id alone would let one site's events pass for another's duplicates.

A file written before the identity included the site (events keyed by event_id alone) is migrated
when it is opened: its rows are kept and its keys widened, in one transaction.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from edge_bridge.envelope import Envelope
from pipeline.routing.config import AutomationConfig

RETRYING = "retrying"  # the start of an incident's webhook_status between two attempts of its webhook

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id VARCHAR NOT NULL,
    event_type VARCHAR, source VARCHAR, site_id VARCHAR NOT NULL, device_id VARCHAR,
    event_time TIMESTAMPTZ, payload JSON,
    priority VARCHAR, enqueued_at TIMESTAMPTZ, handled_at TIMESTAMPTZ, latency_ms DOUBLE,
    exported BOOLEAN DEFAULT false,
    PRIMARY KEY (site_id, event_id)
);
CREATE TABLE IF NOT EXISTS incidents (
    incident_id VARCHAR PRIMARY KEY, event_id VARCHAR, event_type VARCHAR,
    site_id VARCHAR, device_id VARCHAR, opened_at TIMESTAMPTZ,
    webhook_status VARCHAR,  -- null: no webhook yet; 'retrying (attempt n): …' | 'delivered' | 'failed …' | 'not_configured'
    UNIQUE (site_id, event_id)
);
CREATE TABLE IF NOT EXISTS device_status (
    site_id VARCHAR, device_id VARCHAR, last_seen TIMESTAMPTZ, last_event_type VARCHAR, state VARCHAR,
    PRIMARY KEY (site_id, device_id)
);
CREATE TABLE IF NOT EXISTS rejected (
    received_at TIMESTAMPTZ, priority VARCHAR,
    reason VARCHAR,  -- '<stable reason>: <detail>'; the reasons are REJECTED_REASONS and the envelope's
    body VARCHAR,  -- the SQS body (a claim-check pointer stays a pointer), cut at REJECTED_BODY_CHARS
    error_type VARCHAR, message_id VARCHAR, receive_count INTEGER
);
"""

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


def device_state(event: Envelope) -> str:
    for key in ("state", "status", "result"):
        if isinstance(event.payload.get(key), (str, int, float, bool)):
            return str(event.payload[key])
    return event.event_type


class ConsumerStore:
    def __init__(self, path: str | Path, automation: AutomationConfig) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(str(path))
        self._migrate()
        self.con.execute(SCHEMA)
        self.automation = automation

    def _migrate(self) -> None:
        """Widen the keys of a file from before `(site_id, event_id)`; DuckDB cannot alter a primary key."""
        pk = self.con.execute(
            "SELECT constraint_column_names FROM duckdb_constraints() WHERE table_name = 'events' AND constraint_type = 'PRIMARY KEY'"
        ).fetchall()
        if pk == [(["event_id"],)]:
            self.con.execute("BEGIN TRANSACTION")
            try:
                self.con.execute("ALTER TABLE events RENAME TO events_keyed_by_event_id")
                self.con.execute("ALTER TABLE incidents RENAME TO incidents_keyed_by_event_id")
                self.con.execute(SCHEMA)
                self.con.execute("INSERT INTO events BY NAME SELECT * FROM events_keyed_by_event_id")
                self.con.execute("INSERT INTO incidents BY NAME SELECT * FROM incidents_keyed_by_event_id")
                self.con.execute("DROP TABLE events_keyed_by_event_id")
                self.con.execute("DROP TABLE incidents_keyed_by_event_id")
                self.con.execute("COMMIT")
            except Exception:
                self.con.execute("ROLLBACK")
                raise
        self.con.execute(SCHEMA)
        for column, kind in (("error_type", "VARCHAR"), ("message_id", "VARCHAR"), ("receive_count", "INTEGER")):
            self.con.execute(f"ALTER TABLE rejected ADD COLUMN IF NOT EXISTS {column} {kind}")

    def close(self) -> None:
        self.con.close()

    def handle_batch(self, items: list[Item]) -> BatchResult:
        """Insert, automate and update status for every new event of `items`, in one transaction.

        The events insert itself is the duplicate check (the primary key skips what is present and
        returns what it added), so a batch costs one indexed statement instead of a lookup and an insert.
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
        con = self.con
        con.execute("BEGIN TRANSACTION")
        try:
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
                inserted = set(
                    self._insert(
                        """INSERT INTO events (event_id, event_type, source, site_id, device_id, event_time, payload, priority, enqueued_at, handled_at, latency_ms)
                           SELECT * FROM batch ON CONFLICT DO NOTHING RETURNING site_id, event_id""",
                        EVENT_COLUMNS,
                        rows,
                    )
                )
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
                    """INSERT INTO device_status SELECT * FROM batch
                       ON CONFLICT (site_id, device_id) DO UPDATE SET
                         last_seen = excluded.last_seen, last_event_type = excluded.last_event_type, state = excluded.state
                       WHERE excluded.last_seen >= device_status.last_seen""",
                    STATUS_COLUMNS,
                    [(s, d, ts, t, st) for (s, d), (ts, t, st) in statuses.items()],
                )
            if incidents:
                self._insert(
                    "INSERT INTO incidents SELECT * FROM batch",
                    INCIDENT_COLUMNS,
                    [tuple(i[c] for c in INCIDENT_COLUMNS.names) for i in incidents],
                )
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        result.new_incidents = incidents
        return result

    def reject(self, entries: list[tuple[Item, str, str]]) -> None:
        """Keep messages the consumer will not handle, each with (reason, error_type), in one transaction."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            self._insert_rejected(datetime.now(UTC), entries)
            self.con.execute("COMMIT")
        except Exception:
            self.con.execute("ROLLBACK")
            raise

    def _insert_rejected(self, now: datetime, entries: list[tuple[Item, str | None, str | None]]) -> None:
        self.con.executemany(
            "INSERT INTO rejected (received_at, priority, reason, body, error_type, message_id, receive_count) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
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
            ],
        )

    def _insert(self, sql: str, schema: pa.Schema, rows: list[tuple]) -> list[tuple]:
        """One statement per batch from an Arrow table: DuckDB's executemany costs a round per row."""
        batch = pa.Table.from_pylist([dict(zip(schema.names, r)) for r in rows], schema=schema)
        self.con.register("batch", batch)
        try:
            return self.con.execute(sql).fetchall()
        finally:
            self.con.unregister("batch")

    def set_webhook_statuses(self, statuses: list[tuple[str, str]]) -> None:
        self.con.execute("BEGIN TRANSACTION")
        try:
            self.con.executemany(
                "UPDATE incidents SET webhook_status = ? WHERE incident_id = ?",
                [(status[:500], incident_id) for incident_id, status in statuses],
            )
            self.con.execute("COMMIT")
        except Exception:
            self.con.execute("ROLLBACK")
            raise

    def pending_webhooks(self) -> list[dict]:
        """Incidents whose automation webhook is not settled: never tried, or between two attempts."""
        rows = self.con.execute(
            "SELECT incident_id, event_id, event_type, site_id, device_id, opened_at FROM incidents WHERE webhook_status IS NULL OR starts_with(webhook_status, ?)",
            [RETRYING],
        ).fetchall()
        return [
            dict(zip(("incident_id", "event_id", "event_type", "site_id", "device_id", "opened_at"), r)) for r in rows
        ]

    def unexported(self, limit: int = 50_000) -> list[dict]:
        rows = self.con.execute(
            "SELECT event_id, event_type, site_id, priority, enqueued_at, handled_at, latency_ms FROM events WHERE NOT exported ORDER BY handled_at LIMIT ?",
            [limit],
        ).fetchall()
        return [
            dict(zip(("event_id", "event_type", "site_id", "priority", "enqueued_at", "handled_at", "latency_ms"), r))
            for r in rows
        ]

    def mark_exported(self, keys: list[tuple[str, str]]) -> None:
        """Flag exported rows by `(site_id, event_id)`."""
        if keys:
            self._insert(
                "UPDATE events SET exported = true FROM batch WHERE events.site_id = batch.site_id AND events.event_id = batch.event_id",
                EXPORTED_KEYS,
                keys,
            )
