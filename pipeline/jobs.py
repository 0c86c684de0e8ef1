"""The drain job: SQS `events` -> validate/de-duplicate -> destinations -> delete from SQS.

Each op is thin: it calls the domain code in `pipeline.drain` / `pipeline.archive` and reports what
it did. The delete op depends on every destination op, so a message is deleted only after all of
them have durably accepted its event or durably quarantined it (an event one destination cannot take
for a reason of its own is written to `s3://<archive bucket>/quarantine/` by that op before it
returns); a run that dies before that, or an op failing for a shared cause, leaves the messages in SQS.
"""

from collections import Counter

from dagster import (
    AssetKey,
    AssetMaterialization,
    Config,
    In,
    MetadataValue,
    Nothing,
    OpExecutionContext,
    Out,
    in_process_executor,
    job,
    op,
)

from edge_bridge.claim_check import check_in_downstream
from edge_bridge.envelope import Envelope, format_ts, utc_now
from pipeline import drain, reconciliation
from pipeline.archive import write_landing
from pipeline.metrics import push_gauges
from pipeline.partitions import archive_hourly_partitions
from pipeline.resources import ArchiveStore, DrainSettings, RoutingSettings, SQSResource
from pipeline.routing import destinations, monitoring
from pipeline.routing.contracts import ContractHistory
from pipeline.routing.dlq_replay import record_drain_failure
from pipeline.stack import load_stack_config

LANDING_ASSET = AssetKey("events_landing")
DRAIN_TAG = "pipeline/drain"


class WindowConfig(Config):
    max_messages: int | None = None  # default: DrainSettings.window_messages


@op(out=Out(drain.Window))
def receive_events_window(
    context: OpExecutionContext, config: WindowConfig, sqs: SQSResource, drain_settings: DrainSettings
) -> drain.Window:
    """Take a bounded window of messages; they stay invisible to others for the visibility timeout."""
    size = config.max_messages or drain_settings.window_messages
    window = drain.receive_window(sqs.get_client(), sqs.queue_url(), size, max_seconds=drain_settings.window_seconds)
    context.log.info(f"received {len(window)} messages (window of at most {size})")
    return window


def _quarantine(context: OpExecutionContext, archive: ArchiveStore, stage: str, lines: list[str]) -> None:
    """Write this op's quarantine before it returns: the delete op runs only after every destination op,
    so a quarantined message leaves SQS only once its record is durable (a failed write fails the op)."""
    if not lines:
        return
    key = drain.quarantine_key(context.run_id, stage, utc_now())
    drain.write_quarantine(archive.get_client(), archive.bucket, key, lines)
    context.log.warning(f"{stage}: quarantined {len(lines)} to s3://{archive.bucket}/{key}")


def _refused_lines(refused: list[destinations.Refused], stage: str) -> list[str]:
    return [
        drain.quarantine_line(
            stage,
            r.reason,
            r.error_type,
            r.detail,
            r.event.to_json(),
            destination=r.destination,
            site_id=r.event.site_id,
            event_id=r.event.event_id,
        )
        for r in refused
    ]


@op(out=Out(drain.ParsedWindow))
def validate_and_dedupe(context: OpExecutionContext, window: drain.Window, archive: ArchiveStore) -> drain.ParsedWindow:
    """Check every envelope against the contract; bad ones are kept in the quarantine area with a reason."""
    parsed = drain.parse_window(window)
    lines = [
        drain.quarantine_line(
            "validate_and_dedupe", r.reason, r.error_type, r.detail, r.message.body, message_id=r.message.message_id
        )
        for r in parsed.quarantined
    ]
    _quarantine(context, archive, "validate_and_dedupe", lines)
    # Quarantined durably, so they may leave the queue with the rest.
    parsed.receipts.extend(r.message.receipt_handle for r in parsed.quarantined)
    context.log.info(
        f"{len(parsed.bodies)} unique events, {parsed.duplicates} duplicates, {len(parsed.quarantined)} quarantined, {parsed.held} left in SQS for redelivery"
    )
    return parsed


