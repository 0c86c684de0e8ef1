"""`archive_replay_job`: re-send a time range of the archive to one partner (config: partner, start, end).

Thin wiring over pipeline.archive_range: the run puts the range on the partner's queue, and the
partner's usual delivery run (partner_queues_sensor -> partner_delivery_job) delivers it, signed, with
backoff and DLQ, and with the original event ids as webhook-id. The run's metadata names the contract
version the range was transformed under (recorded in the contract history first).
"""

from dagster import Config, Definitions, MetadataValue, OpExecutionContext, in_process_executor, job, op
from pydantic import Field

from pipeline.archive_range import parse_utc, replay_range_to_partner
from pipeline.resources import ArchiveStore, RoutingSettings, SQSResource
from pipeline.routing.contracts import ContractHistory


class ArchiveReplayConfig(Config):
    partner: str = Field(description="The partner's name in config/routing.yaml.")
    start: str = Field(description="First event time to include, UTC ISO 8601, e.g. 2024-01-15T00:00:00Z.")
    end: str = Field(description="Events before this time are included (exclusive), UTC ISO 8601.")


@op
def replay_archive_range_to_partner(
    context: OpExecutionContext,
    config: ArchiveReplayConfig,
    sqs: SQSResource,
    archive: ArchiveStore,
    routing: RoutingSettings,
) -> int:
    """Every subscribed event of the range, under the partner's current contract, onto the partner's queue."""
    partner = routing.load().partner(config.partner)
    start, end = parse_utc(config.start), parse_utc(config.end)
    history = ContractHistory(archive.get_client(), archive.bucket)
    report = replay_range_to_partner(
        archive.filesystem(),
        archive.bucket,
        sqs.get_client(),
        partner,
        sqs.queue_url(partner.queue_name),
        start,
        end,
        history,
    )
    context.log.info(
        f"{report.sent} of {report.events_in_range} archived events of {report.hours} hours queued for {partner.name} under contract {report.contract_version}"
    )
    context.add_output_metadata(
        {
            "partner": partner.name,
            "contract_version": report.contract_version,
            "start": start.isoformat(),
            "end": end.isoformat(),
            "hours_read": report.hours,
            "events_in_range": report.events_in_range,
            "queued_for_partner": report.sent,
            "by_event_type": MetadataValue.json(report.by_event_type),
        }
    )
    return report.sent


@job(
    executor_def=in_process_executor,
    description="Re-send an archive time range to one partner under its current contract, with the original event ids (back-fill, or make a partner whole).",
)
def archive_replay_job():
    replay_archive_range_to_partner()


defs = Definitions(jobs=[archive_replay_job])
