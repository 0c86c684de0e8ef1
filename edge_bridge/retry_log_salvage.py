"""Checking the retry log's DuckDB file at start-up, and salvaging what a corrupt one still holds.

A retry log that cannot be read would stop the edge service from starting, and a site with no edge
service acks nothing. So the service reads every row of every table before it opens the file
(`check`); a file that fails is moved aside as `<name>.corrupt-<UTC time>` (with its `.wal`, which
DuckDB then still finds beside it), every row that can still be read is copied into a fresh file
(`salvage`: table by table, then row group by row group, then vector by vector, DuckDB's unit of
reading), and the service starts on that. The report says how many rows came back and how many were
lost, or that the loss cannot be counted (the file does not open at all).

DuckDB checksums every block, so a flipped or missing byte is an error, not wrong rows. The reading is
still done in a child process (`python -m edge_bridge.retry_log_salvage`), so that whatever a damaged
file does to DuckDB (an abort, a crash, a hang) ends the child, never the service.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

# The tables whose rows are events; `probe` holds only the last write probe and is not salvaged.
EVENT_TABLES = ("jobs", "dlq")
# Rows per DuckDB row group and per vector: a damaged block costs the vectors that read it, no more.
ROW_GROUP_ROWS = 122_880
VECTOR_ROWS = 2_048
CHECK_TIMEOUT_S = 600.0
LOCK_WAIT_S = 30.0
_CONNECT = {"threads": 1, "memory_limit": "256MB"}

OK, CORRUPT, LOCKED, MISSING = "ok", "corrupt", "locked", "missing"


@dataclass
class TableCheck:
    rows: int | None = None  # from the table's metadata; None: not even that could be read
    error: str | None = None  # the full read of every column failed with this


@dataclass
class CheckResult:
    """What an integrity read of one retry log file found."""

    path: str
    status: str  # ok | corrupt | locked | missing
    reason: str = ""
    size_bytes: int = 0
    wal_bytes: int = 0
    tables: dict[str, TableCheck] = field(default_factory=dict)

    @property
    def pending_jobs(self) -> int | None:
        return self.tables["jobs"].rows if "jobs" in self.tables else None

    @property
    def dlq_rows(self) -> int | None:
        return self.tables["dlq"].rows if "dlq" in self.tables else None


@dataclass
class SalvageReport:
    """What start-up did with the retry log: `status` ok (nothing to do) or salvaged (moved aside)."""

    status: str
    reason: str = ""
    moved_to: str | None = None
    salvaged: dict[str, int] = field(default_factory=dict)  # rows copied into the fresh log, per table
    lost: dict[str, int | None] = field(default_factory=dict)  # per table; None: cannot be counted

    @property
    def loss_unknown(self) -> bool:
        return any(v is None for v in self.lost.values())

    @property
    def lost_rows(self) -> int:
        return sum(v for v in self.lost.values() if v)

    def as_dict(self) -> dict:
        return {**asdict(self), "loss_unknown": self.loss_unknown, "lost_rows": self.lost_rows}


def wal_path(path: Path) -> Path:
    return path.with_name(path.name + ".wal")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# --- in the child process -------------------------------------------------------------------------
def _read_check(path: Path) -> CheckResult:
    """Open read-only and read every column of every row of every table (a hash over each column)."""
    import duckdb

    result = CheckResult(str(path), OK, size_bytes=_size(path), wal_bytes=_size(wal_path(path)))
    try:
        con = duckdb.connect(str(path), read_only=True, config=_CONNECT)
    except duckdb.Error as exc:
        lock = "Could not set lock" in str(exc)
        result.status, result.reason = (LOCKED if lock else CORRUPT), _first_line(exc)
        return result
    try:
        tables = [
            row[0] for row in con.execute("SELECT table_name FROM duckdb_tables() ORDER BY table_name").fetchall()
        ]
        missing = [t for t in EVENT_TABLES if t not in tables]
        if missing:
            result.status, result.reason = CORRUPT, f"no table {', '.join(missing)}"
        for table in tables:
            check = result.tables[table] = TableCheck()
            try:
                check.rows = int(con.execute(f'SELECT count(*) FROM "{table}"').fetchall()[0][0])
                con.execute(f'SELECT count(*), bit_xor(hash(COLUMNS(*))) FROM "{table}"').fetchall()
            except duckdb.Error as exc:
                check.error = _first_line(exc)
                if result.status == OK:
                    result.status, result.reason = CORRUPT, f"{table}: {check.error}"
    finally:
        con.close()
    return result


def _copy_readable_rows(source: Path, target: Path) -> dict:
    """Copy every readable row of the event tables of `source` into a new DuckDB file `target`.

    The target gets each table in the shape the source had, so opening it as a RetryLog afterwards
    migrates it as it would the original. Each copy is one INSERT, which a read error undoes whole;
    a range that fails is split (table, row groups, vectors) and what fails at a vector is lost.
    """
    import duckdb

    report: dict = {"salvaged": {}, "lost": {t: None for t in EVENT_TABLES}, "reason": ""}
    con = duckdb.connect(str(target), config=_CONNECT)
    try:
        try:
            con.execute("ATTACH '{}' AS damaged (READ_ONLY)".format(str(source).replace("'", "''")))
        except duckdb.Error as exc:
            report["reason"] = _first_line(exc)
            return report
        for table in EVENT_TABLES:
            try:
                con.execute(f"CREATE TABLE {table} AS SELECT * FROM damaged.{table} LIMIT 0")
            except duckdb.Error as exc:
                report["reason"] = report["reason"] or f"{table}: {_first_line(exc)}"
                continue
            total = _try_scalar(con, f"SELECT count(*) FROM damaged.{table}")
            end = _try_scalar(con, f"SELECT max(rowid) + 1 FROM damaged.{table}")
            if end is None:
                end = total
            copied = 0
            if end:
                copied = _copy_range(con, table, 0, end, ROW_GROUP_ROWS * 1024)
            report["salvaged"][table] = copied
            report["lost"][table] = None if total is None else max(total - copied, 0)
    finally:
        con.close()
    return report


def _try_scalar(con, sql: str) -> int | None:
    import duckdb

    try:
        value = con.execute(sql).fetchall()[0][0]
    except duckdb.Error:
        return None
    return None if value is None else int(value)


def _copy_range(con, table: str, start: int, end: int, step: int) -> int:
    """Rows copied from rowids [start, end), in pieces of `step`; a failing piece is tried in smaller ones."""
    import duckdb

    copied = 0
    for low in range(start, end, step):
        high = min(low + step, end)
        try:
            copied += con.execute(
                f"INSERT INTO {table} SELECT * FROM damaged.{table} WHERE rowid >= {low} AND rowid < {high}"
            ).fetchall()[0][0]
        except duckdb.Error:
            if step > VECTOR_ROWS:
                copied += _copy_range(con, table, low, high, ROW_GROUP_ROWS if step > ROW_GROUP_ROWS else VECTOR_ROWS)
    return copied


def _child_main(argv: list[str]) -> int:
    command, *paths = argv
    if command == "check":
        result = _read_check(Path(paths[0]))
        print(json.dumps(asdict(result)))
    elif command == "salvage":
        print(json.dumps(_copy_readable_rows(Path(paths[0]), Path(paths[1]))))
    else:
        print(f"unknown command {command!r}", file=sys.stderr)
        return 2
    return 0


# --- in the service or the CLI --------------------------------------------------------------------
def _run_child(*args: str, timeout: float) -> tuple[dict | None, str]:
    """The child's JSON answer, or None and why there is none (it crashed, hung or said nothing)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "edge_bridge.retry_log_salvage", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, f"the read did not finish in {timeout:.0f} s"
    if done.returncode != 0:
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit status {done.returncode}"
        tail = done.stderr.strip().splitlines()[-1:] or [""]
        return None, f"the reading process ended with {how} {tail[0]}".strip()
    try:
        return json.loads(done.stdout.strip().splitlines()[-1]), ""
    except (ValueError, IndexError):
        return None, "the reading process gave no answer"


