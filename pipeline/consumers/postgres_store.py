"""The consumer store on a PostgreSQL server: any number of consumer replicas, each event handled once.

Exactly-once is the database's: the events primary key `(site_id, event_id)` and `INSERT ... ON CONFLICT
DO NOTHING RETURNING` let one transaction insert an event; a second replica holding a copy waits on the
first one's uncommitted row and then finds it present (or inserts it, if the first rolled back or died).
Only the inserting transaction opens the event's incident, so its automation webhook is called by one
replica. Each batch is one statement per table over arrays (`unnest`), in key order, so two replicas'
batches lock shared keys in the same order and never deadlock.

Incidents carry the replica that owns their webhook. A replica holds a session advisory lock named
after itself for as long as its connection lives; when the lock can be taken, the replica is gone (a
`kill -9` closes its connection at once), and the first replica to take it moves the dead one's unsettled
incidents to itself in one UPDATE and calls their webhooks (webhook-id = incident id, so a receiver that
already had one de-duplicates it).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

import psycopg
import pyarrow as pa
from psycopg import sql

from pipeline.consumers.store import (
    INCIDENT_COLUMNS,
    RETRYING,
    BatchStatements,
    ConsumerStore,
    Item,
    export_dicts,
    incident_dicts,
)
from pipeline.routing.config import AutomationConfig

log = logging.getLogger(__name__)

LOCK_SPACE = 0x70636F6E  # the first key of this store's advisory locks ("pcon"); the second names a replica

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id text NOT NULL,
    event_type text, source text, site_id text NOT NULL, device_id text,
    event_time timestamptz, payload json,
    priority text, enqueued_at timestamptz, handled_at timestamptz, latency_ms double precision,
    exported boolean NOT NULL DEFAULT false,
    PRIMARY KEY (site_id, event_id)
);
CREATE INDEX IF NOT EXISTS events_not_exported ON events (handled_at) WHERE NOT exported;
CREATE TABLE IF NOT EXISTS incidents (
    incident_id text PRIMARY KEY, event_id text, event_type text,
    site_id text, device_id text, opened_at timestamptz,
    webhook_status text,  -- null: no webhook yet; 'retrying (attempt n): …' | 'delivered' | 'failed …' | 'not_configured'
    owner text,  -- the replica seeing to the webhook
    UNIQUE (site_id, event_id)
);
CREATE INDEX IF NOT EXISTS incidents_unsettled ON incidents (owner)
    WHERE webhook_status IS NULL OR webhook_status LIKE 'retrying%';
CREATE TABLE IF NOT EXISTS device_status (
    site_id text, device_id text, last_seen timestamptz, last_event_type text, state text,
    PRIMARY KEY (site_id, device_id)
);
CREATE TABLE IF NOT EXISTS rejected (
    received_at timestamptz, priority text,
    reason text,  -- '<stable reason>: <detail>'
    body text,  -- the SQS body (a claim-check pointer stays a pointer), cut at REJECTED_BODY_CHARS
    error_type text, message_id text, receive_count integer
);
"""

_ARRAY_TYPES = {pa.string(): "text[]", pa.float64(): "float8[]", pa.bool_(): "bool[]", pa.int64(): "int8[]"}


def _unnest(schema: pa.Schema) -> str:
    """`unnest(%s::text[], ...) AS batch(col, ...)`: a batch's rows as one parameter per column."""
    types = [_ARRAY_TYPES.get(f.type, "timestamptz[]" if pa.types.is_timestamp(f.type) else None) for f in schema]
    if None in types:
        raise TypeError(f"no PostgreSQL array type for {schema}")
    return f"unnest({', '.join(f'%s::{t}' for t in types)}) AS batch({', '.join(schema.names)})"


def _statements(owner: str) -> BatchStatements:
    from pipeline.consumers.store import EVENT_COLUMNS, STATUS_COLUMNS

    events = ", ".join(EVENT_COLUMNS.names)
    incidents = ", ".join(INCIDENT_COLUMNS.names)
    return BatchStatements(
        events=f"""INSERT INTO events ({events})
                   SELECT {events.replace("payload", "payload::json")} FROM {_unnest(EVENT_COLUMNS)}
                   ON CONFLICT DO NOTHING RETURNING site_id, event_id""",
        device_status=f"""INSERT INTO device_status AS current ({", ".join(STATUS_COLUMNS.names)})
                          SELECT * FROM {_unnest(STATUS_COLUMNS)}
                          ON CONFLICT (site_id, device_id) DO UPDATE SET
                            last_seen = excluded.last_seen, last_event_type = excluded.last_event_type,
                            state = excluded.state
                          WHERE excluded.last_seen >= current.last_seen""",
        incidents=sql.SQL("INSERT INTO incidents ({}, owner) SELECT {}, {} FROM {}")
        .format(sql.SQL(incidents), sql.SQL(incidents), sql.Literal(owner), sql.SQL(_unnest(INCIDENT_COLUMNS)))
        .as_string(None),
    )


