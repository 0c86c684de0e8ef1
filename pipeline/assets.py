"""Software-defined assets: the landing area (written by drain runs), the hourly Parquet archive with
its checks, and the routing logs that dbt reads next to the archive."""

import os

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    AssetSpec,
    DagsterInstance,
    Definitions,
    MaterializeResult,
    MetadataValue,
    asset,
)

from edge_bridge.envelope import utc_now
from pipeline import freshness, metrics
from pipeline.archive import ARCHIVE_SCHEMA, audit_hour, compact_hour
from pipeline.jobs import LANDING_ASSET
from pipeline.partitions import archive_hourly_partitions
from pipeline.resources import ArchiveStore

ARCHIVE_ASSET = AssetKey("events_archive")
DEFAULT_ARCHIVAL_LAG_LIMIT_MINUTES = 90.0

events_landing = AssetSpec(
    LANDING_ASSET,
    partitions_def=archive_hourly_partitions,
    group_name="archive",
    kinds={"s3", "parquet"},
    description="Micro-batches of events as drain runs take them from SQS (at-least-once), by event hour.",
)

# Written by the routing layer (partner delivery workers, priority consumers); declared here so that the
# dbt sources over them map onto the same lineage graph as the archive.
delivery_attempts = AssetSpec(
    "delivery_attempts",
    group_name="routing_logs",
    kinds={"s3", "parquet"},
    description="One row per partner webhook delivery attempt: s3://<archive bucket>/delivery_attempts/date=YYYY-MM-DD/*.parquet.",
)
priority_handled = AssetSpec(
    "priority_handled",
    group_name="routing_logs",
    kinds={"s3", "parquet"},
    description="One row per event handled by a priority consumer: s3://<archive bucket>/priority_handled/date=YYYY-MM-DD/*.parquet.",
)

CHECKS = [
    AssetCheckSpec(
        "no_duplicate_event_ids",
        asset=ARCHIVE_ASSET,
        description="Each event, (site_id, event_id), appears once in the hour's archive files (an event id is unique only within its site).",
    ),
    AssetCheckSpec(
        "reconciles_with_landing",
        asset=ARCHIVE_ASSET,
        description="Archived (site_id, event_id) == the unique ones of the landing files, and landing rows cover what drain runs reported landing.",
    ),
    AssetCheckSpec(
        "schema_and_version",
        asset=ARCHIVE_ASSET,
        description="Files carry ARCHIVE_SCHEMA and only known envelope major versions.",
    ),
    AssetCheckSpec(
        "archival_lag",
        asset=ARCHIVE_ASSET,
        description="archival_lag_minutes: the oldest newly archived event waited less than the limit between SQS and the archive.",
    ),
]


def drained_rows_reported(instance: DagsterInstance, hour: str) -> int | None:
    """Rows that drain runs reported landing for this hour (their landing materializations), if any."""
    total, cursor, seen = 0, None, False
    while True:
        page = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=LANDING_ASSET, asset_partitions=[hour]), limit=1000, cursor=cursor
        )
        for record in page.records:
            rows = record.asset_materialization.metadata.get("rows") if record.asset_materialization else None
            if rows is not None:
                total, seen = total + int(rows.value), True
        if not page.has_more:
            return total if seen else None
        cursor = page.cursor


def archival_lag_limit_minutes() -> float:
    return float(os.environ.get("PIPELINE_ARCHIVAL_LAG_LIMIT_MINUTES", DEFAULT_ARCHIVAL_LAG_LIMIT_MINUTES))


@asset(
    key=ARCHIVE_ASSET,
    partitions_def=archive_hourly_partitions,
    deps=[events_landing],
    group_name="archive",
    kinds={"s3", "parquet"},
    tags={"pipeline/archive": "compaction"},
    check_specs=CHECKS,
    description="Every event exactly once, as year=/month=/day=/hour=/events_NNNN.parquet sorted by event time.",
)
def events_archive(context: AssetExecutionContext, archive: ArchiveStore) -> MaterializeResult:
    hour = context.partition_key
    filesystem = archive.filesystem()
    result = compact_hour(filesystem, archive.bucket, archive.landing_prefix, hour)
    audit = audit_hour(filesystem, archive.bucket, hour, expected_keys=result.archived_keys)
    reported = drained_rows_reported(context.instance, hour)
    context.log.info(
        f"hour {hour}: {result.archived_rows} events ({result.newly_archived} new) from {result.landing_files} landing files, "
        f"{len(result.files)} archive files, lag {result.archival_lag_minutes:.1f} min"
    )
    metrics.push_gauges(
        "pipeline_archive",
        {
            "parquet_files_written": (
                "Parquet files written by the last compaction of an archive hour",
                len(result.files),
            )
        },
    )
    # The gauge is the data's lag (archive_freshness_sensor pushes it every minute); a compaction
    # refreshes it at once, since it has just changed what is unarchived.
    if metrics.pushgateway_url():
        freshness.push_archival_lag(
            freshness.measure_archive_freshness(
                archive.get_client(), archive.bucket, archive.landing_prefix, utc_now(), filesystem
            )
        )
    lag_limit = archival_lag_limit_minutes()
    landing_covers_reports = reported is None or result.landing_rows >= reported
    checks = [
        AssetCheckResult(
            check_name="no_duplicate_event_ids",
            passed=audit.duplicates == 0,
            metadata={"rows": audit.rows, "distinct_events": audit.distinct_events, "duplicates": audit.duplicates},
        ),
        AssetCheckResult(
            check_name="reconciles_with_landing",
            passed=audit.missing_events == 0 and audit.unexpected_events == 0 and landing_covers_reports,
            metadata={
                "landing_rows": result.landing_rows,
                "landing_unique_events": result.archived_rows,
                "archived_rows": audit.rows,
                "missing_events": audit.missing_events,
                "unexpected_events": audit.unexpected_events,
                "rows_reported_by_drain_runs": reported if reported is not None else "unknown",
            },
        ),
        AssetCheckResult(
            check_name="schema_and_version",
            passed=not audit.schema_problems and not audit.unsupported_versions,
            metadata={
                "schema_versions": MetadataValue.json(audit.versions),
                "unsupported_versions": MetadataValue.json(audit.unsupported_versions),
                "problems": MetadataValue.json(audit.schema_problems),
                "columns": ", ".join(ARCHIVE_SCHEMA.names),
            },
        ),
        AssetCheckResult(
            check_name="archival_lag",
            passed=result.archival_lag_minutes <= lag_limit,
            severity=AssetCheckSeverity.WARN,
            metadata={
                "archival_lag_minutes": result.archival_lag_minutes,
                "limit_minutes": lag_limit,
                "newly_archived": result.newly_archived,
            },
        ),
    ]
    return MaterializeResult(
        metadata={
            "rows": result.archived_rows,
            "landing_rows": result.landing_rows,
            "duplicates_dropped": result.duplicates_dropped,
            "newly_archived": result.newly_archived,
            "landing_files": result.landing_files,
            "parquet_files_written": len(result.files),
            "files": [f"s3://{p}" for p in result.files],
            "bytes": result.bytes_written,
            "archival_lag_minutes": result.archival_lag_minutes,
        },
        check_results=checks,
    )


defs = Definitions(assets=[events_landing, events_archive, delivery_attempts, priority_handled])