@op(out=Out(Nothing))
def land_in_archive(context: OpExecutionContext, parsed: drain.ParsedWindow, archive: ArchiveStore) -> None:
    """Write the window to the archive's landing area, one Parquet file per event-hour.

    An event that cannot be made into a row is quarantined alone; a write that fails (S3) fails the op.
    """
    if not parsed.bodies:
        return
    # What this window received, by site and hour, before anything of it lands (pipeline.reconciliation).
    reconciliation.write_drain_manifests(archive.get_client(), archive.bucket, context.run_id, parsed)
    ingested_at = utc_now()
    refused: list[destinations.Refused] = []

    def unarchivable(event: Envelope, exc: Exception) -> None:
        refused.append(
            destinations.Refused(event, "archive", "unarchivable", type(exc).__name__, destinations.described(exc))
        )

    written = write_landing(
        archive.filesystem(),
        archive.bucket,
        archive.landing_prefix,
        parsed.events,
        context.run_id,
        ingested_at,
        on_refused=unarchivable,
        queued_at=parsed.queued_times,
    )
    _quarantine(context, archive, "land_in_archive", _refused_lines(refused, "land_in_archive"))
    for hour, rows in written.items():
        if not archive_hourly_partitions.has_partition_key(hour):
            context.log.warning(f"{rows} events landed for hour {hour}, outside the archive's partitions")
            continue
        context.log_event(
            AssetMaterialization(
                asset_key=LANDING_ASSET,
                partition=hour,
                metadata={"rows": rows, "batch": context.run_id, "ingested_at": format_ts(ingested_at)},
            )
        )


class _DestinationStep:
    """Runs one destination's hand-over; if it fails, says why in the archive bucket before failing the
    run, so the 02:00 events-dlq replay can report the reason for messages that end up there."""

    def __init__(self, context: OpExecutionContext, window: drain.Window, archive: ArchiveStore) -> None:
        self.context, self.window, self.archive = context, window, archive

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and self.window.messages:
            try:
                key = record_drain_failure(
                    self.archive.get_client(),
                    self.archive.bucket,
                    self.context.run_id,
                    self.context.op.name,
                    [m.message_id for m in self.window.messages],
                    f"{exc_type.__name__}: {exc}",
                )
                self.context.log.error(f"{self.context.op.name} failed; window stays in SQS; reason recorded at {key}")
            except Exception as record_exc:  # the original failure matters more than its record
                self.context.log.error(f"could not record the failure: {record_exc}")
        return False


def _hand_over(
    context: OpExecutionContext,
    window: drain.Window,
    parsed: drain.ParsedWindow,
    sqs: SQSResource,
    archive: ArchiveStore,
    routing: RoutingSettings,
    route,
    **extra,
) -> destinations.HandOver:
    """One SQS destination's share of the window. Events it refuses for their own reasons are quarantined
    before the op returns; a shared failure is recorded for the events-dlq replay and fails the run."""
    stage = context.op.name
    with _DestinationStep(context, window, archive):
        client, urls = sqs.get_client(), {}

        def url(name: str) -> str:
            if name not in urls:
                urls[name] = client.get_queue_url(QueueName=name)["QueueUrl"]
            return urls[name]

        handed = route(client, routing.load(), parsed.events, url, destinations.QueueLimits.from_stack(), **extra)
        _quarantine(context, archive, stage, _refused_lines(handed.refused, stage))
    refused = Counter(r.reason for r in handed.refused)
    context.log.info(f"{stage}: accepted {handed.accepted}" + (f", quarantined {dict(refused)}" if refused else ""))
    return handed


