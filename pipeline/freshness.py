"""Archive freshness measured from the data: how long the oldest landed-but-unarchived event has waited.

A gauge pushed only when a compaction succeeds stops moving exactly when compaction stops, so the lag
is read from the bucket instead, on a timer (`archive_freshness_sensor`) that runs whether or not
compaction does. A landing file counts as archived when its hour's archive files were written after
it (compaction rewrites an hour's files from all of its landing files). The look is bounded: one
paged listing of the landing area over the last `lookback_hours`, one listing per hour that has landing
files, and the Parquet footer of the single oldest unarchived file (its ingested_at statistics).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
from pyarrow import fs

from pipeline import metrics
from pipeline.archive import archive_dir, parse_hour_key

log = logging.getLogger(__name__)

DEFAULT_LOOKBACK_HOURS = 24
MAX_LANDING_PAGES = 50  # 50,000 landing files: a day at a few hundred drain windows an hour
# The freshness gauge's own Pushgateway group: its push_time_seconds is the timer's heartbeat, and a
# compaction's push (job pipeline_archive, no instance) cannot replace it.
PUSH_JOB = "pipeline_archive"
PUSH_GROUP = {"instance": "freshness"}


@dataclass
class Freshness:
    """What the timer saw: the lag, and where it came from."""

    lag_minutes: float
    unarchived_files: int
    oldest_file: str | None  # bucket key of the oldest unarchived landing file
    hours_listed: int
    truncated: bool  # the listing stopped at MAX_LANDING_PAGES


def lookback_hours() -> int:
    return int(os.environ.get("PIPELINE_FRESHNESS_LOOKBACK_HOURS", DEFAULT_LOOKBACK_HOURS))


def _hour_of(key: str, landing_prefix: str) -> str | None:
    """`landing/hour=2026-12-01T08/x.parquet` -> `2026-12-01-08:00` (the partition key)."""
    rest = key[len(landing_prefix) + 1 :]
    if not rest.startswith("hour=") or "/" not in rest:
        return None
    try:
        return datetime.strptime(rest[5:].split("/", 1)[0], "%Y-%m-%dT%H").strftime("%Y-%m-%d-%H:00")
    except ValueError:
        return None


def _oldest_ingested_at(filesystem: fs.FileSystem | None, bucket: str, key: str) -> datetime | None:
    """The smallest ingested_at in one landing file, from its footer statistics (no row is read)."""
    if filesystem is None:
        return None
    try:
        meta = pq.read_metadata(f"{bucket}/{key}", filesystem=filesystem)
        column = meta.schema.to_arrow_schema().get_field_index("ingested_at")
        values = [meta.row_group(i).column(column).statistics for i in range(meta.num_row_groups)]
        mins = [s.min for s in values if s is not None and s.has_min_max]
    except (OSError, ValueError) as exc:
        log.warning("could not read the footer of %s: %s", key, exc)
        return None
    if not mins:
        return None
    oldest = min(mins)
    return oldest if oldest.tzinfo else oldest.replace(tzinfo=UTC)


def measure_archive_freshness(
    s3_client,
    bucket: str,
    landing_prefix: str,
    now: datetime,
    filesystem: fs.FileSystem | None = None,
    lookback: int | None = None,
) -> Freshness:
    """The age in minutes of the oldest event landed but not yet archived (0 when everything is).

    Hours after `now`'s hour are left out: events stamped ahead of the clock wait for their hour to
    open, by design. The age is from the event's ingested_at when the footer says, else from when its
    landing file was written.
    """
    lookback = lookback_hours() if lookback is None else lookback
    first = now.astimezone(UTC) - timedelta(hours=lookback)
    current_hour = now.astimezone(UTC).strftime("%Y-%m-%d-%H:00")
    landing: dict[str, list[tuple[datetime, str]]] = {}
    kwargs = {
        "Bucket": bucket,
        "Prefix": f"{landing_prefix}/hour=",
        "StartAfter": f"{landing_prefix}/hour={first:%Y-%m-%dT%H}",
        "MaxKeys": 1000,
    }
    truncated = False
    for _ in range(MAX_LANDING_PAGES):
        page = s3_client.list_objects_v2(**kwargs)
        for obj in page.get("Contents", []):
            hour = _hour_of(obj["Key"], landing_prefix)
            if (
                hour is not None
                and parse_hour_key(hour) <= parse_hour_key(current_hour)
                and obj["Key"].endswith(".parquet")
            ):
                landing.setdefault(hour, []).append((obj["LastModified"], obj["Key"]))
        if not page.get("IsTruncated"):
            break
        kwargs["ContinuationToken"] = page["NextContinuationToken"]
    else:
        truncated = True
    unarchived: list[tuple[datetime, str]] = []
    for hour, files in landing.items():
        prefix = archive_dir(bucket, hour).split("/", 1)[1] + "/"
        archived = s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=100).get("Contents", [])
        compacted_at = min((obj["LastModified"] for obj in archived), default=None)
        unarchived += [(written, key) for written, key in files if compacted_at is None or written > compacted_at]
    if not unarchived:
        return Freshness(0.0, 0, None, len(landing), truncated)
    written, key = min(unarchived)
    ingested = _oldest_ingested_at(filesystem, bucket, key)
    since = min(written, ingested) if ingested else written
    lag = max(0.0, (now - since).total_seconds() / 60)
    return Freshness(lag, len(unarchived), key, len(landing), truncated)


def push_archival_lag(freshness: Freshness) -> bool:
    """Push archival_lag_minutes in the freshness group (the Pushgateway stamps its push_time_seconds)."""
    return metrics.push_gauges(
        PUSH_JOB,
        {
            "archival_lag_minutes": (
                "Minutes the oldest event landed but not yet archived has waited since a drain run took it from SQS",
                freshness.lag_minutes,
            )
        },
        grouping_key=PUSH_GROUP,
    )
