"""Trace one event through the pipeline: `python -m pipeline.trace <site_id/event_id | event_id>`.

An operator holding an event id (a partner's `webhook-id`, a log line, an analyst's row) wants to know
where that event is, or went. An event id is unique only within its site, so the trace takes the site
too, as `site_id/event_id` (the partner's webhook-id has that form) or `--site`; given a bare id it shows
every site's event of that id, each record naming its site where the record has one. It looks in every
place an event can be, in the order an event passes them, and changes nothing:

- forwarder: its quarantine file at the site (`--forwarder-state DIR`): a device message it refused
  never became an envelope, so it is found by the id appearing in the device's own message;
- edge (through each site's admin API, `--edge-admin URL`; the service alone owns its files): its
  quarantine, and its retry log, pending jobs and DLQ rows (a delivered event leaves no row there);
- SQS: the `events` queue and `events-dlq`, each partner's queue and DLQ, each priority queue and its
  DLQ, peeked (below);
- the drain runs that received it (their landing files in the archive bucket are named by run id) and
  the cloud quarantine (`quarantine/<date>/<run>.<stage>.jsonl`);
- partners: every webhook attempt with its HTTP status and outcome (`delivery_attempts` logs);
- the priority consumer: its handling log (`priority_handled`) and its database's `events`,
  `incidents` and `rejected` tables (`--consumer-db`; read from a copy while the consumer holds it);
- archive: the hourly partition and the Parquet file that hold it.

A queue is peeked by receiving with a short visibility timeout and making every message visible again
at once, never deleting one. SQS has no way to look without receiving, so each message looked at counts
one receive (toward its queue's redrive, and a partner queue's next attempt); the scan is therefore
bounded (`--peek-limit` per queue, 0: no peeking) and says how many it looked at. Messages another
consumer holds invisible at that moment cannot be seen.

Where to look is derived from the event id when it is a UUIDv7 (its first 48 bits are the creation
time in ms): the archive hours around that time first, then a full scan; the logs and the cloud
quarantine from the day before it onward. `--around` gives the time when the id is not time-ordered.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import shutil
import sys
import tempfile
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
from pyarrow import fs

from pipeline.archive import archive_dir, archive_hour, hour_key
from pipeline.drain import QUARANTINE_PREFIX

log = logging.getLogger(__name__)

DELIVERY_ATTEMPTS = "delivery_attempts"
PRIORITY_HANDLED = "priority_handled"
PEEK_LIMIT = 1000  # messages looked at per queue
PEEK_VISIBILITY_S = 10  # how long a peeked message stays hidden if the trace dies before making it visible again


@dataclass
class Stage:
    """One place an event can be: whether it was seen there, and what each record says."""

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
        width = max(len(s.name) for s in self.stages)
        for stage in self.stages:
            out.append(
                f"  {stage.name:<{width}} {'found' if stage.found else '-':<6} "
                + (stage.lines[0] if stage.lines else "")
            )
            out += [f"  {'':<{width}} {'':<6} {line}" for line in stage.lines[1:]]
        return "\n".join(out)

    def to_json(self) -> str:
        return json.dumps(
            {
                "event_id": self.event_id,
                "site_id": self.site_id,
                "around": self.around.isoformat() if self.around else None,
                "stages": [asdict(s) for s in self.stages],
            },
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
    return datetime.fromtimestamp((value.int >> 80) / 1000, tz=UTC)


def split_event_ref(ref: str) -> tuple[str | None, str]:
    """`site_id/event_id` -> (site_id, event_id); a bare event id -> (None, event_id)."""
    site, slash, event_id = ref.strip().rpartition("/")
    return (site or None) if slash else None, event_id


def _ts(seconds: float | None) -> str:
    return f"{datetime.fromtimestamp(seconds, tz=UTC):%Y-%m-%d %H:%M:%S}Z" if seconds else "?"


def _same_site(found: str | None, wanted: str | None) -> bool:
    return wanted is None or found is None or found == wanted


# --- forwarder ------------------------------------------------------------------------------------
def trace_forwarder(event_id: str, state_dirs: list[str], site_id: str | None = None) -> Stage:
    """Forwarder quarantine entries whose device message, topic or detail holds the id."""
    if not state_dirs:
        return Stage(
            "forwarder",
            False,
            ["not asked: give --forwarder-state DIR (a site's forwarder state directory) to search its quarantine"],
        )
    stage = Stage("forwarder", False)
    needle = event_id.encode("utf-8")
    for directory in state_dirs:
        files = sorted(Path(directory).glob("forwarder-*-quarantine.jsonl*"))
        looked = 0
        for file in files:
            if file.name.endswith(".released"):
                continue
            site = file.name.removeprefix("forwarder-").split("-quarantine.jsonl")[0]
            if not _same_site(site, site_id):
                continue
            for number, line in enumerate(file.read_bytes().splitlines(), start=1):
                looked += 1
                try:
                    entry = json.loads(line)
                    raw = base64.b64decode(entry.get("payload_b64", ""))
                except (ValueError, TypeError, AttributeError):
                    continue
                if (
                    needle not in raw
                    and event_id not in str(entry.get("topic", ""))
                    and event_id not in str(entry.get("detail", ""))
                ):
                    continue
                stage.found = True
                stage.records.append(
                    {
                        "site_id": site,
                        "file": str(file),
                        "line": number,
                        **{k: entry.get(k) for k in ("quarantined_at", "reason", "detail", "topic")},
                    }
                )
                stage.lines.append(
                    f"site {site}: quarantined by the forwarder at {entry.get('quarantined_at')} as {entry.get('reason')} "
                    f"({str(entry.get('detail', ''))[:120]}), {file.name}:{number}; the device message never became an envelope"
                )
        if not stage.found:
            stage.lines.append(f"{directory}: not in {looked} forwarder quarantine entries ({len(files)} files)")
    return stage


# --- edge -----------------------------------------------------------------------------------------
def ask_edges(
    event_id: str, admin_urls: list[str], site_id: str | None = None
) -> list[tuple[str, dict | None, str | None]]:
    """(url, the service's answer to GET /trace, or None with why) for each site's edge service."""
    import requests

    answers = []
    for url in admin_urls:
        params = {"event_id": event_id, **({"site_id": site_id} if site_id else {})}
        try:
            response = requests.get(url.rstrip("/") + "/trace", params=params, timeout=30)
            if response.status_code == 404:
                answers.append(
                    (
                        url,
                        None,
                        "the service has no /trace endpoint (an older edge service): upgrade it, or use `edge_bridge.cli dlq list`",
                    )
                )
                continue
            response.raise_for_status()
            answers.append((url, response.json(), None))
        except Exception as exc:  # an unreachable site is part of the answer, not a crash
            answers.append((url, None, f"edge admin API unreachable ({exc.__class__.__name__}: {exc})"))
    return answers


def trace_edge_quarantine(answers: list[tuple[str, dict | None, str | None]], asked: bool) -> Stage:
    if not asked:
        return Stage(
            "edge-quarantine", False, ["not asked: give --edge-admin <url> (one per site) to search each edge service"]
        )
    stage = Stage("edge-quarantine", False)
    for url, answer, problem in answers:
        if answer is None:
            stage.lines.append(f"{url}: {problem}")
            continue
        site = answer.get("site_id", url)
        for entry in answer.get("quarantine", []):
            stage.found = True
            stage.records.append({"edge_site_id": site, **entry})
            how = (
                ""
                if entry.get("match") == "envelope"
                else " (its payload mentions the id; it is not a valid envelope with it)"
            )
            state = (
                ", released since"
                if entry.get("released")
                else ", held: `edge_bridge.cli quarantine release` once its cause is fixed"
            )
            stage.lines.append(
                f"edge {site}: quarantined {entry.get('quarantined_at')} as {entry.get('reason')}: {str(entry.get('detail', ''))[:120]} [{entry.get('ref')}]{how}{state}"
            )
        for release in answer.get("released", []):
            stage.records.append({"edge_site_id": site, "release": release})
            stage.lines.append(
                f"edge {site}: {release.get('ref')} released {release.get('released_at')}, back through the intake"
            )
        if not answer.get("quarantine"):
            stage.lines.append(f"edge {site}: not in its quarantine")
    return stage


def trace_retry_log(answers: list[tuple[str, dict | None, str | None]], asked: bool) -> Stage:
    if not asked:
        return Stage(
            "retry-log",
            False,
            ["not asked: give --edge-admin <url> (one per site) to search each edge retry log and DLQ"],
        )
    stage = Stage("retry-log", False)
    for url, answer, problem in answers:
        if answer is None:
            stage.lines.append(f"{url}: {problem}")
            continue
        site = answer.get("site_id", url)
        for job in answer.get("pending", []):
            stage.found = True
            stage.records.append({"edge_site_id": site, "place": "pending", **job})
            error = f", last error: {job['last_error']}" if job.get("last_error") else ""
            stage.lines.append(
                f"edge {site}: pending in the retry log since {_ts(job.get('created_at'))} (job {job.get('job_id')}, "
                f"{job.get('attempts')} retries so far, next at {_ts(job.get('next_attempt_at'))}){error}"
            )
        for letter in answer.get("dlq", []):
            stage.found = True
            stage.records.append({"edge_site_id": site, "place": "dlq", **letter})
            stage.lines.append(
                f"edge {site}: in the edge DLQ after {letter.get('attempts')} SQS attempts, last at {_ts(letter.get('failed_at'))}: "
                f"{letter.get('last_error', '')}; replayed at 02:00 site time or by `edge_bridge.cli dlq replay`"
            )
        if not answer.get("pending") and not answer.get("dlq"):
            stage.lines.append(f"edge {site}: not in its retry log or DLQ (a delivered event leaves no row there)")
    return stage


# --- SQS queues -----------------------------------------------------------------------------------
def message_identity(body: str) -> tuple[str | None, str | None]:
    """(site_id, event_id) of a queue message: an envelope, a claim-check pointer or a partner message;
    (None, None) for anything else."""
    try:
        item = json.loads(body)
    except (ValueError, TypeError, RecursionError):
        return None, None
    if not isinstance(item, dict):
        return None, None
    event_id, site = item.get("event_id"), item.get("site_id")
    webhook_id = item.get("webhook_id")
    if site is None and isinstance(webhook_id, str) and "/" in webhook_id:
        site = webhook_id.rpartition("/")[0]
    return (site if isinstance(site, str) else None), (event_id if isinstance(event_id, str) else None)


@dataclass
class Peek:
    """What a bounded look at one queue found."""

    queue: str
    matches: list[dict] = field(default_factory=list)
    looked_at: int = 0
    visible: int | None = None
    in_flight: int | None = None
    limit: int = PEEK_LIMIT
    error: str | None = None

    def summary(self) -> str:
        """`looked at N of ~M`, and why that may not be all of the queue."""
        text = f"looked at {self.looked_at} of ~{self.visible}"
        if self.looked_at >= self.limit:
            text += ", the limit"
        if self.in_flight:
            text += f"; ~{self.in_flight} held by a consumer, unseen"
        return text


def peek_queue(sqs, queue_url: str, event_id: str, limit: int = PEEK_LIMIT, site_id: str | None = None) -> Peek:
    """Messages carrying this event id, seen without consuming anything: each received message is made
    visible again at once (`PEEK_VISIBILITY_S` if the trace dies first), none is deleted. At most
    `limit` messages are looked at; each look counts as one receive of that message."""
    peek = Peek(queue_url.rstrip("/").rsplit("/", 1)[-1], limit=limit)
    handles: list[str] = []
    try:
        attributes = sqs.get_queue_attributes(
            QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        )["Attributes"]
        peek.visible = int(attributes.get("ApproximateNumberOfMessages", 0))
        peek.in_flight = int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0))
        seen: set[str] = set()
        while peek.visible and len(seen) < limit:
            batch = sqs.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=min(10, limit - len(seen)),
                VisibilityTimeout=PEEK_VISIBILITY_S,
                WaitTimeSeconds=0,
                MessageSystemAttributeNames=["All"],
                MessageAttributeNames=["All"],
            ).get("Messages", [])
            if not batch:
                break
            handles += [m["ReceiptHandle"] for m in batch]
            for message in batch:
                if message["MessageId"] in seen:
                    continue
                seen.add(message["MessageId"])
                site, found_id = message_identity(message["Body"])
                if found_id == event_id and _same_site(site, site_id):
                    peek.matches.append(
                        {
                            "queue": peek.queue,
                            "site_id": site,
                            "message_id": message["MessageId"],
                            "body": message["Body"],
                            "receive_count": message.get("Attributes", {}).get("ApproximateReceiveCount"),
                            "attributes": {
                                k: v.get("StringValue") for k, v in message.get("MessageAttributes", {}).items()
                            },
                        }
                    )
        peek.looked_at = len(seen)
    except Exception as exc:  # a missing queue or an unreachable endpoint is part of the answer
        peek.error = f"{exc.__class__.__name__}: {str(exc)[:200]}"
    finally:
        for start in range(0, len(handles), 10):
            entries = [
                {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": 0}
                for i, h in enumerate(handles[start : start + 10])
            ]
            try:
                sqs.change_message_visibility_batch(QueueUrl=queue_url, Entries=entries)
            except Exception as exc:  # noqa: BLE001 - they come back by themselves after PEEK_VISIBILITY_S
                log.warning(
                    "could not make peeked messages visible again (%s); they are back within %d s",
                    exc,
                    PEEK_VISIBILITY_S,
                )
    return peek


@dataclass(frozen=True)
class QueueSet:
    """The queues to peek, by role: name -> URL."""

    events: dict[str, str] = field(default_factory=dict)  # `events` and `events-dlq`
    partners: dict[str, dict[str, str]] = field(
        default_factory=dict
    )  # partner -> {queue name: url} (its queue and DLQ)
    priority: dict[str, dict[str, str]] = field(default_factory=dict)  # high/medium/low -> {queue name: url}


def _queue_stage(
    name: str, groups: dict[str, dict[str, str]], sqs, event_id: str, site_id: str | None, limit: int, describe
) -> Stage:
    """Peek at each queue of the stage: a line per message found, one line for the queues that do not hold it."""
    if sqs is None or limit <= 0 or not groups:
        return Stage(name, False, ["not peeked (--peek-limit 0, or no queue known)"])
    stage = Stage(name, False)
    absent = []
    for group, queues in groups.items():
        for queue, url in queues.items():
            peek = peek_queue(sqs, url, event_id, limit, site_id)
            if peek.error:
                stage.lines.append(f"{queue}: could not look ({peek.error})")
                continue
            for message in peek.matches:
                stage.found = True
                stage.records.append({"group": group, **{k: v for k, v in message.items() if k != "body"}})
                stage.lines.append(f"{queue}: {describe(queue, message)} ({peek.summary()})")
            if not peek.matches:
                absent.append(f"{queue} ({peek.summary()})")
    if absent:
        stage.lines.append("not in " + ", ".join(absent) + f"; a scan looks at up to {limit} messages a queue")
    return stage


def _dlq(queue: str) -> bool:
    return queue.removesuffix(".fifo").endswith("-dlq")


def trace_events_queue(sqs, queues: QueueSet, event_id: str, site_id: str | None, limit: int) -> Stage:
    def describe(queue: str, message: dict) -> str:
        if _dlq(queue):
            return f"{message['site_id']}: waiting in {queue} (received {message['receive_count']} times before); the 02:00 events-dlq replay moves it back"
        return f"{message['site_id']}: waiting in {queue} for a drain run (received {message['receive_count']} times, counting this look)"

    return _queue_stage("events-queue", {"events": queues.events}, sqs, event_id, site_id, limit, describe)


def trace_partner_queues(sqs, queues: QueueSet, event_id: str, site_id: str | None, limit: int) -> Stage:
    def describe(queue: str, message: dict) -> str:
        if _dlq(queue):
            reason = message["attributes"].get("failure_reason", "?")
            return f"{message['site_id']}: set aside in {queue}: {reason}: {message['attributes'].get('failure_detail', '')[:120]}; partner_redelivery_job moves it back"
        return f"{message['site_id']}: waiting in {queue} for a delivery run ({message['receive_count']} receives, counting this look)"

    return _queue_stage("partner-queue", queues.partners, sqs, event_id, site_id, limit, describe)


def trace_priority_queues(sqs, queues: QueueSet, event_id: str, site_id: str | None, limit: int) -> Stage:
    def describe(queue: str, message: dict) -> str:
        if _dlq(queue):
            return f"{message['site_id']}: in {queue}: the consumer failed to commit it {message['receive_count']} times; move it back once the consumer is healthy"
        return f"{message['site_id']}: waiting in {queue} for the priority consumer ({message['receive_count']} receives, counting this look)"

    return _queue_stage("priority-queue", queues.priority, sqs, event_id, site_id, limit, describe)


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
        files += sorted(
            i.path
            for i in filesystem.get_file_info(selector)
            if i.type == fs.FileType.File and i.path.endswith(".parquet")
        )
    return files


def find_rows(
    filesystem: fs.FileSystem, files: list[str], event_id: str, site_id: str | None = None
) -> list[tuple[str, dict]]:
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


def trace_landing(
    filesystem: fs.FileSystem,
    bucket: str,
    landing_prefix: str,
    event_id: str,
    around: datetime | None,
    site_id: str | None = None,
) -> Stage:
    """The drain runs that received the event from SQS: each writes its window to a landing file named by run id."""
    stage = Stage("landing", False)
    hours = _subdirs(filesystem, f"{bucket}/{landing_prefix}")
    if around is not None:
        window = {f"hour={(around + timedelta(hours=h)):%Y-%m-%dT%H}" for h in range(-2, 3)}
        near = [d for d in hours if d.rsplit("/", 1)[-1] in window]
        rows = find_rows(filesystem, _parquet_files(filesystem, near), event_id, site_id) or find_rows(
            filesystem, _parquet_files(filesystem, hours), event_id, site_id
        )
    else:
        rows = find_rows(filesystem, _parquet_files(filesystem, hours), event_id, site_id)
    for path, row in sorted(rows, key=lambda r: r[1]["ingested_at"]):
        stage.found = True
        run_id = path.rsplit("/", 1)[-1].removesuffix(".parquet")
        stage.records.append(
            {
                "landing_file": path,
                "drain_run": run_id,
                "site_id": row["site_id"],
                "ingested_at": row["ingested_at"],
                "received_at": row["received_at"],
            }
        )
        stage.lines.append(
            f"{row['site_id']}: received from SQS by drain run {run_id} at {row['ingested_at']:%Y-%m-%d %H:%M:%S}Z (edge received it {row['received_at']:%H:%M:%S}Z)"
        )
    for site, count in sorted(Counter(row["site_id"] for _, row in rows).items()):
        if count > 1:
            stage.lines.append(f"{site}: received {count} times (SQS is at-least-once; the archive keeps it once)")
    if not stage.found:
        stage.lines.append(
            "no drain run received it (still in a queue, quarantined, or never sent: see the stages before)"
        )
    return stage


def trace_cloud_quarantine(s3, bucket: str, event_id: str, since: date | None, site_id: str | None = None) -> Stage:
    """Every cloud stage's quarantine (drain ops, events-dlq replay): lines naming the event, or whose body is it."""
    from pipeline.quarantine import Entry, released

    if s3 is None:
        return Stage("cloud-quarantine", False, ["not searched (no S3 client)"])
    stage = Stage("cloud-quarantine", False)
    looked, objects = 0, 0
    try:
        dates = []
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{QUARANTINE_PREFIX}/", Delimiter="/"
        ):
            dates += [p["Prefix"].split("/")[1] for p in page.get("CommonPrefixes", [])]
        dates = [d for d in dates if since is None or d >= since.isoformat()]
        for day in sorted(dates):
            for page in s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=f"{QUARANTINE_PREFIX}/{day}/"
            ):
                for obj in page.get("Contents", []):
                    objects += 1
                    text = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode("utf-8", "replace")
                    for number, line in enumerate(text.splitlines(), start=1):
                        if not line.strip():
                            continue
                        looked += 1
                        if event_id not in line:
                            continue
                        try:
                            record = json.loads(line)
                        except ValueError:
                            continue
                        site, found_id = record.get("site_id"), record.get("event_id")
                        if found_id is None:
                            site, found_id = message_identity(record.get("body", ""))
                        if found_id != event_id or not _same_site(site, site_id):
                            continue
                        entry = Entry(obj["Key"], number, record)
                        marker = released(s3, bucket, entry)
                        stage.found = True
                        stage.records.append(
                            {
                                "ref": entry.ref,
                                "site_id": site,
                                **{
                                    k: record.get(k) for k in ("stage", "reason", "error_type", "detail", "destination")
                                },
                                "released": marker,
                            }
                        )
                        state = (
                            f"released {marker['released_at']}"
                            if marker
                            else "held: `python -m pipeline.quarantine release` once its cause is fixed"
                        )
                        stage.lines.append(
                            f"{site}: quarantined by {record.get('stage')} as {record.get('reason')}: {str(record.get('detail', ''))[:120]} [{entry.ref}]; {state}"
                        )
    except Exception as exc:  # an unreadable bucket is part of the answer
        stage.lines.append(f"could not read the cloud quarantine ({exc.__class__.__name__}: {str(exc)[:200]})")
        return stage
    scope = f"since {since.isoformat()}" if since else "every date"
    if not stage.found:
        stage.lines.append(f"not quarantined by a cloud stage ({looked} entries in {objects} objects, {scope})")
    return stage


