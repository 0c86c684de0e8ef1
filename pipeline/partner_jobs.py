"""Partner delivery wiring: one run per partner with work waiting, and the partner redelivery schedule.

A run delivers a single partner's queue (pipeline.routing.delivery), so a partner that is down or
slow occupies only its own run; the sensor never starts a second run for a partner that has one.
Each run is tagged with the partner's current contract version (`pipeline/contract_version`), and its
metadata counts what was delivered under each version, so a contract change shows in the run list and
a queue still holding bodies made under the previous contract shows in the run.

With the express lane on, a partner subscribed to a high-priority type is delivered by a long-running
run instead (kept alive by the same sensor, handed over before it ends): it long-polls the partner's
queue, so an alarm the express lane queued is posted within moments, not after a tick and a launch.
"""

import time

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

from pipeline import express_jobs
from pipeline.express_jobs import ExpressSettings, keep_alive
from pipeline.metrics import push_gauges
from pipeline.resources import ArchiveStore, RoutingSettings, SQSResource
from pipeline.routing.delivery import PartnerDelivery, PartnerQueues, redeliver_partner_dlq
from pipeline.routing.logs import AttemptLog
from pipeline.sensors import IN_PROGRESS

PARTNER_TAG = "pipeline/partner"
CONTRACT_TAG = "pipeline/contract_version"
LONG_RUNNING_TAG = "pipeline/long_running"  # a long-running delivery run (express lane on)


class PartnerRunConfig(Config):
    partner: str
    run_seconds: float | None = None  # set: a long-running run (express lane on); unset: until the queue is empty


def _queues(sqs: SQSResource, partner) -> PartnerQueues:
    return PartnerQueues(sqs.queue_url(partner.queue_name), sqs.queue_url(partner.dlq_name))


