"""Software-defined assets: the landing area (written by drain runs) and the hourly Parquet archive."""


from dagster import AssetExecutionContext, AssetSpec, Definitions, MaterializeResult, asset

from pipeline.archive import compact_hour
from pipeline.jobs import LANDING_ASSET
from pipeline.partitions import archive_hourly_partitions
from pipeline.resources import ArchiveStore

events_landing = AssetSpec(
    LANDING_ASSET,
    partitions_def=archive_hourly_partitions,
    group_name="archive",
    kinds={"s3", "parquet"},
    description="Micro-batches of events as drain runs take them from SQS (at-least-once), by event hour.",
)


@asset(
    partitions_def=archive_hourly_partitions,
    deps=[events_landing],
    group_name="archive",
    kinds={"s3", "parquet"},
    tags={"pipeline/archive": "compaction"},
    description="Every event exactly once, as year=/month=/day=/hour=/events_NNNN.parquet sorted by event time.",
)
def events_archive(context: AssetExecutionContext, archive: ArchiveStore) -> MaterializeResult:
    result = compact_hour(archive.filesystem(), archive.bucket, archive.landing_prefix, context.partition_key)
    context.log.info(f"hour {result.hour}: {result.archived_rows} events from {result.landing_files} landing files")
    return MaterializeResult(
        metadata={
            "rows": result.archived_rows,
            "landing_rows": result.landing_rows,
            "duplicates_dropped": result.duplicates_dropped,
            "landing_files": result.landing_files,
            "files": [f"s3://{p}" for p in result.files],
            "bytes": result.bytes_written,
        }
    )


defs = Definitions(assets=[events_landing, events_archive])
