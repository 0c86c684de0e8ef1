"""Trace one event through the pipeline: `python -m pipeline.trace <site_id/event_id | event_id>`.

An operator holding an event id (a partner's `webhook-id`, a log line, an analyst's row) wants to know
where that event went. An event id is unique only within its site, so the trace takes the site too, as
`site_id/event_id` (the partner's webhook-id has that form) or `--site`; given a bare id it shows
every site's event of that id, each record naming its site where the record has one. Each stage keeps its own durable record, so the trace reads them all and never
changes anything:

- edge: the site's retry log and DLQ, through the edge service's admin API (the service alone owns
  its DuckDB file); a delivered event leaves no row there, so "not in the DLQ" is the normal case;
- SQS: the drain runs that received it (their landing files in the archive bucket are named by run
  id) and, if it is there now, the `events-dlq` (peeked with a short visibility that is then reset);
- partners: every webhook attempt with its HTTP status and outcome (`delivery_attempts` logs);
- priority: which priority queue handled it and how fast (`priority_handled` logs);
- archive: the hourly partition and the Parquet file that hold it.

Where to look is derived from the event id when it is a UUIDv7 (its first 48 bits are the creation
time in ms): the archive hours around that time first, then a full scan; the logs from the day before
it onward. `--around` gives the time when the id is not time-ordered.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.dataset as ds
from pyarrow import fs

from pipeline.archive import archive_dir, archive_hour, hour_key

log = logging.getLogger(__name__)

DELIVERY_ATTEMPTS = "delivery_attempts"
PRIORITY_HANDLED = "priority_handled"


@dataclass
class Stage:
    """One stage of an event's path: whether the event was seen there, and what each record says."""

    name: str
    found: bool
    lines: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)


@dataclass
class Trace:
    event_id: str
    around: datetime | None
    stages: list[Stage]
    site_id: str | None = None

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def render(self) -> str:
        when = f" (created around {self.around:%Y-%m-%d %H:%M:%S}Z)" if self.around else ""
        out = [f"event {self.site_id + '/' if self.site_id else ''}{self.event_id}{when}"]
        for stage in self.stages:
            out.append(f"  {stage.name:<9} {'found' if stage.found else '-':<6} " + (stage.lines[0] if stage.lines else ""))
            out += [f"  {'':<9} {'':<6} {line}" for line in stage.lines[1:]]
        return "\n".join(out)

    def to_json(self) -> str:
        return json.dumps(
            {"event_id": self.event_id, "site_id": self.site_id, "around": self.around.isoformat() if self.around else None, "stages": [asdict(s) for s in self.stages]},
            default=str,
            indent=2,
        )


def uuid7_time(event_id: str) -> datetime | None:
    """The creation time a UUIDv7 carries, or None for any other id."""
    try:
        value = uuid.UUID(event_id)
    except ValueError:
        return None
    if value.version != 7:
        return None
    return datetime.fromtimestamp((value.int >> 80) / 1000, tz=timezone.utc)


# --- edge -----------------------------------------------------------------------------------------
def split_event_ref(ref: str) -> tuple[str | None, str]:
    """`site_id/event_id` -> (site_id, event_id); a bare event id -> (None, event_id)."""
    site, slash, event_id = ref.strip().rpartition("/")
    return (site or None) if slash else None, event_id


def trace_edge(event_id: str, admin_urls: list[str], dlq_limit: int = 100_000) -> Stage:
    """Ask each site's edge service whether the event sits in its DLQ (the admin URLs name the sites)."""
    from edge_bridge.cli import AdminClient

    if not admin_urls:
        return Stage("edge", False, ["not asked: give --edge-admin <url> (one per site) to search the edge DLQs"])
    stage = Stage("edge", False)
    for url in admin_urls:
        client = AdminClient(url, timeout=10)
        try:
            status = client.status()
            letters = [d for d in client.dlq_list(limit=dlq_limit) if d.get("event_id") == event_id]
        except Exception as exc:  # an unreachable site is part of the answer, not a crash
            stage.lines.append(f"{url}: edge admin API unreachable ({exc.__class__.__name__}: {exc})")
            continue
        site = status.get("site_id", url)
        for letter in letters:
            stage.found = True
            stage.records.append({"site_id": site, **letter})
            failed = datetime.fromtimestamp(letter["failed_at"], tz=timezone.utc) if letter.get("failed_at") else None
            stage.lines.append(
                f"site {site}: in the edge DLQ after {letter['attempts']} SQS attempts"
                + (f", last at {failed:%Y-%m-%d %H:%M:%S}Z" if failed else "")
                + f": {letter.get('last_error', '')}"
            )
        if not letters:
            stage.lines.append(
                f"site {site}: not in the DLQ ({status.get('jobs_pending', '?')} jobs pending, {status.get('dlq_size', '?')} in DLQ);"
                " a delivered event leaves no edge record"
            )
    return stage


