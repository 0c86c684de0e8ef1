"""Dagster wiring of reconciliation (the legs and their comparison are in `pipeline.reconciliation`).

The asset check `reconciles_edge_drain_archive` runs on each hourly archive partition after every
compaction of it (`archive_hour_job` selects the asset, and so its checks): late events landing in an
hour re-compact it (`archive_hours_sensor`), and so re-check it. `reconciliation_sensor` re-runs the
compaction, and with it the check, when an hour settles and when an edge manifest of a settled hour
changes (an edge sending an hour late, after an outage), since neither lands anything by itself.

Each run pushes `pipeline_reconciliation_mismatch{site, hour}` (the largest gap between two legs) for
the sites that disagree, or deletes the hour's group when they all agree; `ReconciliationMismatch`
alerts on it.
"""

import json
import logging
import os
from datetime import UTC, datetime, timedelta

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    DefaultSensorStatus,
    Definitions,
    MetadataValue,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    asset_check,
    sensor,
)
from prometheus_client import CollectorRegistry, Gauge, delete_from_gateway, push_to_gateway

from edge_bridge.envelope import utc_now
from edge_bridge.manifest import EDGE_MANIFEST_PREFIX
from pipeline import metrics
from pipeline.archive import hour_key, landing_has_files, parse_hour_key
from pipeline.assets import ARCHIVE_ASSET
from pipeline.partitions import archive_hourly_partitions
from pipeline.reconciliation import DEFAULT_SETTLE_MINUTES, HourReconciliation, mismatch_size, reconcile_hour
from pipeline.resources import ArchiveStore
from pipeline.sensors import ARCHIVE_HOUR_TAG, archive_job

log = logging.getLogger(__name__)

PUSH_JOB = "pipeline_reconciliation"
DEFAULT_LOOKBACK_HOURS = 48


def lookback_hours() -> int:
    """How far back (in event hours) the sensor looks for changed edge manifests: a listing of that many hours' keys."""
    return int(os.environ.get("PIPELINE_RECONCILIATION_LOOKBACK_HOURS", DEFAULT_LOOKBACK_HOURS))


def settle_minutes() -> float:
    return float(os.environ.get("PIPELINE_RECONCILIATION_SETTLE_MINUTES", DEFAULT_SETTLE_MINUTES))


def push_mismatches(result: HourReconciliation) -> bool:
    """One Pushgateway group per hour: the disagreeing sites' gaps, or no group at all once they agree."""
    url = metrics.pushgateway_url()
    if not url:
        return False
    group = {"hour": f"{parse_hour_key(result.hour):%Y-%m-%dT%H}"}
    try:
        if result.passed:
            delete_from_gateway(url, job=PUSH_JOB, grouping_key=group, timeout=5)
            return True
        registry = CollectorRegistry()
        gauge = Gauge(
            "pipeline_reconciliation_mismatch",
            "Largest gap between edge-sent, drained and archived counts of a site in an hour (0: they agree)",
            ["site"],
            registry=registry,
        )
        for site in result.disagreeing:
            gauge.labels(site=site.site_id).set(mismatch_size(site))
        push_to_gateway(url, job=PUSH_JOB, registry=registry, grouping_key=group, timeout=5)
        return True
    except OSError as exc:
        log.warning("could not push reconciliation to %s: %s", url, exc)
        return False


@asset_check(
    asset=ARCHIVE_ASSET,
    partitions_def=archive_hourly_partitions,
    description=(
        "Per site: messages the edge sent = messages drained, and events drained = events archived (unique). "
        "The edge leg is judged once the hour has settled (its end + PIPELINE_RECONCILIATION_SETTLE_MINUTES); "
        "events still buffered at the edge are reported, not counted as missing."
    ),
)
def reconciles_edge_drain_archive(context: AssetCheckExecutionContext, archive: ArchiveStore) -> AssetCheckResult:
    hour = context.partition_key
    result = reconcile_hour(
        archive.get_client(), archive.filesystem(), archive.bucket, hour, utc_now(), settle_minutes()
    )
    push_mismatches(result)
    for site in result.disagreeing:
        context.log.error(f"site {site.site_id}, hour {hour}: {'; '.join(site.problems)}")
    return AssetCheckResult(
        passed=result.passed,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "hour": hour,
            "settled": result.settled,
            "settles_at": result.settles_at.isoformat(),
            "disagreeing": ", ".join(f"{s.site_id} @ {hour}" for s in result.disagreeing) or "none",
            "sites": MetadataValue.json([s.as_metadata() for s in result.sites]),
            "edge_sent": sum(s.edge_sent or 0 for s in result.sites),
            "edge_buffered": sum(s.edge_buffered for s in result.sites),
            "drained_messages": sum(s.drained_messages for s in result.sites),
            "drained_events": sum(s.drained_events for s in result.sites),
            "archived": sum(s.archived for s in result.sites),
        },
    )


