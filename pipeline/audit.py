"""What did partner X receive between T1 and T2, under which contract? (`python -m pipeline.audit`)

The attempt log (`delivery_attempts/`) keeps, for every webhook POST, the SHA-256 and size of the exact
bytes sent, the webhook-id, site, signature timestamp and the contract version the body was made under.
The archive keeps every event once, and the contract history (`partner_contracts/`) every contract
version a body was ever made under. Together they re-create each body byte for byte: the audit reads
the event back from its archive hour, applies that version's transform, and checks that the result
hashes to what was logged, so "this is what they got" is a proof, not a reconstruction.

    python -m pipeline.audit security-monitoring --from 2024-01-15T00:00:00Z --to 2024-01-16T00:00:00Z
    python -m pipeline.audit security-monitoring --from ... --to ... --bodies   # print each body too
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from functools import lru_cache

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from pyarrow import fs

from pipeline.archive import read_archive_hour
from pipeline.archive_range import ReplayRangeError, envelopes_from_archive, parse_utc
from pipeline.routing.config import CONTRACT_RULES
from pipeline.routing.contracts import ContractHistory, ContractHistoryError
from pipeline.routing.destinations import partner_body_text
from pipeline.routing.logs import DELIVERY_ATTEMPT_SCHEMA
from pipeline.routing.transform import PartnerTransform

log = logging.getLogger(__name__)

DELIVERY_ATTEMPTS = "delivery_attempts"
MAX_AUDIT_DAYS = 93


@dataclass
class AuditedAttempt:
    """One logged POST to the partner, and whether its body could be re-created from archive + contract."""

    attempted_at: datetime
    webhook_id: str | None
    event_id: str
    site_id: str | None
    attempt: int
    outcome: str
    status_code: int | None
    contract_version: str | None
    body_sha256: str | None
    body_bytes: int | None
    webhook_timestamp: datetime | None
    archive_hour: str | None
    # "match" (re-created body hashes to the logged one), "mismatch", "unavailable" (why in `detail`),
    # or "not_checked"
    recreated: str = "not_checked"
    detail: str = ""
    body: str | None = None  # the re-created body, when it matched

    def line(self) -> str:
        status = self.status_code if self.status_code is not None else "-"
        sha = (self.body_sha256 or "-")[:16]
        check = self.recreated + (f" ({self.detail})" if self.detail else "")
        return f"{self.attempted_at:%Y-%m-%dT%H:%M:%SZ}  {self.webhook_id or self.event_id}  #{self.attempt} {self.outcome} {status}  contract {self.contract_version or '-'}  sha256 {sha}  {self.body_bytes if self.body_bytes is not None else '-'} B  {check}"


@dataclass
class PartnerAudit:
    partner: str
    start: datetime
    end: datetime
    attempts: list[AuditedAttempt] = field(default_factory=list)

    @property
    def delivered(self) -> list[AuditedAttempt]:
        return [a for a in self.attempts if a.outcome == "delivered"]

    @property
    def by_contract(self) -> dict[str, int]:
        """Delivered bodies per contract version."""
        return dict(Counter(a.contract_version or "unknown" for a in self.delivered))

    @property
    def mismatches(self) -> list[AuditedAttempt]:
        return [a for a in self.attempts if a.recreated == "mismatch"]

    def render(self) -> str:
        lines = [
            f"partner {self.partner}, attempts from {self.start.isoformat()} to {self.end.isoformat()} (end excluded)"
        ]
        lines += [f"  {a.line()}" for a in self.attempts]
        checks = Counter(a.recreated for a in self.attempts)
        lines.append(
            f"{len(self.attempts)} attempts, {len(self.delivered)} delivered; delivered per contract {self.by_contract}; re-created {dict(checks)}"
        )
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(
            {
                "partner": self.partner,
                "start": self.start.isoformat(),
                "end": self.end.isoformat(),
                "attempts": [asdict(a) for a in self.attempts],
            },
            default=str,
            indent=2,
        )


def _days(start: datetime, end: datetime) -> list[date]:
    day, days = start.date(), []
    while day <= end.date():
        days.append(day)
        day += timedelta(days=1)
    return days


def read_attempts(filesystem: fs.FileSystem, bucket: str, partner: str, start: datetime, end: datetime) -> pa.Table:
    """The partner's logged attempts with start <= attempted_at < end, read from those dates' files only.

    Files written before the audit columns existed read with those columns null."""
    files = []
    for day in _days(start, end):
        selector = fs.FileSelector(f"{bucket}/{DELIVERY_ATTEMPTS}/date={day:%Y-%m-%d}", allow_not_found=True)
        files += sorted(info.path for info in filesystem.get_file_info(selector) if info.path.endswith(".parquet"))
    if not files:
        return DELIVERY_ATTEMPT_SCHEMA.empty_table()
    table = ds.dataset(files, schema=DELIVERY_ATTEMPT_SCHEMA, filesystem=filesystem, format="parquet").to_table()
    ts = table.column("attempted_at")
    keep = pc.and_(
        pc.equal(table.column("partner"), partner),
        pc.and_(pc.greater_equal(ts, pa.scalar(start, ts.type)), pc.less(ts, pa.scalar(end, ts.type))),
    )
    return table.filter(keep).sort_by([("attempted_at", "ascending"), ("attempt", "ascending")])


class BodyRecreator:
    """Re-creates a logged body from the archive and the contract history, one archive hour read once."""

    def __init__(self, filesystem: fs.FileSystem, bucket: str, history: ContractHistory, partner: str) -> None:
        self.filesystem, self.bucket, self.history, self.partner = filesystem, bucket, history, partner
        self._hour = lru_cache(maxsize=8)(self._read_hour)
        self._transform = lru_cache(maxsize=32)(self._load_transform)

    def _read_hour(self, hour: str) -> dict[tuple[str, str], dict]:
        table = read_archive_hour(self.filesystem, self.bucket, hour)
        return {(e.site_id, e.event_id): e.to_wire() for e in envelopes_from_archive(table, [])}

    def _load_transform(self, version: str) -> PartnerTransform:
        contract = self.history.load(self.partner, version)
        if contract.rules != CONTRACT_RULES:
            raise ContractHistoryError(
                f"contract {version} was made under transform rules {contract.rules}; this code applies rules {CONTRACT_RULES}"
            )
        return PartnerTransform(contract)

    def check(self, attempt: AuditedAttempt) -> None:
        """Set `attempt.recreated` (and `body` on a match)."""
        missing = [
            name
            for name in ("contract_version", "archive_hour", "site_id", "body_sha256")
            if getattr(attempt, name) is None
        ]
        if missing:
            attempt.recreated, attempt.detail = (
                "unavailable",
                f"logged without {', '.join(missing)} (before the audit columns)",
            )
            return
        try:
            transform = self._transform(attempt.contract_version)
        except ContractHistoryError as exc:
            attempt.recreated, attempt.detail = "unavailable", str(exc)
            return
        wire = self._hour(attempt.archive_hour).get((attempt.site_id, attempt.event_id))
        if wire is None:
            attempt.recreated, attempt.detail = (
                "unavailable",
                f"not in archive hour {attempt.archive_hour} (not compacted yet?)",
            )
            return
        body = partner_body_text(transform.apply(wire))
        if hashlib.sha256(body.encode("utf-8")).hexdigest() == attempt.body_sha256:
            attempt.recreated, attempt.body = "match", body
        else:
            attempt.recreated, attempt.detail = "mismatch", "the archived event under this contract gives another body"


def audit_partner(
    filesystem: fs.FileSystem, s3, bucket: str, partner: str, start: datetime, end: datetime, recreate: bool = True
) -> PartnerAudit:
    """Every logged attempt to `partner` in [start, end), each body re-created and checked when `recreate`."""
    if end <= start:
        raise ReplayRangeError(f"end {end.isoformat()} is not after start {start.isoformat()}")
    if end - start > timedelta(days=MAX_AUDIT_DAYS):
        raise ReplayRangeError(f"{end - start} is longer than {MAX_AUDIT_DAYS} days; audit it in several runs")
    report = PartnerAudit(partner, start, end)
    recreator = BodyRecreator(filesystem, bucket, ContractHistory(s3, bucket), partner) if recreate else None
    for row in read_attempts(filesystem, bucket, partner, start, end).to_pylist():
        attempt = AuditedAttempt(**{name: row[name] for name in AuditedAttempt.__dataclass_fields__ if name in row})
        if recreator is not None:
            recreator.check(attempt)
        report.attempts.append(attempt)
    return report


def main(argv: list[str] | None = None) -> int:
    from pipeline.stack import aws_client, load_stack_config, s3_filesystem

    parser = argparse.ArgumentParser(prog="python -m pipeline.audit", description=__doc__.splitlines()[0])
    parser.add_argument("partner", help="the partner's name in config/routing.yaml")
    parser.add_argument(
        "--from",
        dest="start",
        required=True,
        type=parse_utc,
        help="first attempt time to include, UTC ISO 8601 (2024-01-15T00:00:00Z)",
    )
    parser.add_argument(
        "--to", dest="end", required=True, type=parse_utc, help="attempts before this time are included (exclusive)"
    )
    parser.add_argument(
        "--no-recreate", action="store_true", help="list the log only; do not re-create bodies from the archive"
    )
    parser.add_argument("--bodies", action="store_true", help="print each re-created body under its attempt")
    parser.add_argument("--json", action="store_true", help="machine-readable output (bodies included)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    bucket = os.environ.get("PIPELINE_ARCHIVE_BUCKET", load_stack_config().archive.bucket)
    try:
        report = audit_partner(
            s3_filesystem(), aws_client("s3"), bucket, args.partner, args.start, args.end, recreate=not args.no_recreate
        )
    except ReplayRangeError as exc:
        parser.error(str(exc))
    if args.json:
        print(report.to_json())
    else:
        print(report.render())
        if args.bodies:
            for attempt in report.attempts:
                if attempt.body is not None:
                    print(
                        f"\n{attempt.webhook_id} #{attempt.attempt} (contract {attempt.contract_version}):\n{attempt.body}"
                    )
    return 1 if report.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
