"""Partner delivery wiring: one run per partner with work waiting, and the partner redelivery schedule.

A run delivers a single partner's queue (pipeline.routing.delivery), so a partner that is down or
slow occupies only its own run; the sensor never starts a second run for a partner that has one.
Each run is tagged with the partner's current contract version (`pipeline/contract_version`), and its
metadata counts what was delivered under each version, so a contract change shows in the run list and
a queue still holding bodies made under the previous contract shows in the run.
"""

from dagster import (
    Config,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Definitions,
    MetadataValue,
    OpExecutionContext,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    SensorEvaluationContext,
    SkipReason,
    in_process_executor,
    job,
    op,
    sensor,
)

from pipeline.metrics import push_gauges
from pipeline.resources import ArchiveStore, RoutingSettings, SQSResource
from pipeline.routing.delivery import PartnerDelivery, PartnerQueues, redeliver_partner_dlq
from pipeline.routing.logs import AttemptLog
from pipeline.sensors import IN_PROGRESS

PARTNER_TAG = "pipeline/partner"
CONTRACT_TAG = "pipeline/contract_version"


class PartnerRunConfig(Config):
    partner: str


def _queues(sqs: SQSResource, partner) -> PartnerQueues:
    return PartnerQueues(sqs.queue_url(partner.queue_name), sqs.queue_url(partner.dlq_name))


@op
def deliver_partner_queue(context: OpExecutionContext, config: PartnerRunConfig, sqs: SQSResource, archive: ArchiveStore, routing: RoutingSettings) -> dict:
    """POST this partner's queued events (signed); failures wait in SQS for the next delay of the list."""
    settings = routing.load()
    partner = settings.partner(config.partner)
    attempt_log = AttemptLog(archive.filesystem(), archive.bucket, tag=f"{context.run_id}-")
    delivery = PartnerDelivery(partner, sqs.get_client(), _queues(sqs, partner), settings.retry_delays_s, attempt_log)
    stats = delivery.run(max_seconds=routing.delivery_run_seconds)
    push_gauges(
        "pipeline_partner_delivery",
        {"partner_delivery_success_rate": ("Delivered attempts / all attempts in the partner's latest delivery run", stats.success_rate)},
        labels={"partner": partner.name},
        grouping_key={"partner": partner.name},
    )
    context.add_output_metadata(
        {
            "contract_version": partner.contract_version,
            "delivered_by_contract": MetadataValue.json(stats.delivered_by_contract),
            "delivered": stats.delivered,
            "failed_attempts": stats.failed,
            "dead_lettered": stats.dead_lettered,
            "malformed": stats.malformed,
            "malformed_reasons": MetadataValue.json(stats.malformed_reasons),
            "success_rate": stats.success_rate,
            "errors": MetadataValue.json(stats.errors),
            "attempt_log_files": len(attempt_log.written),
        }
    )
    return {"delivered": stats.delivered, "failed": stats.failed, "dead_lettered": stats.dead_lettered, "malformed": stats.malformed}


@job(executor_def=in_process_executor, description="Deliver one partner's queue by signed webhook, with SQS-held backoff.")
def partner_delivery_job():
    deliver_partner_queue()


@sensor(job=partner_delivery_job, minimum_interval_seconds=5, default_status=DefaultSensorStatus.RUNNING)
def partner_queues_sensor(context: SensorEvaluationContext, sqs: SQSResource, routing: RoutingSettings):
    """One delivery run per partner whose queue has visible messages and that has no run going."""
    client, requests, waiting = sqs.get_client(), [], []
    for partner in routing.load().partners:
        url = sqs.queue_url(partner.queue_name)
        visible = int(client.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]["ApproximateNumberOfMessages"])
        if not visible:
            continue
        running = context.instance.get_runs_count(RunsFilter(job_name=partner_delivery_job.name, statuses=IN_PROGRESS, tags={PARTNER_TAG: partner.name}))
        if running:
            waiting.append(partner.name)
            continue
        requests.append(
            RunRequest(run_config={"ops": {"deliver_partner_queue": {"config": {"partner": partner.name}}}}, tags={PARTNER_TAG: partner.name, CONTRACT_TAG: partner.contract_version, "pipeline/partner_queue_depth": str(visible)})
        )
    if requests:
        return requests
    return SkipReason(f"no partner queue needs a new run (already delivering: {waiting or 'none'})")


@op
def redeliver_partner_dlqs(context: OpExecutionContext, sqs: SQSResource, archive: ArchiveStore, routing: RoutingSettings) -> dict:
    """Probe each partner with a dead-lettered event; whoever accepts it gets its DLQ back.

    Poison messages (dead-lettered for their own fault) stay in the DLQ and are listed in the metadata.
    """
    attempt_log = AttemptLog(archive.filesystem(), archive.bucket, tag=f"{context.run_id}-")
    moved, poison = {}, {}
    for partner in routing.load().partners:
        try:
            report = redeliver_partner_dlq(partner, sqs.get_client(), _queues(sqs, partner), attempt_log)
        except Exception as exc:  # one partner's trouble must not keep the others' DLQs in place
            context.log.error(f"{partner.name}: redelivery failed: {exc}")
            continue
        context.log.info(f"{partner.name}: {report.reason} (moved {report.moved})")
        moved[partner.name] = report.moved
        if report.poison:
            context.log.warning(f"{partner.name}: {len(report.poison)} poison messages stay in {partner.dlq_name}")
            poison[partner.name] = report.poison[:200]
    context.add_output_metadata({"moved": MetadataValue.json(moved), "poison": MetadataValue.json(poison)})
    return moved


@job(executor_def=in_process_executor, description="Move each partner's DLQ back to its queue once the partner answers again.")
def partner_redelivery_job():
    redeliver_partner_dlqs()


partner_redelivery_schedule = ScheduleDefinition(
    job=partner_redelivery_job,
    cron_schedule="*/15 * * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Every 15 minutes: a partner back from an outage gets its dead-lettered events within a quarter hour.",
)

defs = Definitions(jobs=[partner_delivery_job, partner_redelivery_job], sensors=[partner_queues_sensor], schedules=[partner_redelivery_schedule])
