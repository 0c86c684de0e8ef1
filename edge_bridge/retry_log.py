"""The DuckDB retry log: where an event waits when SQS did not take it at once.

One process (the edge service) owns the file, because DuckDB allows one writer; everything else asks
the service through its admin API. A job is committed before its MQTT message is acked, so a
`kill -9` at any instant leaves the event either in the broker or here. Writes are bulk inserts from
Arrow tables in one transaction each, which is what lets an outage spill tens of thousands of events
per second (row-by-row `executemany` is orders of magnitude slower in DuckDB).

Lifecycle: `jobs` (attempts counts the poller's failed retries) → after `max_attempts` failures the
row moves to `dlq` with its last error → a replay moves DLQ rows back to `jobs` with a fresh count.

Each job keeps its event's priority from the catalog as it was when the job was committed, and `due()`
hands out high before medium before low, oldest first within a priority: after an outage the alarms
buffered behind a large backlog go out first, and a site's events of one priority keep their order. A
file written before jobs had a priority gets the column when it is opened, filled from each body's
event type.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from edge_bridge.priorities import UNKNOWN_PRIORITY, priority_name, priority_rank

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
# A job's priority is stored as its rank (0 high, 1 medium, 2 low: `edge_bridge.priorities`), which is
# also the order `due()` hands jobs out in.
# `due()` orders: by priority, then age (the default), or by age alone as before priorities existed.
ORDERS = ("priority", "fifo")

_JOBS_SCHEMA = pa.schema(
    [
        ("job_id", pa.int64()),
        ("event_id", pa.string()),
        ("body", pa.string()),
        ("attempts", pa.int32()),
        ("next_attempt_at", pa.float64()),
        ("last_error", pa.string()),
        ("created_at", pa.float64()),
        ("priority", pa.int8()),
    ]
)


@dataclass(frozen=True)
class Job:
    job_id: int
    event_id: str
    body: str
    attempts: int
    priority: str = UNKNOWN_PRIORITY


@dataclass(frozen=True)
class DeadLetter:
    event_id: str
    attempts: int
    last_error: str
    created_at: float
    failed_at: float
    body_bytes: int


@dataclass(frozen=True)
class HeldEvent:
    """One row of the retry log holding an event: a pending job (`state` "pending") or a dead letter ("dlq")."""

    state: str
    event_id: str
    body: str
    attempts: int
    last_error: str
    created_at: float
    priority: str
    job_id: int | None = None  # pending only
    next_attempt_at: float | None = None  # pending only
    failed_at: float | None = None  # dlq only


class RetryLog:
    """Pending jobs and the local DLQ in one DuckDB file; every method is one transaction.

    `max_events` bounds jobs + DLQ rows: `has_room()` turns false at the bound, and the service then
    stops acknowledging MQTT messages so the broker keeps the backlog instead of the disk filling up.
    `priorities` (event type -> priority, the catalog's) fills the priority of jobs in a file written
    before jobs had one; `order` is how `due()` hands jobs out (see ORDERS).
    """

    def __init__(
        self,
        path: Path,
        max_events: int = 5_000_000,
        backoff_s: float = 5.0,
        max_attempts: int = MAX_ATTEMPTS,
        memory_limit: str = "32MB",
        priorities: dict[str, str] | None = None,
        order: str = "priority",
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"retry log order {order!r}: expected one of {', '.join(ORDERS)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_events = max_events
        self.backoff_s = backoff_s
        self.max_attempts = max_attempts
        self.order = order
        self._lock = threading.Lock()
        # A small buffer pool keeps a million buffered events on disk rather than in RSS. String
        # compression (dictionary, FSST) is off: at each checkpoint it took memory DuckDB never gave
        # back (+160 MB of RSS after 300,000 real envelopes, growing), while without it RSS stays flat
        # (+69 MB with 1,000,000) and the file holds the bodies at about their size.
        self._con = duckdb.connect(str(path), config={"memory_limit": memory_limit, "threads": 1})
        self._con.execute("SET disabled_compression_methods = 'fsst,dictionary'")  # (not taken as a connect option)
        self._con.execute(
            """
            CREATE TABLE IF NOT EXISTS jobs (
                job_id BIGINT, event_id VARCHAR, body VARCHAR, attempts INTEGER,
                next_attempt_at DOUBLE, last_error VARCHAR, created_at DOUBLE, priority TINYINT);
            CREATE TABLE IF NOT EXISTS dlq (
                event_id VARCHAR, body VARCHAR, attempts INTEGER, last_error VARCHAR,
                created_at DOUBLE, failed_at DOUBLE, priority TINYINT);
            CREATE TABLE IF NOT EXISTS probe (written_at DOUBLE);
            """
        )
        self._add_priority_column(priorities or {})
        self.pending = self._scalar("SELECT count(*) FROM jobs")
        self.dlq_size = self._scalar("SELECT count(*) FROM dlq")
        self._next_id = self._scalar("SELECT coalesce(max(job_id), 0) FROM jobs") + 1
        if self.pending or self.dlq_size:
            log.info("retry log %s resumed: %d pending jobs, %d in DLQ", path, self.pending, self.dlq_size)

    def _scalar(self, sql: str) -> int:
        return int(self._con.execute(sql).fetchall()[0][0])

    def _add_priority_column(self, priorities: dict[str, str]) -> None:
        """Migrate a file from before priorities: add the column, filled from each body's event type."""
        for table in ("jobs", "dlq"):
            columns = {
                row[0]
                for row in self._con.execute(
                    f"SELECT column_name FROM information_schema.columns WHERE table_name = '{table}'"
                ).fetchall()
            }
            if "priority" in columns:
                continue
            ranks = pa.table(
                {
                    "event_type": pa.array(list(priorities), pa.string()),
                    "rank": pa.array([priority_rank(p) for p in priorities.values()], pa.int8()),
                }
            )
            self._con.execute("BEGIN")
            try:
                self._con.execute(
                    f"ALTER TABLE {table} ADD COLUMN priority TINYINT DEFAULT {priority_rank(UNKNOWN_PRIORITY)}"
                )
                self._con.register("catalog_ranks", ranks)
                self._con.execute(
                    f"""UPDATE {table} SET priority = r.rank FROM catalog_ranks r
                        WHERE json_extract_string(CASE WHEN json_valid({table}.body) THEN {table}.body ELSE '{{}}' END, '$.event_type') = r.event_type"""
                )
                self._con.unregister("catalog_ranks")
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
            log.info("retry log %s: %s now records each job's priority (taken from its event type)", self.path, table)

    def has_room(self, extra: int = 0) -> bool:
        return self.pending + self.dlq_size + extra < self.max_events

    def add(self, events: list[tuple[str, str, str] | tuple[str, str, str, str]], now: float | None = None) -> None:
        """Commit new jobs `(event_id, body, error[, priority])`, due at once, in one transaction.

        The priority is the event type's in the catalog at commit time (without one: `UNKNOWN_PRIORITY`).
        """
        if not events:
            return
        now = time.time() if now is None else now
        with self._lock:
            first = self._next_id
            self._next_id += len(events)
            table = pa.table(
                [
                    pa.array(range(first, first + len(events)), pa.int64()),
                    pa.array([e[0] for e in events], pa.string()),
                    pa.array([e[1] for e in events], pa.string()),
                    pa.array([0] * len(events), pa.int32()),
                    pa.array([now] * len(events), pa.float64()),
                    pa.array([e[2] for e in events], pa.string()),
                    pa.array([now] * len(events), pa.float64()),
                    pa.array([priority_rank(e[3] if len(e) > 3 else None) for e in events], pa.int8()),
                ],
                schema=_JOBS_SCHEMA,
            )
            self._con.register("new_jobs", table)
            try:
                self._con.execute("INSERT INTO jobs BY NAME SELECT * FROM new_jobs")
            finally:
                self._con.unregister("new_jobs")
            self.pending += len(events)

    def writable(self) -> bool:
        """Whether a write of no event's making commits now.

        It tells a shared failure (a full disk: this fails too) from rows that fail for reasons of
        their own, which the writer then looks for among a refused group instead of holding it all.
        """
        try:
            with self._lock:
                self._con.execute("BEGIN")
                try:
                    self._con.execute("DELETE FROM probe")
                    self._con.execute("INSERT INTO probe VALUES (?)", [time.time()])
                    self._con.execute("COMMIT")
                except BaseException:
                    self._con.execute("ROLLBACK")
                    raise
        except Exception as exc:  # noqa: BLE001 - any failure means "not now"
            log.warning("the retry log takes no writes: %s: %s", type(exc).__name__, exc)
            return False
        return True

    def due(self, limit: int, now: float | None = None) -> list[Job]:
        """Up to `limit` jobs whose next attempt is due: high first, then medium, then low, each oldest first.

        Oldest means committed first (`created_at`, then `job_id`, the commit order), so one site's
        events of a priority go out in the order they came in. With `order="fifo"`, by due time alone.
        """
        now = time.time() if now is None else now
        order = "priority, created_at, job_id" if self.order == "priority" else "next_attempt_at, job_id"
        with self._lock:
            rows = self._con.execute(
                f"SELECT job_id, event_id, body, attempts, priority FROM jobs WHERE next_attempt_at <= ? ORDER BY {order} LIMIT ?",
                [now, limit],
            ).fetchall()
        return [
            Job(job_id, event_id, body, attempts, priority_name(rank))
            for job_id, event_id, body, attempts, rank in rows
        ]

    def record(self, done: list[int], failed: list[tuple[int, str]], now: float | None = None) -> int:
        """Close the jobs SQS took; count a failure on the others, moving exhausted ones to the DLQ.

        Returns how many jobs moved to the DLQ. Backoff doubles per failure (`backoff_s`, 2×, 4×…).
        """
        now = time.time() if now is None else now
        with self._lock:
            self._con.execute("BEGIN")
            try:
                if done:
                    self._con.register("done_ids", pa.table({"job_id": pa.array(done, pa.int64())}))
                    self._con.execute("DELETE FROM jobs WHERE job_id IN (SELECT job_id FROM done_ids)")
                    self._con.unregister("done_ids")
                moved = 0
                if failed:
                    self._con.register(
                        "failed_ids",
                        pa.table(
                            {
                                "job_id": pa.array([f[0] for f in failed], pa.int64()),
                                "error": pa.array([f[1] for f in failed], pa.string()),
                            }
                        ),
                    )
                    self._con.execute(
                        """UPDATE jobs SET attempts = jobs.attempts + 1, last_error = f.error,
                               next_attempt_at = ? + ? * pow(2, jobs.attempts)
                           FROM failed_ids f WHERE jobs.job_id = f.job_id""",
                        [now, self.backoff_s],
                    )
                    self._con.unregister("failed_ids")
                    moved = self._scalar(f"SELECT count(*) FROM jobs WHERE attempts >= {int(self.max_attempts)}")
                    if moved:
                        self._con.execute(
                            f"""INSERT INTO dlq (event_id, body, attempts, last_error, created_at, failed_at, priority)
                                SELECT event_id, body, attempts, last_error, created_at, {float(now)}, priority
                                FROM jobs WHERE attempts >= {int(self.max_attempts)};
                                DELETE FROM jobs WHERE attempts >= {int(self.max_attempts)}"""
                        )
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
            self.pending -= len(done) + moved
            self.dlq_size += moved
        if moved:
            log.warning("%d jobs failed %d attempts and moved to the DLQ", moved, self.max_attempts)
        return moved

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        with self._lock:
            rows = self._con.execute(
                "SELECT event_id, attempts, last_error, created_at, failed_at, strlen(body) FROM dlq ORDER BY failed_at, event_id LIMIT ?",
                [limit],
            ).fetchall()
        return [DeadLetter(*row) for row in rows]

    def find(self, event_id: str, limit: int = 100) -> list[HeldEvent]:
        """Every row holding `event_id`: pending jobs (by job id), then dead letters (oldest failure first).

        At most `limit` of each: an event id a careless site reuses must not make the answer huge.
        """
        with self._lock:
            jobs = self._con.execute(
                """SELECT event_id, body, attempts, last_error, created_at, priority, job_id, next_attempt_at
                   FROM jobs WHERE event_id = ? ORDER BY job_id LIMIT ?""",
                [event_id, limit],
            ).fetchall()
            dead = self._con.execute(
                """SELECT event_id, body, attempts, last_error, created_at, priority, failed_at
                   FROM dlq WHERE event_id = ? ORDER BY failed_at LIMIT ?""",
                [event_id, limit],
            ).fetchall()
        return [
            HeldEvent("pending", e, b, a, err, c, priority_name(p), job_id=j, next_attempt_at=due)
            for e, b, a, err, c, p, j, due in jobs
        ] + [
            HeldEvent("dlq", e, b, a, err, c, priority_name(p), failed_at=failed) for e, b, a, err, c, p, failed in dead
        ]

    def replay_dlq(self, now: float | None = None) -> int:
        """Move every DLQ row back to `jobs`, due now with a fresh attempt count; returns how many."""
        now = time.time() if now is None else now
        with self._lock:
            count = self._scalar("SELECT count(*) FROM dlq")
            if not count:
                return 0
            first = self._next_id
            self._next_id += count
            self._con.execute("BEGIN")
            try:
                self._con.execute(
                    f"""INSERT INTO jobs (job_id, event_id, body, attempts, next_attempt_at, last_error, created_at, priority)
                        SELECT {first} + row_number() OVER (ORDER BY failed_at, event_id) - 1,
                            event_id, body, 0, {float(now)}, last_error, created_at, priority FROM dlq;
                        DELETE FROM dlq"""
                )
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
            self.pending += count
            self.dlq_size = 0
        log.info("replayed %d DLQ jobs", count)
        return count

    def size_bytes(self) -> int:
        """The file and its write-ahead log, which a checkpoint deletes at any moment."""
        return sum(_size(p) for p in (self.path, self.path.with_name(self.path.name + ".wal")))

    def close(self) -> None:
        with self._lock:
            self._con.close()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