def trace_partners(
    filesystem: fs.FileSystem, bucket: str, event_id: str, since: date | None, site_id: str | None = None
) -> Stage:
    rows = find_rows(
        filesystem,
        _parquet_files(filesystem, _dated_dirs(filesystem, bucket, DELIVERY_ATTEMPTS, since)),
        event_id,
        site_id,
    )
    stage = Stage("partner-attempts", bool(rows))
    for _, row in sorted(rows, key=lambda r: (r[1]["partner"], r[1]["attempted_at"], r[1]["attempt"])):
        stage.records.append(row)
        status = row["status_code"] if row["status_code"] else "no response"
        error = f" ({row['error']})" if row.get("error") else ""
        stage.lines.append(
            f"{row['partner']}: attempt {row['attempt']} at {row['attempted_at']:%Y-%m-%d %H:%M:%S}Z -> {status} {row['outcome']}{error}"
        )
    if not rows:
        stage.lines.append("no webhook attempt (no partner subscribes to its type, or not delivered yet)")
    return stage


def trace_priority(
    filesystem: fs.FileSystem, bucket: str, event_id: str, since: date | None, site_id: str | None = None
) -> Stage:
    rows = find_rows(
        filesystem,
        _parquet_files(filesystem, _dated_dirs(filesystem, bucket, PRIORITY_HANDLED, since)),
        event_id,
        site_id,
    )
    stage = Stage("consumer-log", bool(rows))
    for _, row in sorted(rows, key=lambda r: r[1]["handled_at"]):
        stage.records.append(row)
        stage.lines.append(
            f"{row['priority']} queue: handled at {row['handled_at']:%Y-%m-%d %H:%M:%S}Z, {row['latency_ms']:.0f} ms after it was queued"
        )
    if not rows:
        stage.lines.append(
            "not in the consumer's exported handling log (not handled yet, or handled in the last few seconds)"
        )
    return stage