@op
def deliver_partner_queue(
    context: OpExecutionContext,
    config: PartnerRunConfig,
    sqs: SQSResource,
    archive: ArchiveStore,
    routing: RoutingSettings,
) -> dict:
    """POST this partner's queued events (signed); failures wait in SQS for the next delay of the list."""
    if config.run_seconds:
        return _deliver_until(context, config.partner, config.run_seconds, sqs, archive, routing)
    settings = routing.load()
    partner = settings.partner(config.partner)
    attempt_log = AttemptLog(archive.filesystem(), archive.bucket, tag=f"{context.run_id}-")
    delivery = PartnerDelivery(partner, sqs.get_client(), _queues(sqs, partner), settings.retry_delays_s, attempt_log)
    stats = delivery.run(max_seconds=routing.delivery_run_seconds)
    push_gauges(
        "pipeline_partner_delivery",
        {
            "partner_delivery_success_rate": (
                "Delivered attempts / all attempts in the partner's latest delivery run",
                stats.success_rate,
            )
        },
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
    return {
        "delivered": stats.delivered,
        "failed": stats.failed,
        "dead_lettered": stats.dead_lettered,
        "malformed": stats.malformed,
    }


def _push_success_rate(partner: str, rate: float) -> None:
    push_gauges(
        "pipeline_partner_delivery",
        {
            "partner_delivery_success_rate": (
                "Delivered attempts / all attempts in the partner's latest delivery run",
                rate,
            )
        },
        labels={"partner": partner},
        grouping_key={"partner": partner},
    )


def _deliver_until(
    context: OpExecutionContext,
    name: str,
    run_seconds: float,
    sqs: SQSResource,
    archive: ArchiveStore,
    routing: RoutingSettings,
) -> dict:
    """A long-running delivery run: rounds of a minute that long-poll the partner's queue without stopping
    when it is empty. Each round reads the routing config again and pushes its success rate, so the run's
    contract and its gauge never lag by more than a minute."""
    deadline = time.monotonic() + run_seconds
    attempt_log = AttemptLog(archive.filesystem(), archive.bucket, tag=f"{context.run_id}-")
    totals = {"delivered": 0, "failed": 0, "dead_lettered": 0, "malformed": 0}
    while (remaining := deadline - time.monotonic()) > 0:
        settings = routing.load()
        partner = settings.partner(name)
        delivery = PartnerDelivery(
            partner, sqs.get_client(), _queues(sqs, partner), settings.retry_delays_s, attempt_log
        )
        stats = delivery.run(
            max_seconds=min(60.0, remaining), stop_when_idle=False, wait_time_s=max(1, min(20, int(remaining)))
        )
        if stats.attempts:
            _push_success_rate(partner.name, stats.success_rate)
        for key in totals:
            totals[key] += getattr(stats, key)
        context.log.info(
            f"{name}: {stats.delivered} delivered, {stats.failed} failed attempts, {stats.dead_lettered} dead-lettered, {stats.malformed} malformed this minute"
        )
    attempts = totals["delivered"] + totals["failed"] + totals["dead_lettered"]
    context.add_output_metadata(
        {
            **totals,
            "success_rate": totals["delivered"] / attempts if attempts else 1.0,
            "attempt_log_files": len(attempt_log.written),
        }
    )
    return totals


@job(
    executor_def=in_process_executor,
    description="Deliver one partner's queue by signed webhook, with SQS-held backoff.",
)
def partner_delivery_job():
    deliver_partner_queue()


@sensor(job=partner_delivery_job, minimum_interval_seconds=5, default_status=DefaultSensorStatus.RUNNING)
def partner_queues_sensor(context: SensorEvaluationContext, sqs: SQSResource, routing: RoutingSettings):
    """One delivery run per partner whose queue has visible messages and that has no run going; with the
    express lane on, a long-running one kept alive for each partner subscribed to a high-priority type."""
    client, requests, waiting = sqs.get_client(), [], []
    settings, express = routing.load(), ExpressSettings.from_env()
    for partner in settings.partners:
        if express.queue_name() and any(settings.priority.for_event_type(t) == "high" for t in partner.subscriptions):
            tags = {PARTNER_TAG: partner.name, LONG_RUNNING_TAG: "true"}
            if (
                keep_alive(context, partner_delivery_job.name, tags, express.run_seconds, express.handover_seconds)
                is None
            ):
                waiting.append(partner.name)
                continue
            config = {"partner": partner.name, "run_seconds": express.run_seconds}
            requests.append(
                RunRequest(
                    run_config={"ops": {"deliver_partner_queue": {"config": config}}},
                    tags={**tags, CONTRACT_TAG: partner.contract_version},
                )
            )
            continue
        url = sqs.queue_url(partner.queue_name)
        visible = int(
            client.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"][
                "ApproximateNumberOfMessages"
            ]
        )
        if not visible:
            continue
        running = context.instance.get_runs_count(
            RunsFilter(job_name=partner_delivery_job.name, statuses=IN_PROGRESS, tags={PARTNER_TAG: partner.name})
        )
        if running:
            waiting.append(partner.name)
            continue
        requests.append(
            RunRequest(
                run_config={"ops": {"deliver_partner_queue": {"config": {"partner": partner.name}}}},
                tags={
                    PARTNER_TAG: partner.name,
                    CONTRACT_TAG: partner.contract_version,
                    "pipeline/partner_queue_depth": str(visible),
                },
            )
        )
    if requests:
        return requests
    return SkipReason(f"no partner queue needs a new run (already delivering: {waiting or 'none'})")


@op
def redeliver_partner_dlqs(
    context: OpExecutionContext, sqs: SQSResource, archive: ArchiveStore, routing: RoutingSettings
) -> dict:
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


@job(
    executor_def=in_process_executor,
    description="Move each partner's DLQ back to its queue once the partner answers again.",
)
def partner_redelivery_job():
    redeliver_partner_dlqs()


partner_redelivery_schedule = ScheduleDefinition(
    job=partner_redelivery_job,
    cron_schedule="*/15 * * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Every 15 minutes: a partner back from an outage gets its dead-lettered events within a quarter hour.",
)

defs = Definitions.merge(
    Definitions(
        jobs=[partner_delivery_job, partner_redelivery_job],
        sensors=[partner_queues_sensor],
        schedules=[partner_redelivery_schedule],
    ),
    express_jobs.defs,  # the express lane feeds the long-running partner runs; its definitions travel with them
)
