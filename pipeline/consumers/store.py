"""The priority consumer's database (DuckDB): events, incidents, device status, handling log.

DuckDB allows one writing process, so only the consumer service opens it, from one thread. Each
batch is one transaction that first drops event_ids already present, which makes handling
idempotent: SQS may deliver an event twice (or a drain run may route it twice), its side effects
happen once.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa

from edge_bridge.envelope import Envelope
from pipeline.routing.config import AutomationConfig

RETRYING = "retrying"  # the start of an incident's webhook_status between two attempts of its webhook

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id VARCHAR PRIMARY KEY,
    event_type VARCHAR, source VARCHAR, site_id VARCHAR, device_id VARCHAR,
    event_time TIMESTAMPTZ, payload JSON,
    priority VARCHAR, enqueued_at TIMESTAMPTZ, handled_at TIMESTAMPTZ, latency_ms DOUBLE,
    exported BOOLEAN DEFAULT false
);
CREATE TABLE IF NOT EXISTS incidents (
    incident_id VARCHAR PRIMARY KEY, event_id VARCHAR UNIQUE, event_type VARCHAR,
    site_id VARCHAR, device_id VARCHAR, opened_at TIMESTAMPTZ,
    webhook_status VARCHAR  -- null: no webhook yet; 'retrying (attempt n): …' | 'delivered' | 'failed …' | 'not_configured'
);
CREATE TABLE IF NOT EXISTS device_status (
    site_id VARCHAR, device_id VARCHAR, last_seen TIMESTAMPTZ, last_event_type VARCHAR, state VARCHAR,
    PRIMARY KEY (site_id, device_id)
);
CREATE TABLE IF NOT EXISTS rejected (
    received_at TIMESTAMPTZ, priority VARCHAR, reason VARCHAR, body VARCHAR
);
"""


_TS = pa.timestamp("us", tz="UTC")
EVENT_COLUMNS = pa.schema(
    [("event_id", pa.string()), ("event_type", pa.string()), ("source", pa.string()), ("site_id", pa.string()), ("device_id", pa.string()),
     ("event_time", _TS), ("payload", pa.string()), ("priority", pa.string()), ("enqueued_at", _TS), ("handled_at", _TS), ("latency_ms", pa.float64())]
)
STATUS_COLUMNS = pa.schema([("site_id", pa.string()), ("device_id", pa.string()), ("last_seen", _TS), ("last_event_type", pa.string()), ("state", pa.string())])
INCIDENT_COLUMNS = pa.schema(
    [("incident_id", pa.string()), ("event_id", pa.string()), ("event_type", pa.string()), ("site_id", pa.string()), ("device_id", pa.string()), ("opened_at", _TS), ("webhook_status", pa.string())]
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
        self.con.execute(SCHEMA)
        self.automation = automation

    def close(self) -> None:
        self.con.close()

    def handle_batch(self, items: list[Item]) -> BatchResult:
        """Insert, automate and update status for every new event of `items`, in one transaction."""
        result = BatchResult()
        now = datetime.now(timezone.utc)
        good = [i for i in items if i.event is not None]
        bad = [i for i in items if i.event is None]
        con = self.con
        con.execute("BEGIN TRANSACTION")
        try:
            if bad:
                con.executemany("INSERT INTO rejected VALUES (?, ?, ?, ?)", [(now, i.priority, i.reject_reason, i.body[:100_000]) for i in bad])
                result.rejected = len(bad)
            ids = list({i.event.event_id for i in good})
            seen = set()
            if ids:
                seen = {r[0] for r in con.execute("SELECT event_id FROM events WHERE event_id IN (SELECT unnest(?))", [ids]).fetchall()}
            fresh: dict[str, Item] = {}
            for item in good:
                if item.event.event_id in seen or item.event.event_id in fresh:
                    result.duplicates += 1
                else:
                    fresh[item.event.event_id] = item
            handled_at = datetime.now(timezone.utc)
            rows, statuses, incidents = [], {}, []
            for item in fresh.values():
                e = item.event
                latency = max((handled_at - item.enqueued_at).total_seconds() * 1000, 0.0)
                rows.append((e.event_id, e.event_type, e.source, e.site_id, e.device_id, e.timestamp, json.dumps(e.payload), item.priority, item.enqueued_at, handled_at, latency))
                result.handled.append((item, latency))
                key = (e.site_id, e.device_id)
                if key not in statuses or statuses[key][0] <= e.timestamp:
                    statuses[key] = (e.timestamp, e.event_type, device_state(e))
                rule = self.automation.rule_for(e.event_type)
                if rule and rule.incident:
                    status = None if rule.webhook_env and os.environ.get(rule.webhook_env) else "not_configured"
                    incident = {"incident_id": str(uuid.uuid4()), "event_id": e.event_id, "event_type": e.event_type, "site_id": e.site_id, "device_id": e.device_id, "opened_at": handled_at, "webhook_status": status}
                    incidents.append(incident)
            if rows:
                self._insert(
                    "INSERT INTO events (event_id, event_type, source, site_id, device_id, event_time, payload, priority, enqueued_at, handled_at, latency_ms) SELECT * FROM batch",
                    EVENT_COLUMNS,
                    rows,
                )
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

    def _insert(self, sql: str, schema: pa.Schema, rows: list[tuple]) -> None:
        """One statement per batch from an Arrow table: DuckDB's executemany costs a round per row."""
        batch = pa.Table.from_pylist([dict(zip(schema.names, r)) for r in rows], schema=schema)
        self.con.register("batch", batch)
        try:
            self.con.execute(sql)
        finally:
            self.con.unregister("batch")

    def set_webhook_statuses(self, statuses: list[tuple[str, str]]) -> None:
        self.con.execute("BEGIN TRANSACTION")
        self.con.executemany("UPDATE incidents SET webhook_status = ? WHERE incident_id = ?", [(status[:500], incident_id) for incident_id, status in statuses])
        self.con.execute("COMMIT")

    def pending_webhooks(self) -> list[dict]:
        """Incidents whose automation webhook is not settled: never tried, or between two attempts."""
        rows = self.con.execute(
            "SELECT incident_id, event_id, event_type, site_id, device_id, opened_at FROM incidents WHERE webhook_status IS NULL OR starts_with(webhook_status, ?)",
            [RETRYING],
        ).fetchall()
        return [dict(zip(("incident_id", "event_id", "event_type", "site_id", "device_id", "opened_at"), r)) for r in rows]

    def unexported(self, limit: int = 50_000) -> list[dict]:
        rows = self.con.execute(
            "SELECT event_id, event_type, site_id, priority, enqueued_at, handled_at, latency_ms FROM events WHERE NOT exported ORDER BY handled_at LIMIT ?", [limit]
        ).fetchall()
        return [dict(zip(("event_id", "event_type", "site_id", "priority", "enqueued_at", "handled_at", "latency_ms"), r)) for r in rows]

    def mark_exported(self, event_ids: list[str]) -> None:
        if event_ids:
            self.con.execute("UPDATE events SET exported = true WHERE event_id IN (SELECT unnest(?))", [event_ids])