# --- the priority consumer's database ---------------------------------------------------------------
def _open_consumer_db(path: Path):
    """A read-only connection, and whether it reads a copy: while the consumer runs it holds the file's
    lock (DuckDB has one writing process), so the file and its write-ahead log are copied and read."""
    import duckdb

    try:
        return duckdb.connect(str(path), read_only=True), None
    except duckdb.Error as exc:  # another process's lock, or this process's own writing connection
        if not any(word in str(exc).lower() for word in ("lock", "different configuration")):
            raise
    copy_dir = Path(tempfile.mkdtemp(prefix="trace-consumer-"))
    shutil.copy2(path, copy_dir / path.name)
    wal = path.with_name(path.name + ".wal")
    if wal.exists():
        shutil.copy2(wal, copy_dir / wal.name)
    return duckdb.connect(str(copy_dir / path.name), read_only=True), copy_dir


def trace_consumer_db(db_path: str | None, event_id: str, site_id: str | None = None) -> Stage:
    """The consumer's `events`, `incidents` and `rejected` rows for the event."""
    if not db_path:
        return Stage("consumer-db", False, ["not asked: give --consumer-db PATH (or set PIPELINE_CONSUMER_DB)"])
    path = Path(db_path)
    if not path.exists():
        return Stage("consumer-db", False, [f"{path}: no such file (the consumer has not started on this machine)"])
    stage = Stage("consumer-db", False)
    copy_dir = None
    try:
        con, copy_dir = _open_consumer_db(path)
        try:
            site_clause, params = (" AND site_id = ?", [event_id, site_id]) if site_id else ("", [event_id])
            for site, event_type, priority, handled_at, latency in con.execute(
                f"SELECT site_id, event_type, priority, handled_at, latency_ms FROM events WHERE event_id = ?{site_clause} ORDER BY site_id",
                params,
            ).fetchall():
                stage.found = True
                stage.records.append(
                    {
                        "table": "events",
                        "site_id": site,
                        "event_type": event_type,
                        "priority": priority,
                        "handled_at": handled_at,
                    }
                )
                stage.lines.append(
                    f"{site}: handled ({event_type}, {priority}) at {handled_at:%Y-%m-%d %H:%M:%S}Z, {latency:.0f} ms after it was queued [events]"
                )
            for incident, site, opened, webhook in con.execute(
                f"SELECT incident_id, site_id, opened_at, webhook_status FROM incidents WHERE event_id = ?{site_clause} ORDER BY opened_at",
                params,
            ).fetchall():
                stage.found = True
                stage.records.append(
                    {
                        "table": "incidents",
                        "incident_id": incident,
                        "site_id": site,
                        "opened_at": opened,
                        "webhook_status": webhook,
                    }
                )
                stage.lines.append(
                    f"{site}: opened incident {incident} at {opened:%Y-%m-%d %H:%M:%S}Z, automation webhook: {webhook or 'not called yet'} [incidents]"
                )
            for received, priority, reason, body, message_id, count in con.execute(
                "SELECT received_at, priority, reason, body, message_id, receive_count FROM rejected WHERE contains(body, ?) ORDER BY received_at",
                [event_id],
            ).fetchall():
                site, found_id = message_identity(body or "")
                if found_id not in (event_id, None) or not _same_site(site, site_id):
                    continue
                stage.found = True
                stage.records.append(
                    {
                        "table": "rejected",
                        "site_id": site,
                        "received_at": received,
                        "priority": priority,
                        "reason": reason,
                        "message_id": message_id,
                        "receive_count": count,
                    }
                )
                stage.lines.append(
                    f"{site or '?'}: rejected from the {priority} queue at {received:%Y-%m-%d %H:%M:%S}Z: {str(reason)[:160]} [rejected]"
                )
        finally:
            con.close()
    except Exception as exc:  # a file being rewritten under the copy, or an older schema: part of the answer
        stage.lines.append(f"{path}: could not read it ({exc.__class__.__name__}: {str(exc)[:200]})")
        return stage
    finally:
        if copy_dir is not None:
            shutil.rmtree(copy_dir, ignore_errors=True)
    read = f"{path} (a copy: the consumer holds the file)" if copy_dir else str(path)
    if stage.found:
        stage.lines.append(f"read {read}")
    else:
        stage.lines.append(f"not in events, incidents or rejected of {read}")
    return stage