# --- Parquet lookups in the archive bucket -------------------------------------------------------------
def _subdirs(filesystem: fs.FileSystem, path: str) -> list[str]:
    try:
        infos = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return []
    return sorted(info.path for info in infos if info.type == fs.FileType.Directory)


def _parquet_files(filesystem: fs.FileSystem, directories: list[str]) -> list[str]:
    files: list[str] = []
    for directory in directories:
        selector = fs.FileSelector(directory, recursive=True, allow_not_found=True)
        files += sorted(i.path for i in filesystem.get_file_info(selector) if i.type == fs.FileType.File and i.path.endswith(".parquet"))
    return files


def find_rows(filesystem: fs.FileSystem, files: list[str], event_id: str, site_id: str | None = None) -> list[tuple[str, dict]]:
    """(file, row) for every row with this event_id (and site, where the file has a site_id column)."""
    if not files:
        return []
    dataset = ds.dataset(files, filesystem=filesystem, format="parquet")
    found = []
    for fragment in dataset.get_fragments():
        condition = ds.field("event_id") == event_id
        if site_id is not None and "site_id" in fragment.physical_schema.names:
            condition = condition & (ds.field("site_id") == site_id)
        table: pa.Table = fragment.to_table(filter=condition)
        found += [(fragment.path, row) for row in table.to_pylist()]
    return found


def _dated_dirs(filesystem: fs.FileSystem, bucket: str, prefix: str, since: date | None) -> list[str]:
    dirs = _subdirs(filesystem, f"{bucket}/{prefix}")
    if since is None:
        return dirs
    return [d for d in dirs if d.rsplit("date=", 1)[-1] >= since.isoformat()]


def trace_sqs(filesystem: fs.FileSystem, bucket: str, landing_prefix: str, event_id: str, around: datetime | None, sqs=None, dlq_url: str | None = None, peek_limit: int = 1000, site_id: str | None = None) -> Stage:
    stage = Stage("sqs", False)
    hours = _subdirs(filesystem, f"{bucket}/{landing_prefix}")
    if around is not None:
        window = {f"hour={(around + timedelta(hours=h)):%Y-%m-%dT%H}" for h in range(-2, 3)}
        near = [d for d in hours if d.rsplit("/", 1)[-1] in window]
        rows = find_rows(filesystem, _parquet_files(filesystem, near), event_id, site_id) or find_rows(filesystem, _parquet_files(filesystem, hours), event_id, site_id)
    else:
        rows = find_rows(filesystem, _parquet_files(filesystem, hours), event_id, site_id)
    for path, row in sorted(rows, key=lambda r: r[1]["ingested_at"]):
        stage.found = True
        run_id = path.rsplit("/", 1)[-1].removesuffix(".parquet")
        stage.records.append({"landing_file": path, "drain_run": run_id, "site_id": row["site_id"], "ingested_at": row["ingested_at"], "received_at": row["received_at"]})
        stage.lines.append(f"{row['site_id']}: received from SQS by drain run {run_id} at {row['ingested_at']:%Y-%m-%d %H:%M:%S}Z (edge received it {row['received_at']:%H:%M:%S}Z)")
    for site, count in sorted(Counter(row["site_id"] for _, row in rows).items()):
        if count > 1:
            stage.lines.append(f"{site}: received {count} times (SQS is at-least-once; the archive keeps it once)")
    if sqs is not None and dlq_url:
        for message in peek_queue(sqs, dlq_url, event_id, peek_limit, site_id):
            stage.found = True
            receives = message.get("Attributes", {}).get("ApproximateReceiveCount", "?")
            stage.records.append({"events_dlq": dlq_url, "receive_count": receives})
            stage.lines.append(f"now in events-dlq (received {receives} times); the 02:00 events-dlq replay moves it back")
    if not stage.found:
        stage.lines.append("no drain run received it (still in SQS, or never sent: see the edge)")
    return stage


