"""The 02:00 replay of the cloud `events-dlq` into `events`, reporting what moved, what was quarantined
instead (poison: it could never drain), and why each had failed."""

from collections import Counter

from dagster import (
    DefaultScheduleStatus,
    Definitions,
    MetadataValue,
    OpExecutionContext,
    ScheduleDefinition,
    in_process_executor,
    job,
    op,
)

from pipeline.resources import ArchiveStore, SQSResource
from pipeline.routing.dlq_replay import load_failure_reasons, replay_events_dlq
from pipeline.stack import load_stack_config


@op
def replay_events_dlq_into_events(context: OpExecutionContext, sqs: SQSResource, archive: ArchiveStore) -> int:
    """Send events-dlq messages back to events, joined with their recorded failure; quarantine the poison."""
    stack = load_stack_config()
    s3 = archive.get_client()
    reasons = load_failure_reasons(s3, archive.bucket)
    report = replay_events_dlq(
        sqs.get_client(),
        sqs.queue_url(stack.events_queue.dlq_name),
        sqs.queue_url(),
        reasons,
        s3=s3,
        archive_bucket=archive.bucket,
        claim_check_bucket=stack.claim_check.bucket,
        run_id=context.run_id,
    )
    for reason, count in report.reasons.most_common():
        context.log.info(f"{count}: {reason}")
    if report.quarantined:
        context.log.warning(
            f"{len(report.quarantined)} poison messages quarantined instead of replayed: {', '.join(f's3://{archive.bucket}/{k}' for k in report.quarantine_keys)}"
        )
    context.add_output_metadata(
        {
            "moved": report.moved,
            "quarantined": len(report.quarantined),
            "reasons": MetadataValue.json(dict(Counter(report.reasons))),
            "messages": MetadataValue.json(report.items[:500]),
            "skipped": MetadataValue.json(report.quarantined[:500]),
            "quarantine_objects": MetadataValue.json([f"s3://{archive.bucket}/{k}" for k in report.quarantine_keys]),
        }
    )
    return report.moved


@job(
    executor_def=in_process_executor,
    description="Replay events-dlq into events, quarantine what can never drain, and report why each message had failed.",
)
def events_dlq_replay_job():
    replay_events_dlq_into_events()


events_dlq_replay_schedule = ScheduleDefinition(
    job=events_dlq_replay_job,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    description="02:00 UTC daily, the quiet hour: dead-lettered events get another drain after the day's fixes, and the report says why each had failed.",
)

defs = Definitions(jobs=[events_dlq_replay_job], schedules=[events_dlq_replay_schedule])