def _edge_manifests_since(s3, bucket: str, first_hour: datetime, since: str) -> tuple[dict[str, str], str]:
    """Hours whose edge manifests changed after `since` (ISO time) -> their newest change; and the newest seen."""
    changed: dict[str, str] = {}
    newest = since
    kwargs = {
        "Bucket": bucket,
        "Prefix": f"{EDGE_MANIFEST_PREFIX}/hour=",
        "StartAfter": f"{EDGE_MANIFEST_PREFIX}/hour={first_hour:%Y-%m-%dT%H}",
    }
    for page in s3.get_paginator("list_objects_v2").paginate(**kwargs):
        for obj in page.get("Contents", []):
            modified = obj["LastModified"].astimezone(UTC).isoformat(timespec="microseconds")
            if datetime.fromisoformat(modified) <= datetime.fromisoformat(since):
                continue
            newest = max(newest, modified)
            stamp = obj["Key"][len(EDGE_MANIFEST_PREFIX) + len("/hour=") :].split("/", 1)[0]
            hour = datetime.strptime(stamp, "%Y-%m-%dT%H").replace(tzinfo=UTC).strftime("%Y-%m-%d-%H:00")
            changed[hour] = max(changed.get(hour, ""), modified)
    return changed, newest


def reconciliation_requests(s3, bucket: str, landing_prefix: str, now: datetime, cursor: dict) -> tuple[list, dict]:
    """Archive runs (and so checks) for the hours that settled since the cursor and for settled hours whose
    edge manifests changed; returns the run requests and the new cursor."""
    settle = timedelta(minutes=settle_minutes())
    newest_settled = parse_hour_key(hour_key(now - settle - timedelta(hours=1)))
    first = now - timedelta(hours=lookback_hours())
    # The first tick checks the newest settled hour; later ones every hour settled since.
    hour = (
        parse_hour_key(cursor["settled_through"]) + timedelta(hours=1)
        if "settled_through" in cursor
        else newest_settled
    )
    hour = max(hour, parse_hour_key(hour_key(first)))
    edge_seen = cursor.get("edge_seen", now.isoformat())
    wanted: dict[str, str] = {}
    while hour <= newest_settled:
        key = hour_key(hour)
        if archive_hourly_partitions.has_partition_key(key) and landing_has_files(s3, bucket, landing_prefix, key):
            wanted[key] = "settled"
        hour += timedelta(hours=1)
    changed, edge_seen = _edge_manifests_since(s3, bucket, first, edge_seen)
    for key, modified in changed.items():
        if parse_hour_key(key) <= newest_settled and archive_hourly_partitions.has_partition_key(key):
            wanted.setdefault(key, f"edge-{modified}")
    requests = [
        RunRequest(run_key=f"reconcile-{key}-{why}", partition_key=key, tags={ARCHIVE_HOUR_TAG: key})
        for key, why in sorted(wanted.items())
    ]
    return requests, {"settled_through": hour_key(newest_settled), "edge_seen": edge_seen}


@sensor(job=archive_job, minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING)
def reconciliation_sensor(context: SensorEvaluationContext, archive: ArchiveStore):
    """Re-check an hour once it settles, and whenever an edge manifest of a settled hour changes.

    Its look: one listing call per newly settled hour and a paged listing of the last day's edge manifests.
    """
    cursor = json.loads(context.cursor) if context.cursor else {}
    requests, new_cursor = reconciliation_requests(
        archive.get_client(), archive.bucket, archive.landing_prefix, utc_now(), cursor
    )
    if not requests:
        return SensorResult(
            skip_reason="no hour settled and no settled hour's edge manifest changed", cursor=json.dumps(new_cursor)
        )
    return SensorResult(run_requests=requests, cursor=json.dumps(new_cursor))


defs = Definitions(asset_checks=[reconciles_edge_drain_archive], sensors=[reconciliation_sensor])
