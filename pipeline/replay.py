"""The 02:00 replay of the cloud `events-dlq` into `events`, reporting what moved and why it had failed."""

from collections import Counter

from dagster import DefaultScheduleStatus, Definitions, MetadataValue, OpExecutionContext, ScheduleDefinition, in_process_executor, job, op

from pipeline.resources import ArchiveStore, SQSResource
from pipeline.routing.dlq_replay import load_failure_reasons, replay_events_dlq
from pipeline.stack import load_stack_config


@op
def replay_events_dlq_into_events(context: OpExecutionContext, sqs: SQSResource, archive: ArchiveStore) -> int:
    """Send every events-dlq message back to events; the report joins each with its recorded failure."""
    queue = load_stack_config().events_queue
    reasons = load_failure_reasons(archive.get_client(), archive.bucket)
    report = replay_events_dlq(sqs.get_client(), sqs.queue_url(queue.dlq_name), sqs.queue_url(), reasons)
    for reason, count in report.reasons.most_common():
        context.log.info(f"{count} replayed: {reason}")
    context.add_output_metadata(
        {
            "moved": report.moved,
            "reasons": MetadataValue.json(dict(Counter(report.reasons))),
            "messages": MetadataValue.json(report.items[:500]),
        }
    )
    return report.moved


@job(executor_def=in_process_executor, description="Replay events-dlq into events and report why each message had failed.")
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
