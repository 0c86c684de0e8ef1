"""Replaying the cloud `events-dlq` into `events`, with the reason each message had failed.

SQS does not say why a message was dead-lettered, so drain runs that fail record it themselves
(`drain_failures/date=…/<run>.jsonl` in the archive bucket: message ids, the error and its scope);
replay joins on the message id, which SQS keeps when it redrives. No record means the run died without
a word (killed, out of memory), and the report says so.

Not everything goes back. Each of these is written to the cloud quarantine (`s3://<archive bucket>/
quarantine/<date>/<run>-<batch>.events_dlq_replay.jsonl`, the drain's format, with its reason) and
deleted from the DLQ, because sending it back would only fail the same way:
- a message that is not a valid envelope (any `EnvelopeRejected`, the reason is the envelope's own),
  or a claim-check pointer the pipeline did not make or whose object does not match it;
- a message whose failure record has scope "message": the drain saw it fail for a reason of its own
  (`failed_on_its_own`, with the recorded step and error);
- a message already replayed `max_replays` times (`replayed_too_often`): the replay stamps a
  `replay_count` attribute on what it sends back, which SQS keeps through the next redrive, so
  whatever keeps failing it, it is not retried every night for ever.
Everything else failed with its window for a shared cause and goes back to `events`. Only a shared
failure (S3 or SQS refusing a call) leaves a batch in place, with nothing of it deleted. Into a FIFO
`events` queue each message goes in its site's group (`pipeline.routing.fifo`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta

from botocore.exceptions import BotoCoreError, ClientError

from edge_bridge.claim_check import verify_and_fetch
from edge_bridge.envelope import EnvelopeRejected, claim_check_pointer, parse_envelope, utc_now
from pipeline.drain import quarantine_key, quarantine_line, write_quarantine
from pipeline.routing import fifo

log = logging.getLogger(__name__)
FAILURES_PREFIX = "drain_failures"
NO_RECORD = "no failure record: the drain run died before it could say why (killed or timed out)"
STAGE = "events_dlq_replay"
REPLAY_COUNT = "replay_count"  # message attribute: how many times the replay has sent this message back
MAX_REPLAYS = 3


@dataclass(frozen=True)
class DrainFailure:
    step: str
    error: str
    scope: str = "window"  # "window": the run failed for all its messages; "message": for this one's own reason

    def __str__(self) -> str:
        return f"{self.step}: {self.error}"


@dataclass
class ReplayReport:
    moved: int = 0
    reasons: Counter = field(default_factory=Counter)
    items: list[dict] = field(default_factory=list)  # what went back, each with why it had failed
    quarantined: list[dict] = field(default_factory=list)  # what was skipped, each with its reason
    quarantine_keys: list[str] = field(default_factory=list)


def record_drain_failure(
    s3, bucket: str, run_id: str, step: str, message_ids: list[str], error: str, scope: str = "window"
) -> str:
    """Say why a drain step failed for these messages; `scope="message"` when the step blames each one alone."""
    key = f"{FAILURES_PREFIX}/date={utc_now():%Y-%m-%d}/{run_id}-{step}.jsonl"
    lines = [
        json.dumps({"message_id": m, "step": step, "error": error[:2000], "run_id": run_id, "scope": scope})
        for m in message_ids
    ]
    s3.put_object(Bucket=bucket, Key=key, Body="\n".join(lines).encode())
    return key


def load_failure_reasons(s3, bucket: str, days: int = 15, today: date | None = None) -> dict[str, DrainFailure]:
    """message_id -> its recorded drain failure, from the records of the last `days` days (SQS keeps 14)."""
    today = today or utc_now().date()
    reasons: dict[str, DrainFailure] = {}
    paginator = s3.get_paginator("list_objects_v2")
    for offset in range(days, -1, -1):
        prefix = f"{FAILURES_PREFIX}/date={today - timedelta(days=offset):%Y-%m-%d}/"
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                for line in s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode().splitlines():
                    rec = json.loads(line)
                    reasons[rec["message_id"]] = DrainFailure(rec["step"], rec["error"], rec.get("scope", "window"))
    return reasons


@dataclass(frozen=True)
class _Verdict:
    message: dict
    event_id: str | None = None
    site_id: str | None = None
    event_type: str | None = None
    skip: tuple[str, str, str] | None = None  # (reason, error type, detail) when it must not go back


def _replays(message: dict) -> int:
    value = (message.get("MessageAttributes") or {}).get(REPLAY_COUNT, {}).get("StringValue", "0")
    return int(value) if value.isdigit() else 0


def _judge(message: dict, failure: DrainFailure | None, s3, claim_check_bucket: str, max_replays: int) -> _Verdict:
    """Whether one DLQ message may go back to `events`; S3 being unreachable raises (a shared cause)."""
    body = message["Body"]
    try:
        pointer = claim_check_pointer(body)
        event = parse_envelope(verify_and_fetch(s3, body, bucket=claim_check_bucket) if pointer is not None else body)
    except EnvelopeRejected as exc:
        return _Verdict(message, skip=(exc.reason, type(exc).__name__, exc.detail))
    except (BotoCoreError, ClientError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever else it is, it is this message's alone
        return _Verdict(
            message, skip=("unexpected_error", type(exc).__name__, f"{type(exc).__name__}: {str(exc)[:300]}")
        )
    skip = None
    if failure is not None and failure.scope == "message":
        skip = ("failed_on_its_own", "DrainFailure", str(failure)[:2000])
    elif _replays(message) >= max_replays:
        skip = (
            "replayed_too_often",
            "DrainFailure",
            f"dead-lettered again after {_replays(message)} replays; last failure: {failure or NO_RECORD}"[:2000],
        )
    return _Verdict(message, event.event_id, event.site_id, event.event_type, skip)


def replay_events_dlq(
    sqs,
    dlq_url: str,
    events_url: str,
    failure_reasons: dict[str, DrainFailure],
    *,
    s3,
    archive_bucket: str,
    claim_check_bucket: str,
    run_id: str,
    max_replays: int = MAX_REPLAYS,
    max_messages: int = 100_000,
) -> ReplayReport:
    """Move the DLQ back to `events` (send first, then delete), quarantining what can never drain."""
    report = ReplayReport()
    batch_no = 0
    while report.moved + len(report.quarantined) < max_messages:
        batch = sqs.receive_message(
            QueueUrl=dlq_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0,
            VisibilityTimeout=120,
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
            MessageAttributeNames=[REPLAY_COUNT],
        ).get("Messages", [])
        if not batch:
            break
        batch_no += 1
        verdicts = [_judge(m, failure_reasons.get(m["MessageId"]), s3, claim_check_bucket, max_replays) for m in batch]
        skipped = [v for v in verdicts if v.skip]
        if skipped:
            lines = [
                quarantine_line(
                    STAGE,
                    *v.skip,
                    v.message["Body"],
                    message_id=v.message["MessageId"],
                    site_id=v.site_id,
                    event_id=v.event_id,
                )
                for v in skipped
            ]
            key = quarantine_key(f"{run_id}-{batch_no:05d}", STAGE, utc_now())
            write_quarantine(s3, archive_bucket, key, lines)  # durable before anything leaves the DLQ
            _delete(sqs, dlq_url, [v.message for v in skipped])
            report.quarantine_keys.append(key)
            for v in skipped:
                reason, _, detail = v.skip
                report.quarantined.append(
                    {
                        "message_id": v.message["MessageId"],
                        "event_id": v.event_id,
                        "reason": reason,
                        "detail": detail[:500],
                    }
                )
                report.reasons[f"quarantined: {reason}"] += 1
        back = [v for v in verdicts if not v.skip]
        if not back:
            continue
        entries = [
            {
                "Id": str(i),
                "MessageBody": v.message["Body"],
                "MessageAttributes": {
                    REPLAY_COUNT: {"DataType": "Number", "StringValue": str(_replays(v.message) + 1)}
                },
                **fifo.send_fields(events_url, v.message["Body"], v.message["MessageId"]),
            }
            for i, v in enumerate(back)
        ]
        response = sqs.send_message_batch(QueueUrl=events_url, Entries=entries)
        sent = [back[int(e["Id"])] for e in sorted(response.get("Successful", []), key=lambda e: int(e["Id"]))]
        _delete(sqs, dlq_url, [v.message for v in sent])
        for v in sent:
            failure = failure_reasons.get(v.message["MessageId"])
            reason = str(failure) if failure else NO_RECORD
            report.items.append(
                {
                    "message_id": v.message["MessageId"],
                    "event_id": v.event_id,
                    "event_type": v.event_type,
                    "reason": reason,
                }
            )
            report.reasons[failure.step if failure else NO_RECORD] += 1
        report.moved += len(sent)
        if len(sent) < len(back):
            log.warning(
                "%d DLQ messages could not be sent back now; they stay for the next replay", len(back) - len(sent)
            )
            break
    return report


def _delete(sqs, url: str, messages: list[dict]) -> None:
    if messages:
        response = sqs.delete_message_batch(
            QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
        )
        for failure in response.get("Failed", []):  # it comes back at the next replay, and is judged again
            log.warning("delete from the DLQ failed: %s", failure)