def check(path: Path, timeout: float = CHECK_TIMEOUT_S) -> CheckResult:
    """Read every row of the file in a child process; never raises for what the file holds."""
    if not path.exists():
        return CheckResult(str(path), MISSING, "no such file", wal_bytes=_size(wal_path(path)))
    answer, why = _run_child("check", str(path), timeout=timeout)
    if answer is None:
        return CheckResult(str(path), CORRUPT, why, size_bytes=_size(path), wal_bytes=_size(wal_path(path)))
    tables = {name: TableCheck(**t) for name, t in answer.pop("tables").items()}
    return CheckResult(**answer, tables=tables)


def moved_aside(path: Path) -> list[Path]:
    """The corrupt copies of `path` that start-up moved aside and nobody has cleared away yet."""
    return sorted(p for p in path.parent.glob(f"{path.name}.corrupt-*") if not p.name.endswith(".wal"))


def move_aside(path: Path, now: datetime | None = None) -> Path:
    """Rename the file and its WAL to `<name>.corrupt-<UTC time>[.wal]`; returns the new path."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists() or wal_path(target).exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    wal = wal_path(path)
    if wal.exists():
        wal.rename(wal_path(target))
    path.rename(target)
    return target


def salvage(damaged: Path, fresh: Path, timeout: float = CHECK_TIMEOUT_S) -> SalvageReport:
    """Copy what `damaged` still holds into `fresh` (which must not exist), in a child process."""
    partial = fresh.with_name(fresh.name + ".salvaging")
    for leftover in (partial, wal_path(partial)):
        leftover.unlink(missing_ok=True)
    answer, why = _run_child("salvage", str(damaged), str(partial), timeout=timeout)
    report = SalvageReport("salvaged", moved_to=str(damaged))
    if answer is None:
        # The child died while copying: keep what it committed, if that file reads whole.
        report.reason = why
        kept = check(partial, timeout) if partial.exists() else None
        if kept is None or kept.status != OK:
            for leftover in (partial, wal_path(partial)):
                leftover.unlink(missing_ok=True)
        report.salvaged = {t: (kept.tables[t].rows or 0) if kept and t in kept.tables else 0 for t in EVENT_TABLES}
        report.lost = dict.fromkeys(EVENT_TABLES)
    else:
        report.reason = answer["reason"]
        report.salvaged = {t: answer["salvaged"].get(t, 0) for t in EVENT_TABLES}
        report.lost = {t: answer["lost"].get(t) for t in EVENT_TABLES}
    if partial.exists():
        if wal_path(partial).exists():
            wal_path(partial).rename(wal_path(fresh))
        partial.rename(fresh)
    return report


def _open_once(path: Path, priorities: dict[str, str] | None) -> None:
    """Give the fresh file the retry log's schema (tables no row came back for, columns of a migration)."""
    from edge_bridge.retry_log import RetryLog

    RetryLog(path, priorities=priorities).close()


