"""The consumer store in an embedded DuckDB file: the default, for the demo, the tests and a single consumer.

DuckDB allows one writing process, so only one consumer opens the file, from one thread; every
incident it finds unsettled at open is therefore its own to resume. A file written before the identity
included the site (events keyed by event_id alone) is migrated when it is opened: its rows are kept and
its keys widened, in one transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from pipeline.consumers.store import (
    EXPORTED_KEYS,
    RETRYING,
    BatchStatements,
    ConsumerStore,
    Item,
    export_dicts,
    incident_dicts,
)
from pipeline.routing.config import AutomationConfig

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

STATEMENTS = BatchStatements(
    events="""INSERT INTO events (event_id, event_type, source, site_id, device_id, event_time, payload, priority, enqueued_at, handled_at, latency_ms)
              SELECT * FROM batch ON CONFLICT DO NOTHING RETURNING site_id, event_id""",
    device_status="""INSERT INTO device_status SELECT * FROM batch
                     ON CONFLICT (site_id, device_id) DO UPDATE SET
                       last_seen = excluded.last_seen, last_event_type = excluded.last_event_type, state = excluded.state
                     WHERE excluded.last_seen >= device_status.last_seen""",
    incidents="INSERT INTO incidents SELECT * FROM batch",
)


class DuckDBStore(ConsumerStore):
    statements = STATEMENTS

    def __init__(self, path: str | Path, automation: AutomationConfig) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(str(path))
        self._migrate()
        self.con.execute(SCHEMA)
        self.automation = automation
        self._resumed = False

    def _migrate(self) -> None:
        """Widen the keys of a file from before `(site_id, event_id)`; DuckDB cannot alter a primary key."""
        pk = self.con.execute(
            "SELECT constraint_column_names FROM duckdb_constraints() WHERE table_name = 'events' AND constraint_type = 'PRIMARY KEY'"
        ).fetchall()
        if pk == [(["event_id"],)]:
            with self._transaction():
                self.con.execute("ALTER TABLE events RENAME TO events_keyed_by_event_id")
                self.con.execute("ALTER TABLE incidents RENAME TO incidents_keyed_by_event_id")
                self.con.execute(SCHEMA)
                self.con.execute("INSERT INTO events BY NAME SELECT * FROM events_keyed_by_event_id")
                self.con.execute("INSERT INTO incidents BY NAME SELECT * FROM incidents_keyed_by_event_id")
                self.con.execute("DROP TABLE events_keyed_by_event_id")
                self.con.execute("DROP TABLE incidents_keyed_by_event_id")
        self.con.execute(SCHEMA)
        for column, kind in (("error_type", "VARCHAR"), ("message_id", "VARCHAR"), ("receive_count", "INTEGER")):
            self.con.execute(f"ALTER TABLE rejected ADD COLUMN IF NOT EXISTS {column} {kind}")

    def close(self) -> None:
        self.con.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    def _insert_rows(self, sql: str, schema: pa.Schema, rows: list[tuple]) -> list[tuple]:
        """One statement per batch from an Arrow table: DuckDB's executemany costs a round per row."""
        batch = pa.Table.from_pylist([dict(zip(schema.names, r)) for r in rows], schema=schema)
        self.con.register("batch", batch)
        try:
            return self.con.execute(sql).fetchall()
        finally:
            self.con.unregister("batch")

    def _insert_rejected(self, now: datetime, entries: list[tuple[Item, str | None, str | None]]) -> None:
        self.con.executemany(
            "INSERT INTO rejected (received_at, priority, reason, body, error_type, message_id, receive_count) VALUES (?, ?, ?, ?, ?, ?, ?)",
            self._rejected_rows(now, entries),
        )

    def set_webhook_statuses(self, statuses: list[tuple[str, str]]) -> None:
        with self._transaction():
            self.con.executemany(
                "UPDATE incidents SET webhook_status = ? WHERE incident_id = ?",
                [(status[:500], incident_id) for incident_id, status in statuses],
            )

    def pending_webhooks(self) -> list[dict]:
        """Incidents whose automation webhook is not settled: never tried, or between two attempts."""
        return incident_dicts(
            self.con.execute(
                "SELECT incident_id, event_id, event_type, site_id, device_id, opened_at FROM incidents WHERE webhook_status IS NULL OR starts_with(webhook_status, ?)",
                [RETRYING],
            ).fetchall()
        )

    def orphaned_webhooks(self) -> list[dict]:
        """At open, every unsettled incident (no other process can have the file); after that, none."""
        if self._resumed:
            return []
        self._resumed = True
        return self.pending_webhooks()

    def unexported(self, limit: int = 50_000) -> list[dict]:
        return export_dicts(
            self.con.execute(
                "SELECT event_id, event_type, site_id, priority, enqueued_at, handled_at, latency_ms FROM events WHERE NOT exported ORDER BY handled_at LIMIT ?",
                [limit],
            ).fetchall()
        )

    def mark_exported(self, keys: list[tuple[str, str]]) -> None:
        """Flag exported rows by `(site_id, event_id)`."""
        if keys:
            self._insert_rows(
                "UPDATE events SET exported = true FROM batch WHERE events.site_id = batch.site_id AND events.event_id = batch.event_id",
                EXPORTED_KEYS,
                keys,
            )

    def export(self, write: Callable[[list[dict]], None], limit: int = 50_000) -> int:
        rows = self.unexported(limit)
        if rows:
            write(rows)
            self.mark_exported([(r["site_id"], r["event_id"]) for r in rows])
        return len(rows)