def trace_archive(
    filesystem: fs.FileSystem,
    bucket: str,
    event_id: str,
    around: datetime | None,
    hours_each_side: int = 3,
    site_id: str | None = None,
) -> Stage:
    if around is not None:
        near = [
            archive_dir(bucket, hour_key(around + timedelta(hours=h)))
            for h in range(-hours_each_side, hours_each_side + 1)
        ]
        rows = find_rows(filesystem, _parquet_files(filesystem, near), event_id, site_id)
        searched = f"hours {hour_key(around - timedelta(hours=hours_each_side))} .. {hour_key(around + timedelta(hours=hours_each_side))}"
        if not rows:
            rows = find_rows(
                filesystem,
                _parquet_files(
                    filesystem, [d for d in _subdirs(filesystem, bucket) if d.rsplit("/", 1)[-1].startswith("year=")]
                ),
                event_id,
                site_id,
            )
            searched += ", then every hour"
    else:
        rows = find_rows(
            filesystem,
            _parquet_files(
                filesystem, [d for d in _subdirs(filesystem, bucket) if d.rsplit("/", 1)[-1].startswith("year=")]
            ),
            event_id,
            site_id,
        )
        searched = "every hour"
    stage = Stage("archive", bool(rows))
    for path, row in rows:
        partition = archive_hour(row["timestamp"], row["received_at"])
        stage.records.append(
            {
                "partition": partition,
                "file": f"s3://{path}",
                "event_type": row["event_type"],
                "site_id": row["site_id"],
                "timestamp": row["timestamp"],
            }
        )
        stage.lines.append(
            f"partition {partition}: s3://{path} ({row['event_type']} at {row['site_id']}, event time {row['timestamp']:%Y-%m-%d %H:%M:%S}Z)"
        )
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
    forwarder_dirs: list[str] | None = None,
    around: datetime | None = None,
    sqs=None,
    queues: QueueSet | None = None,
    peek_limit: int = PEEK_LIMIT,
    s3=None,
    consumer_db: str | None = None,
    site_id: str | None = None,
) -> Trace:
    """Every place's record of one event (of every site's event with this id when `site_id` is None); read-only.

    The delivery-attempt log matches the id alone where its rows carry no site (files older than the audit columns).
    """
    around = around or uuid7_time(event_id)
    since = (around - timedelta(days=1)).date() if around else None
    queues = queues or QueueSet()
    answers = ask_edges(event_id, edge_admin_urls or [], site_id)
    return Trace(
        event_id,
        around,
        [
            trace_forwarder(event_id, forwarder_dirs or [], site_id),
            trace_edge_quarantine(answers, bool(edge_admin_urls)),
            trace_retry_log(answers, bool(edge_admin_urls)),
            trace_events_queue(sqs, queues, event_id, site_id, peek_limit),
            trace_landing(filesystem, bucket, landing_prefix, event_id, around, site_id),
            trace_cloud_quarantine(s3, bucket, event_id, since, site_id),
            trace_partner_queues(sqs, queues, event_id, site_id, peek_limit),
            trace_partners(filesystem, bucket, event_id, since, site_id),
            trace_priority_queues(sqs, queues, event_id, site_id, peek_limit),
            trace_priority(filesystem, bucket, event_id, since, site_id),
            trace_consumer_db(consumer_db, event_id, site_id),
            trace_archive(filesystem, bucket, event_id, around, site_id=site_id),
        ],
        site_id,
    )