@op(out=Out(Nothing))
def route_to_partner_queues(
    context: OpExecutionContext,
    window: drain.Window,
    parsed: drain.ParsedWindow,
    sqs: SQSResource,
    archive: ArchiveStore,
    routing: RoutingSettings,
) -> None:
    """Subscribed events only, already transformed to each partner's contract (recorded in the contract
    history before its first body is queued), into each partner's queue; the metadata names each contract."""
    history = ContractHistory(archive.get_client(), archive.bucket)
    handed = _hand_over(
        context, window, parsed, sqs, archive, routing, destinations.route_to_partner_queues, history=history
    )
    context.add_output_metadata(
        {"contract_versions": MetadataValue.json(handed.contracts), "queued": MetadataValue.json(handed.accepted)}
    )


@op(out=Out(Nothing))
def route_to_priority_queues(
    context: OpExecutionContext,
    window: drain.Window,
    parsed: drain.ParsedWindow,
    sqs: SQSResource,
    archive: ArchiveStore,
    routing: RoutingSettings,
) -> None:
    """Every event into the high, medium or low queue its event type maps to; an event too big for SQS
    travels as a claim-check pointer (s3://<claim-check bucket>/claim-check-routed/...)."""
    s3, bucket = archive.get_client(), load_stack_config().claim_check.bucket

    def check_in(event: Envelope, body: str) -> str:
        return check_in_downstream(s3, bucket, event.site_id, event.event_id, body)

    _hand_over(context, window, parsed, sqs, archive, routing, destinations.route_to_priority_queues, check_in=check_in)


@op(out=Out(Nothing))
def send_to_monitoring(
    context: OpExecutionContext,
    window: drain.Window,
    parsed: drain.ParsedWindow,
    sqs: SQSResource,
    routing: RoutingSettings,
) -> None:
    """Operational events to Loki (when configured) and the window's cloud metrics to the Pushgateway.

    Loki is observability, not delivery: nothing about it (an outage, a line an event cannot make) may
    hold the window in SQS; the events are archived either way.
    """
    config = routing.load().monitoring
    operational = [e for e in parsed.events if e.event_type in config.event_types]
    loki = config.loki_url()
    if loki and operational:
        try:
            if not monitoring.push_to_loki(loki, operational):
                context.log.warning(
                    f"Loki did not accept {len(operational)} operational event lines (they are archived)"
                )
        except Exception as exc:  # noqa: BLE001 - see the docstring
            context.log.warning(f"Loki push failed ({type(exc).__name__}: {exc}); the events are archived")
    visible, _ = drain.queue_depth(sqs.get_client(), sqs.queue_url())
    gauges = monitoring.window_metrics(len(window), len(parsed.quarantined), parsed.events, visible)
    push_gauges("pipeline_drain", gauges, labels={"queue": sqs.events_queue})
    context.log.info(
        f"{len(operational)} operational events; metrics { ({k: round(v[1], 3) for k, v in gauges.items()}) }"
    )


@op(ins={"landed": In(Nothing), "partners": In(Nothing), "prioritized": In(Nothing), "monitored": In(Nothing)})
def delete_from_events_queue(context: OpExecutionContext, parsed: drain.ParsedWindow, sqs: SQSResource) -> int:
    """Delete only now: every destination upstream of this op has accepted the window."""
    deleted = drain.delete_messages(sqs.get_client(), sqs.queue_url(), parsed.receipts)
    context.log.info(f"deleted {deleted} of {len(parsed.receipts)} messages from SQS")
    return deleted


@job(
    executor_def=in_process_executor,
    tags={DRAIN_TAG: "events"},
    description="Drain a bounded window of the SQS events queue into every destination, then delete it.",
)
def drain_events_job():
    window = receive_events_window()
    parsed = validate_and_dedupe(window)
    delete_from_events_queue(
        parsed,
        landed=land_in_archive(parsed),
        partners=route_to_partner_queues(window, parsed),
        prioritized=route_to_priority_queues(window, parsed),
        monitored=send_to_monitoring(window, parsed),
    )
