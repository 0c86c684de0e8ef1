"""The express lane's Dagster wiring: one long-running run routes alarms from the express queue, kept alive
by a sensor, so an alarm does not wait for a sensor tick and a run launch the way a drain window does.

An operator sees the lane as a run of `express_lane_job` (its log reports what it routed every minute,
its metadata the totals) and stops it by turning `express_lane_sensor` off and terminating the run. A run
lasts `run_seconds` and the sensor starts its successor `handover_seconds` before that, so a new
deployment takes over within the hour and the lane is never down between two runs.
"""

import os
import time
from dataclasses import dataclass

from dagster import (
    DefaultSensorStatus,
    Definitions,
    MetadataValue,
    OpExecutionContext,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    in_process_executor,
    job,
    op,
    sensor,
)

from pipeline.resources import ArchiveStore, RoutingSettings, SQSResource
from pipeline.routing.contracts import ContractHistory
from pipeline.routing.destinations import QueueLimits
from pipeline.routing.express import CLIENT_CONFIG, ExpressLane, ExpressStats, routing_reloader
from pipeline.sensors import IN_PROGRESS
from pipeline.stack import aws_client

EXPRESS_TAG = "pipeline/express_lane"


@dataclass(frozen=True)
class ExpressSettings:
    """Where the express lane reads, and how long one of its runs lasts, from the environment when a tick
    or run reads them (the partner sensor needs them too, so they are not a resource of one job).

    `queue` (PIPELINE_EXPRESS_QUEUE) names the queue the edge services send alarms to
    (EDGE_EXPRESS_QUEUE_URL); unset, there is no express lane, and partners are delivered by one run per
    window of waiting events, as for every other type.
    """

    queue: str | None = None
    run_seconds: float = 3600.0
    handover_seconds: float = 60.0
    wait_time_s: int = 20

    @classmethod
    def from_env(cls) -> "ExpressSettings":
        return cls(
            queue=os.environ.get("PIPELINE_EXPRESS_QUEUE") or None,
            run_seconds=float(os.environ.get("PIPELINE_EXPRESS_RUN_SECONDS") or 3600),
        )

    def queue_name(self) -> str | None:
        return self.queue


def keep_alive(
    context: SensorEvaluationContext, job_name: str, tags: dict[str, str], run_seconds: float, handover_seconds: float
) -> str | None:
    """Why a new long-running run is needed now (none in progress, or the newest ends within the
    handover), or None when one is running and has time left. A run not started yet counts as new."""
    records = context.instance.get_run_records(RunsFilter(job_name=job_name, statuses=IN_PROGRESS, tags=tags))
    if not records:
        return "none running"
    now = time.time()
    newest = max(record.start_time or now for record in records)
    if now - newest >= run_seconds - handover_seconds:
        return f"the newest run ends within {handover_seconds:.0f} s: its successor takes over"
    return None


def _describe(stats: ExpressStats) -> str:
    calls = sum(stats.sqs_calls.values())
    return f"routed {stats.routed} of {stats.received} received (partners {stats.partner_messages}), {stats.not_high} not high, {stats.unreadable} unreadable, refused {stats.refused}, {stats.failed_batches} failed rounds, {calls} SQS calls"


@op
def route_express_lane(
    context: OpExecutionContext, sqs: SQSResource, archive: ArchiveStore, routing: RoutingSettings
) -> dict:
    """Route alarms from the express queue to their priority queue and partners until the run's time is up."""
    express = ExpressSettings.from_env()
    name = express.queue_name()
    if not name:
        context.log.warning("no express queue configured (PIPELINE_EXPRESS_QUEUE): nothing to do")
        return {}
    client = aws_client(
        "sqs",
        endpoint_url=sqs.endpoint_url,
        region_name=sqs.region_name,
        aws_access_key_id=sqs.aws_access_key_id,
        aws_secret_access_key=sqs.aws_secret_access_key,
        aws_session_token=sqs.aws_session_token,
        config=CLIENT_CONFIG,
    )
    lane = ExpressLane(
        client,
        routing_reloader(routing.config_path),
        client.get_queue_url(QueueName=name)["QueueUrl"],
        lambda queue: client.get_queue_url(QueueName=queue)["QueueUrl"],
        QueueLimits.from_stack(),
        history=ContractHistory(archive.get_client(), archive.bucket),
    )
    context.log.info(f"express lane on {name} for {express.run_seconds:.0f} s")
    stats = lane.run(
        express.run_seconds, wait_time_s=express.wait_time_s, on_progress=lambda s: context.log.info(_describe(s))
    )
    context.log.info(_describe(stats))
    metadata = stats.as_metadata()
    context.add_output_metadata(
        {key: MetadataValue.json(value) if isinstance(value, dict) else value for key, value in metadata.items()}
    )
    return metadata


@job(
    executor_def=in_process_executor,
    tags={EXPRESS_TAG: "router"},
    description="The express lane: alarms from the express queue to the high-priority queue and partners, for an hour.",
)
def express_lane_job():
    route_express_lane()


@sensor(
    job=express_lane_job, minimum_interval_seconds=1, default_status=DefaultSensorStatus.RUNNING
)  # every daemon loop (>= 5 s)
def express_lane_sensor(context: SensorEvaluationContext, sqs: SQSResource):
    """Keep one express lane run going while an express queue is configured (turn this off to stop the lane)."""
    express = ExpressSettings.from_env()
    name = express.queue_name()
    if not name:
        return SkipReason("no express queue configured (PIPELINE_EXPRESS_QUEUE): the express lane is off")
    why = keep_alive(
        context, express_lane_job.name, {EXPRESS_TAG: "router"}, express.run_seconds, express.handover_seconds
    )
    if why is None:
        return SkipReason(f"the express lane is running on {name}")
    try:
        sqs.queue_url(name)
    except Exception as exc:  # noqa: BLE001 - a cheap check that names the problem instead of a failed run
        return SkipReason(f"express queue {name} not found ({type(exc).__name__}); provision it first")
    context.log.info(f"starting an express lane run: {why}")
    return RunRequest(tags={EXPRESS_TAG: "router"})


defs = Definitions(jobs=[express_lane_job], sensors=[express_lane_sensor])
