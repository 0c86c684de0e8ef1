"""`python -m pipeline.quarantine list | show | release`: what the cloud quarantined, and putting it back.

Every cloud stage that refuses a message (the drain's parse and destinations, the events-dlq replay)
writes it with its reason under `s3://<archive bucket>/quarantine/<date>/<run>.<stage>.jsonl`, one JSON
line per message with the body it came with. An operator reads those here and, once the cause is
fixed (a contract bug, a partner limit raised), releases a line: its body goes back to the `events`
queue and drains like any other message. Downstream dedupe by (site_id, event_id) makes a release
that was already routed in part harmless. A release is recorded next to the quarantine
(`quarantine-released/…`), so `list` shows it and a second release of the same line is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from edge_bridge.envelope import format_ts, utc_now
from pipeline.drain import QUARANTINE_PREFIX

RELEASED_PREFIX = "quarantine-released"


@dataclass(frozen=True)
class Entry:
    """One quarantined message: `ref` (`<object key>:<line>`) names it for `show` and `release`."""

    key: str
    line: int
    record: dict

    @property
    def ref(self) -> str:
        return f"{self.key}:{self.line}"

    @property
    def marker(self) -> str:
        return f"{RELEASED_PREFIX}/{hashlib.sha256(self.ref.encode()).hexdigest()}.json"


def entries(s3, bucket: str, date: str | None = None) -> Iterator[Entry]:
    """Every quarantined message (paged listing), oldest object first; `date` is `YYYY-MM-DD`."""
    prefix = f"{QUARANTINE_PREFIX}/{date}/" if date else f"{QUARANTINE_PREFIX}/"
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            text = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode("utf-8", "replace")
            for n, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = {"reason": "unreadable_quarantine_line", "body": line}
                yield Entry(obj["Key"], n, record)


def find(s3, bucket: str, ref: str) -> Entry:
    key, _, line = ref.rpartition(":")
    if not key or not line.isdigit():
        raise ValueError(f"{ref!r} is not <object key>:<line>")
    try:
        for entry in entries_of(s3, bucket, key):
            if entry.line == int(line):
                return entry
    except s3.exceptions.NoSuchKey:
        raise LookupError(f"no object s3://{bucket}/{key}") from None
    raise LookupError(f"no line {line} in s3://{bucket}/{key}")


def entries_of(s3, bucket: str, key: str) -> Iterator[Entry]:
    text = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8", "replace")
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield Entry(key, n, json.loads(line))


def released(s3, bucket: str, entry: Entry) -> dict | None:
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=entry.marker)["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


def release(s3, sqs, bucket: str, events_url: str, entry: Entry, fifo: bool = False) -> str:
    """Send the entry's body back to `events`, then record the release; returns the new message id."""
    if released(s3, bucket, entry) is not None:
        raise RuntimeError(f"{entry.ref} was released already")
    body = entry.record.get("body")
    if not isinstance(body, str) or not body:
        raise ValueError(f"{entry.ref} kept no body to release")
    params = {"QueueUrl": events_url, "MessageBody": body}
    if fifo:
        params["MessageGroupId"] = entry.record.get("site_id") or "released"
        params["MessageDeduplicationId"] = hashlib.sha256(entry.ref.encode()).hexdigest()
    message_id = sqs.send_message(**params)["MessageId"]
    marker = {
        "ref": entry.ref,
        "released_at": format_ts(utc_now()),
        "message_id": message_id,
        "reason": entry.record.get("reason"),
    }
    s3.put_object(Bucket=bucket, Key=entry.marker, Body=json.dumps(marker).encode())
    return message_id


def _summary(entry: Entry, marker: dict | None) -> str:
    r = entry.record
    who = "/".join(str(r[k]) for k in ("site_id", "event_id") if r.get(k)) or r.get("message_id", "-")
    state = f"released {marker['released_at']}" if marker else "held"
    return (
        f"{entry.ref}\t{r.get('stage', '-')}\t{r.get('reason', '-')}\t{who}\t{state}\t{str(r.get('detail', ''))[:80]}"
    )


def main(argv: list[str] | None = None) -> int:
    from pipeline.stack import aws_client, load_stack_config, queue_url

    parser = argparse.ArgumentParser(prog="python -m pipeline.quarantine", description=__doc__.splitlines()[0])
    parser.add_argument("--bucket", help="archive bucket (default: config/stack.yaml archive.bucket)")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser(
        "list", help="one line per quarantined message: ref, stage, reason, site/event, state, detail"
    )
    listing.add_argument("--date", help="YYYY-MM-DD (default: every date)")
    listing.add_argument("--reason")
    listing.add_argument("--stage")
    show = sub.add_parser("show", help="the whole record of one message, body included")
    show.add_argument("ref", help="<object key>:<line>, as `list` prints it")
    put_back = sub.add_parser("release", help="send messages back to the events queue (after fixing the cause)")
    put_back.add_argument("refs", nargs="+")
    args = parser.parse_args(argv)

    stack = load_stack_config()
    bucket = args.bucket or stack.archive.bucket
    s3 = aws_client("s3")
    if args.command == "list":
        for entry in entries(s3, bucket, args.date):
            if (args.reason and entry.record.get("reason") != args.reason) or (
                args.stage and entry.record.get("stage") != args.stage
            ):
                continue
            print(_summary(entry, released(s3, bucket, entry)))
        return 0
    if args.command == "show":
        entry = find(s3, bucket, args.ref)
        print(json.dumps({"ref": entry.ref, **entry.record, "released": released(s3, bucket, entry)}, indent=2))
        return 0
    sqs = aws_client("sqs")
    events_url = queue_url(stack.events_queue.queue_name)
    failed = 0
    for ref in args.refs:
        try:
            message_id = release(s3, sqs, bucket, events_url, find(s3, bucket, ref), fifo=stack.events_queue.fifo)
            print(f"released {ref} -> events (message {message_id})")
        except (LookupError, ValueError, RuntimeError) as exc:
            failed += 1
            print(f"not released {ref}: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