def _text(value):
    """PostgreSQL text holds no NUL character; a rejected message's body or reason might."""
    return value.replace("\x00", "\\u0000") if isinstance(value, str) else value


class PostgresStore(ConsumerStore):
    def __init__(self, url: str, automation: AutomationConfig, connect_timeout_s: int = 10) -> None:
        self.url, self.automation, self.connect_timeout_s = url, automation, connect_timeout_s
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.statements = _statements(self.replica)
        self.con: psycopg.Connection | None = None
        self._connect()

    def _connect(self) -> psycopg.Connection:
        """A new session holding this replica's advisory lock, with the schema in place."""
        con = psycopg.connect(
            self.url, autocommit=True, connect_timeout=self.connect_timeout_s, application_name="priority-consumer"
        )
        try:
            with con.transaction():
                # Two replicas creating the same table at once collide in the catalog: one at a time.
                con.execute("SELECT pg_advisory_xact_lock(%s, 0)", [LOCK_SPACE])
                con.execute(SCHEMA)
            [(held,)] = con.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", [LOCK_SPACE, self.replica])
            if not held:
                raise RuntimeError(f"replica name {self.replica!r} is held by a live session")
        except BaseException:
            con.close()
            raise
        self.con = con
        return con

    def _session(self) -> psycopg.Connection:
        """The open session, or a new one after the server or the network dropped the old."""
        if self.con is None or self.con.closed or self.con.broken:
            if self.con is not None:
                log.warning("consumer store session lost; reconnecting as %s", self.replica)
                self.con.close()
            self._connect()
        return self.con

    def close(self) -> None:
        if self.con is not None:
            self.con.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._session().transaction():
            yield

    def _insert_rows(self, statement: str, schema: pa.Schema, rows: list[tuple]) -> list[tuple]:
        columns = [list(column) for column in zip(*rows)]
        cursor = self._session().execute(statement, columns)
        return [tuple(r) for r in cursor.fetchall()] if cursor.description else []

    def _insert_rejected(self, now: datetime, entries: list[tuple[Item, str | None, str | None]]) -> None:
        with self._session().cursor() as cursor:
            cursor.executemany(
                "INSERT INTO rejected (received_at, priority, reason, body, error_type, message_id, receive_count) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [tuple(_text(v) for v in row) for row in self._rejected_rows(now, entries)],
            )

    def set_webhook_statuses(self, statuses: list[tuple[str, str]]) -> None:
        with self._transaction(), self.con.cursor() as cursor:
            cursor.executemany(
                "UPDATE incidents SET webhook_status = %s WHERE incident_id = %s",
                [(_text(status[:500]), incident_id) for incident_id, status in statuses],
            )

    def orphaned_webhooks(self) -> list[dict]:
        con = self._session()
        owners = con.execute(
            "SELECT DISTINCT owner FROM incidents WHERE (webhook_status IS NULL OR webhook_status LIKE %s) AND owner IS DISTINCT FROM %s",
            [RETRYING + "%", self.replica],
        ).fetchall()
        taken: list[dict] = []
        for (owner,) in owners:
            if owner is not None:
                [(gone,)] = con.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", [LOCK_SPACE, owner])
                if not gone:
                    continue  # alive: its webhooks are its own
            try:
                rows = con.execute(
                    """UPDATE incidents SET owner = %s
                       WHERE owner IS NOT DISTINCT FROM %s AND (webhook_status IS NULL OR webhook_status LIKE %s)
                       RETURNING incident_id, event_id, event_type, site_id, device_id, opened_at""",
                    [self.replica, owner, RETRYING + "%"],
                ).fetchall()
            finally:
                if owner is not None:
                    con.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", [LOCK_SPACE, owner])
            if rows:
                log.warning(
                    "took over %d unsettled automation webhooks of consumer %s, which is gone", len(rows), owner
                )
            taken += incident_dicts(rows)
        return taken

    def export(self, write: Callable[[list[dict]], None], limit: int = 50_000) -> int:
        """Rows no other replica is exporting (SKIP LOCKED), locked until written and marked."""
        with self._transaction():
            rows = export_dicts(
                self.con.execute(
                    """SELECT event_id, event_type, site_id, priority, enqueued_at, handled_at, latency_ms FROM events
                       WHERE NOT exported ORDER BY handled_at LIMIT %s FOR UPDATE SKIP LOCKED""",
                    [limit],
                ).fetchall()
            )
            if rows:
                write(rows)
                self.con.execute(
                    """UPDATE events SET exported = true FROM unnest(%s::text[], %s::text[]) AS batch(site_id, event_id)
                       WHERE events.site_id = batch.site_id AND events.event_id = batch.event_id""",
                    [[r["site_id"] for r in rows], [r["event_id"] for r in rows]],
                )
        return len(rows)