def peek_queue(sqs, queue_url: str, event_id: str, limit: int, site_id: str | None = None) -> list[dict]:
    """Messages carrying this event id, seen without consuming anything: each received message is made
    visible again at once. Meant for a dead-letter queue (no redrive counts against it)."""
    matches, seen, handles = [], 0, []
    try:
        while seen < limit:
            batch = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=30, WaitTimeSeconds=0, AttributeNames=["All"]).get("Messages", [])
            if not batch:
                break
            seen += len(batch)
            handles += [m["ReceiptHandle"] for m in batch]
            for message in batch:
                try:
                    body = json.loads(message["Body"])
                except ValueError:
                    continue
                if isinstance(body, dict) and body.get("event_id") == event_id and site_id in (None, body.get("site_id")):
                    matches.append(message)
    finally:
        for start in range(0, len(handles), 10):
            entries = [{"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": 0} for i, h in enumerate(handles[start : start + 10])]
            sqs.change_message_visibility_batch(QueueUrl=queue_url, Entries=entries)
    return matches


def trace_partners(filesystem: fs.FileSystem, bucket: str, event_id: str, since: date | None, site_id: str | None = None) -> Stage:
    rows = find_rows(filesystem, _parquet_files(filesystem, _dated_dirs(filesystem, bucket, DELIVERY_ATTEMPTS, since)), event_id, site_id)
    stage = Stage("partners", bool(rows))
    for _, row in sorted(rows, key=lambda r: (r[1]["partner"], r[1]["attempted_at"], r[1]["attempt"])):
        stage.records.append(row)
        status = row["status_code"] if row["status_code"] else "no response"
        error = f" ({row['error']})" if row.get("error") else ""
        stage.lines.append(f"{row['partner']}: attempt {row['attempt']} at {row['attempted_at']:%Y-%m-%d %H:%M:%S}Z -> {status} {row['outcome']}{error}")
    if not rows:
        stage.lines.append("no webhook attempt (no partner subscribes to its type, or not routed yet)")
    return stage


def trace_priority(filesystem: fs.FileSystem, bucket: str, event_id: str, since: date | None, site_id: str | None = None) -> Stage:
    rows = find_rows(filesystem, _parquet_files(filesystem, _dated_dirs(filesystem, bucket, PRIORITY_HANDLED, since)), event_id, site_id)
    stage = Stage("priority", bool(rows))
    for _, row in sorted(rows, key=lambda r: r[1]["handled_at"]):
        stage.records.append(row)
        stage.lines.append(f"{row['priority']} queue: handled at {row['handled_at']:%Y-%m-%d %H:%M:%S}Z, {row['latency_ms']:.0f} ms after it was queued")
    if not rows:
        stage.lines.append("not handled by a priority consumer yet")
    return stage