def check_at_start(
    path: Path,
    priorities: dict[str, str] | None = None,
    timeout: float = CHECK_TIMEOUT_S,
    lock_wait_s: float = LOCK_WAIT_S,
) -> SalvageReport:
    """Make `path` a file the retry log can open: as it is when it reads whole, else salvaged.

    A lock held by another reader (the CLI's `retry-log check`) is waited out; any other failure to
    read moves the file aside and starts a fresh one with what could be read. Never raises for what
    the file holds, so the service always starts.
    """
    deadline = time.monotonic() + lock_wait_s
    while True:
        result = check(path, timeout)
        if result.status != LOCKED or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if result.status in (OK, MISSING):
        return SalvageReport(OK)
    if result.status == LOCKED:
        # Another process holds the file for writing: not corruption. Opening it will say so.
        return SalvageReport(OK, reason=result.reason)
    moved = move_aside(path)
    log.error("the retry log %s is unreadable (%s): moved aside to %s; salvaging its rows", path, result.reason, moved)
    report = salvage(moved, path, timeout)
    report.reason = result.reason
    _open_once(path, priorities)
    counted = {t: result.tables[t].rows for t in EVENT_TABLES if t in result.tables}
    log.error(
        "retry log salvage: %s rows copied into a fresh %s; lost: %s (the file as found: %s, at %s)",
        ", ".join(f"{t} {n}" for t, n in report.salvaged.items()),
        path.name,
        ", ".join(f"{t} {'unknown' if n is None else n}" for t, n in report.lost.items()),
        ", ".join(f"{t} {n} rows" for t, n in counted.items()) or "no table readable",
        moved,
    )
    return report


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
