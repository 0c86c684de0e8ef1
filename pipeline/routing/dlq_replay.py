"""Replaying the cloud `events-dlq` into `events`, with the reason each message had failed.

SQS does not say why a message was dead-lettered, so drain runs that fail record it themselves
(`drain_failures/date=…/<run>.jsonl` in the archive bucket: message ids and the error); replay joins on
the message id, which SQS keeps when it redrives. No record means the run died without a word
(killed, out of memory), and the report says so.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta

from edge_bridge.envelope import EnvelopeRejected, parse_envelope, utc_now

log = logging.getLogger(__name__)
FAILURES_PREFIX = "drain_failures"
NO_RECORD = "no failure record: the drain run died before it could say why (killed or timed out)"


@dataclass
class ReplayReport:
    moved: int = 0
    reasons: Counter = field(default_factory=Counter)
    items: list[dict] = field(default_factory=list)


def record_drain_failure(s3, bucket: str, run_id: str, step: str, message_ids: list[str], error: str) -> str:
    key = f"{FAILURES_PREFIX}/date={utc_now():%Y-%m-%d}/{run_id}-{step}.jsonl"
    lines = [json.dumps({"message_id": m, "step": step, "error": error[:2000], "run_id": run_id}) for m in message_ids]
    s3.put_object(Bucket=bucket, Key=key, Body="\n".join(lines).encode())
    return key


def load_failure_reasons(s3, bucket: str, days: int = 15, today: date | None = None) -> dict[str, str]:
    """message_id -> "step: error" from the failure records of the last `days` days (SQS keeps 14)."""
    today = today or utc_now().date()
    reasons: dict[str, str] = {}
    paginator = s3.get_paginator("list_objects_v2")
    for offset in range(days, -1, -1):
        prefix = f"{FAILURES_PREFIX}/date={today - timedelta(days=offset):%Y-%m-%d}/"
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                for line in s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode().splitlines():
                    rec = json.loads(line)
                    reasons[rec["message_id"]] = f"{rec['step']}: {rec['error']}"
    return reasons


def replay_events_dlq(sqs, dlq_url: str, events_url: str, failure_reasons: dict[str, str], max_messages: int = 100_000) -> ReplayReport:
    """Move every DLQ message back to `events` (send first, then delete) and say why each had failed."""
    report = ReplayReport()
    while report.moved < max_messages:
        batch = sqs.receive_message(
            QueueUrl=dlq_url, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=120, MessageSystemAttributeNames=["ApproximateReceiveCount"]
        ).get("Messages", [])
        if not batch:
            break
        response = sqs.send_message_batch(QueueUrl=events_url, Entries=[{"Id": str(i), "MessageBody": m["Body"]} for i, m in enumerate(batch)])
        sent = sorted(int(e["Id"]) for e in response.get("Successful", []))
        if sent:
            sqs.delete_message_batch(QueueUrl=dlq_url, Entries=[{"Id": str(i), "ReceiptHandle": batch[i]["ReceiptHandle"]} for i in sent])
        for i in sent:
            message = batch[i]
            try:
                event = parse_envelope(message["Body"])
                event_id, event_type = event.event_id, event.event_type
                reason = failure_reasons.get(message["MessageId"], NO_RECORD)
            except EnvelopeRejected as exc:
                event_id = event_type = None
                reason = f"invalid envelope ({exc.reason}); the drain will quarantine it"
            report.items.append({"message_id": message["MessageId"], "event_id": event_id, "event_type": event_type, "reason": reason})
            report.reasons[reason.split(":")[0] if reason != NO_RECORD else NO_RECORD] += 1
        report.moved += len(sent)
        if len(sent) < len(batch):
            log.warning("%d DLQ messages could not be sent back now; they stay for the next replay", len(batch) - len(sent))
            break
    return report