def trace_archive(filesystem: fs.FileSystem, bucket: str, event_id: str, around: datetime | None, hours_each_side: int = 3, site_id: str | None = None) -> Stage:
    if around is not None:
        near = [archive_dir(bucket, hour_key(around + timedelta(hours=h))) for h in range(-hours_each_side, hours_each_side + 1)]
        rows = find_rows(filesystem, _parquet_files(filesystem, near), event_id, site_id)
        searched = f"hours {hour_key(around - timedelta(hours=hours_each_side))} .. {hour_key(around + timedelta(hours=hours_each_side))}"
        if not rows:
            rows = find_rows(filesystem, _parquet_files(filesystem, [d for d in _subdirs(filesystem, bucket) if d.rsplit("/", 1)[-1].startswith("year=")]), event_id, site_id)
            searched += ", then every hour"
    else:
        rows = find_rows(filesystem, _parquet_files(filesystem, [d for d in _subdirs(filesystem, bucket) if d.rsplit("/", 1)[-1].startswith("year=")]), event_id, site_id)
        searched = "every hour"
    stage = Stage("archive", bool(rows))
    for path, row in rows:
        partition = archive_hour(row["timestamp"], row["received_at"])
        stage.records.append({"partition": partition, "file": f"s3://{path}", "event_type": row["event_type"], "site_id": row["site_id"], "timestamp": row["timestamp"]})
        stage.lines.append(f"partition {partition}: s3://{path} ({row['event_type']} at {row['site_id']}, event time {row['timestamp']:%Y-%m-%d %H:%M:%S}Z)")
    for site, count in sorted(Counter(row["site_id"] for _, row in rows).items()):
        if count > 1:
            stage.lines.append(f"{site}: archived {count} times: run the events_archive checks for its hour")
    if not rows:
        stage.lines.append(f"not archived ({searched} searched): its hour may not be compacted yet")
    return stage


def trace_event(
    event_id: str,
    *,
    filesystem: fs.FileSystem,
    bucket: str,
    landing_prefix: str = "landing",
    edge_admin_urls: list[str] | None = None,
    around: datetime | None = None,
    sqs=None,
    dlq_url: str | None = None,
    site_id: str | None = None,
) -> Trace:
    """Every stage's record of one event (of every site's event with this id when `site_id` is None); read-only.

    The edge and partner stages match the id alone: the edge DLQ and the delivery-attempt log carry no site.
    """
    around = around or uuid7_time(event_id)
    since = (around - timedelta(days=1)).date() if around else None
    return Trace(
        event_id,
        around,
        [
            trace_edge(event_id, edge_admin_urls or []),
            trace_sqs(filesystem, bucket, landing_prefix, event_id, around, sqs=sqs, dlq_url=dlq_url, site_id=site_id),
            trace_partners(filesystem, bucket, event_id, since, site_id=site_id),
            trace_priority(filesystem, bucket, event_id, since, site_id=site_id),
            trace_archive(filesystem, bucket, event_id, around, site_id=site_id),
        ],
        site_id,
    )


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def main(argv: list[str] | None = None) -> int:
    import os

    from pipeline.stack import aws_client, load_stack_config, s3_filesystem

    parser = argparse.ArgumentParser(prog="python -m pipeline.trace", description=__doc__.splitlines()[0])
    parser.add_argument("event_id", help="site_id/event_id (as a partner's webhook-id), or a bare event id (every site's event with it)")
    parser.add_argument("--site", help="the event's site, when the id is given without one")
    parser.add_argument("--edge-admin", action="append", default=[], metavar="URL", help="an edge service's admin API (repeat per site; default $EDGE_ADMIN_URL)")
    parser.add_argument("--around", type=_parse_time, help="roughly when the event happened (UTC, ISO 8601), when its id is not a UUIDv7")
    parser.add_argument("--no-dlq", action="store_true", help="do not peek at events-dlq")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    stack = load_stack_config()
    bucket = os.environ.get("PIPELINE_ARCHIVE_BUCKET", stack.archive.bucket)
    admin_urls = args.edge_admin or ([os.environ["EDGE_ADMIN_URL"]] if os.environ.get("EDGE_ADMIN_URL") else [])
    sqs, dlq_url = None, None
    if not args.no_dlq:
        sqs = aws_client("sqs")
        try:
            dlq_url = sqs.get_queue_url(QueueName=stack.events_queue.dlq_name)["QueueUrl"]
        except Exception as exc:
            log.warning("events-dlq not found (%s); not peeking", exc)
    site_id, event_id = split_event_ref(args.event_id)
    trace = trace_event(
        event_id,
        site_id=site_id or args.site,
        filesystem=s3_filesystem(),
        bucket=bucket,
        landing_prefix=stack.archive.landing_prefix,
        edge_admin_urls=admin_urls,
        around=args.around,
        sqs=sqs,
        dlq_url=dlq_url,
    )
    print(trace.to_json() if args.json else trace.render())
    return 0 if any(s.found for s in trace.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