def known_queues(sqs, routing=None, stack=None) -> QueueSet:
    """Every queue an event can wait in, from the stack and routing configs; a queue that does not exist is left out."""
    from pipeline.routing.config import PRIORITIES, load_routing_config
    from pipeline.stack import dead_letter_queue_name, load_stack_config

    stack = stack or load_stack_config()
    routing = routing or load_routing_config()

    def urls(*names: str) -> dict[str, str]:
        found = {}
        for name in names:
            try:
                found[name] = sqs.get_queue_url(QueueName=name)["QueueUrl"]
            except Exception as exc:  # noqa: BLE001 - not provisioned here: nothing can wait in it
                log.warning("queue %s not found (%s); not peeking it", name, exc.__class__.__name__)
        return found

    priority = {
        p: urls(routing.priority.queue_for(p), dead_letter_queue_name(routing.priority.queue_for(p)))
        for p in PRIORITIES
    }
    return QueueSet(
        events=urls(stack.events_queue.queue_name, stack.events_queue.dlq_name),
        partners={p.name: urls(p.queue_name, p.dlq_name) for p in routing.partners},
        priority=priority,
    )


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def main(argv: list[str] | None = None) -> int:
    import os

    from pipeline.stack import aws_client, load_stack_config, s3_filesystem

    parser = argparse.ArgumentParser(prog="python -m pipeline.trace", description=__doc__.splitlines()[0])
    parser.add_argument(
        "event_id", help="site_id/event_id (as a partner's webhook-id), or a bare event id (every site's event with it)"
    )
    parser.add_argument("--site", help="the event's site, when the id is given without one")
    parser.add_argument(
        "--edge-admin",
        action="append",
        default=[],
        metavar="URL",
        help="an edge service's admin API (repeat per site; default $EDGE_ADMIN_URL)",
    )
    parser.add_argument(
        "--forwarder-state",
        action="append",
        default=[],
        metavar="DIR",
        help="a site's forwarder state directory, to search its quarantine (repeat per site)",
    )
    parser.add_argument(
        "--consumer-db",
        default=os.environ.get("PIPELINE_CONSUMER_DB"),
        metavar="PATH",
        help="the priority consumer's DuckDB file (default $PIPELINE_CONSUMER_DB)",
    )
    parser.add_argument(
        "--around",
        type=_parse_time,
        help="roughly when the event happened (UTC, ISO 8601), when its id is not a UUIDv7",
    )
    parser.add_argument(
        "--peek-limit",
        type=int,
        default=PEEK_LIMIT,
        metavar="N",
        help=f"messages looked at per SQS queue (default {PEEK_LIMIT}; 0: do not peek at queues)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    stack = load_stack_config()
    bucket = os.environ.get("PIPELINE_ARCHIVE_BUCKET", stack.archive.bucket)
    admin_urls = args.edge_admin or ([os.environ["EDGE_ADMIN_URL"]] if os.environ.get("EDGE_ADMIN_URL") else [])
    sqs = aws_client("sqs") if args.peek_limit > 0 else None
    queues = known_queues(sqs, stack=stack) if sqs is not None else QueueSet()
    site_id, event_id = split_event_ref(args.event_id)
    trace = trace_event(
        event_id,
        site_id=site_id or args.site,
        filesystem=s3_filesystem(),
        bucket=bucket,
        landing_prefix=stack.archive.landing_prefix,
        edge_admin_urls=admin_urls,
        forwarder_dirs=args.forwarder_state,
        around=args.around,
        sqs=sqs,
        queues=queues,
        peek_limit=args.peek_limit,
        s3=aws_client("s3"),
        consumer_db=args.consumer_db,
    )
    print(trace.to_json() if args.json else trace.render())
    return 0 if any(s.found for s in trace.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
