"""Sensors: cheap looks at the world that decide which runs to launch; the heavy work is in runs."""

import json

from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    Definitions,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    in_process_executor,
    sensor,
)

from edge_bridge.envelope import utc_now
from pipeline import drain, freshness
from pipeline.archive import landing_has_files
from pipeline.assets import events_archive
from pipeline.jobs import DRAIN_TAG, LANDING_ASSET, drain_events_job
from pipeline.partitions import archive_hourly_partitions
from pipeline.resources import ArchiveStore, DrainSettings, SQSResource

IN_PROGRESS = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]
ARCHIVE_HOUR_TAG = "pipeline/archive_hour"

archive_job = define_asset_job(
    "archive_hour_job",
    selection=[events_archive],
    description="Compact one hour of landing files into the exactly-once archive partition.",
    executor_def=in_process_executor,
)


# The daemon evaluates sensors in a loop of at least 5 s (Dagster's floor); a minimum interval of 5 s as
# well would let a loop that comes round a moment early skip this sensor, and a waiting event wait 10 s.
@sensor(job=drain_events_job, minimum_interval_seconds=1, default_status=DefaultSensorStatus.RUNNING)
def events_queue_sensor(context: SensorEvaluationContext, sqs: SQSResource, drain_settings: DrainSettings):
    """Launch drain runs while the events queue has visible messages, at most N at a time."""
    visible, in_flight = drain.queue_depth(sqs.get_client(), sqs.queue_url())
    if visible == 0:
        return SkipReason(f"events queue is empty ({in_flight} in flight)")
    running = context.instance.get_runs_count(RunsFilter(job_name=drain_events_job.name, statuses=IN_PROGRESS))
    free = drain_settings.max_concurrent_runs - running
    if free <= 0:
        return SkipReason(f"{visible} messages waiting; {running} drain runs already in progress")
    wanted = min(free, -(-visible // drain_settings.window_messages))
    return [RunRequest(tags={DRAIN_TAG: "events", "pipeline/queue_depth": str(visible)}) for _ in range(wanted)]


def _latest_hour() -> str | None:
    """The newest archive partition (the hour in progress); a function so tests can move the clock."""
    return archive_hourly_partitions.get_last_partition_key()


@sensor(job=archive_job, minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING)
def archive_hours_sensor(context: SensorEvaluationContext, archive: ArchiveStore):
    """Re-compact every hour that received landing files since the last tick (late events included).

    The run key names the hour and the newest landing materialization seen for it, so a tick that
    is retried does not launch the same compaction twice, while new data always triggers a new one.
    Events stamped ahead of the clock land before their hour is a partition (no materialization can
    name it yet); when that hour opens, the sensor looks for its landing files once and compacts them.
    """
    state = json.loads(context.cursor) if context.cursor else {}
    result = context.instance.fetch_materializations(
        LANDING_ASSET, limit=1000, cursor=state.get("events"), ascending=True
    )
    newest: dict[str, int] = {}
    for record in result.records:
        key = record.partition_key
        if key and archive_hourly_partitions.has_partition_key(key):
            newest[key] = max(newest.get(key, 0), record.storage_id)
    requests = [
        RunRequest(run_key=f"archive-{hour}-{storage_id}", partition_key=hour, tags={ARCHIVE_HOUR_TAG: hour})
        for hour, storage_id in sorted(newest.items())
    ]
    latest = _latest_hour()
    if latest and latest != state.get("latest_hour") and latest not in newest:
        if landing_has_files(archive.get_client(), archive.bucket, archive.landing_prefix, latest):
            context.log.info(f"hour {latest} opened with events already landed for it")
            requests.append(
                RunRequest(run_key=f"archive-{latest}-opened", partition_key=latest, tags={ARCHIVE_HOUR_TAG: latest})
            )
    cursor = json.dumps({"events": result.cursor, "latest_hour": latest})
    if not requests:
        return SensorResult(skip_reason="no new landing files", cursor=cursor)
    return SensorResult(run_requests=requests, cursor=cursor)


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING)
def archive_freshness_sensor(context: SensorEvaluationContext, archive: ArchiveStore):
    """Every minute, push archival_lag_minutes as read from the bucket (see pipeline.freshness).

    A timer of its own, so the lag keeps growing while compaction fails, is blocked or never runs;
    it launches nothing, and its look is a bounded listing plus one Parquet footer.
    """
    seen = freshness.measure_archive_freshness(
        archive.get_client(), archive.bucket, archive.landing_prefix, utc_now(), archive.filesystem()
    )
    pushed = freshness.push_archival_lag(seen)
    where = (
        f"oldest unarchived landing file {seen.oldest_file} of {seen.unarchived_files}"
        if seen.oldest_file
        else "nothing landed is waiting"
    )
    more = " (listing truncated)" if seen.truncated else ""
    return SkipReason(
        f"archival lag {seen.lag_minutes:.1f} min over {seen.hours_listed} hours{more}: {where}; {'pushed' if pushed else 'not pushed'}"
    )


defs = Definitions(
    jobs=[drain_events_job, archive_job], sensors=[events_queue_sensor, archive_hours_sensor, archive_freshness_sensor]
)
