"""The drain job: SQS `events` -> validate/de-duplicate -> destinations -> delete from SQS.

Each op is thin: it calls the domain code in `pipeline.drain` / `pipeline.archive` and reports what
it did. The delete op depends on every destination op, so a message is deleted only after all of
them have durably accepted its event; a run that dies before that leaves the messages in SQS.
"""


import json
from typing import Optional

from dagster import (
    AssetKey,
    AssetMaterialization,
    Config,
    In,
    Nothing,
    OpExecutionContext,
    Out,
    in_process_executor,
    job,
    op,
)

from pipeline import drain
from pipeline.archive import write_landing
from pipeline.metrics import push_gauges
from pipeline.partitions import archive_hourly_partitions
from pipeline.resources import ArchiveStore, DrainSettings, RoutingSettings, SQSResource
from pipeline.routing import destinations, monitoring
from pipeline.routing.dlq_replay import record_drain_failure
from edge_bridge.envelope import format_ts, utc_now

LANDING_ASSET = AssetKey("events_landing")
DRAIN_TAG = "pipeline/drain"


class WindowConfig(Config):
    max_messages: Optional[int] = None  # default: DrainSettings.window_messages


@op(out=Out(drain.Window))
def receive_events_window(context: OpExecutionContext, config: WindowConfig, sqs: SQSResource, drain_settings: DrainSettings) -> drain.Window:
    """Take a bounded window of messages; they stay invisible to others for the visibility timeout."""
    size = config.max_messages or drain_settings.window_messages
    window = drain.receive_window(sqs.get_client(), sqs.queue_url(), size, max_seconds=drain_settings.window_seconds)
    context.log.info(f"received {len(window)} messages (window of at most {size})")
    return window


@op(out=Out(drain.ParsedWindow))
def validate_and_dedupe(context: OpExecutionContext, window: drain.Window, archive: ArchiveStore) -> drain.ParsedWindow:
    """Check every envelope against the contract; bad ones are kept in the quarantine area with a reason."""
    parsed = drain.parse_window(window)
    if parsed.quarantined:
        lines = [
            json.dumps({"message_id": m.message_id, "reason": reason, "detail": detail, "body": m.body[:262144]})
            for m, reason, detail in parsed.quarantined
        ]
        key = f"quarantine/{utc_now():%Y-%m-%d}/{context.run_id}.jsonl"
        archive.get_client().put_object(Bucket=archive.bucket, Key=key, Body="\n".join(lines).encode())
        context.log.warning(f"quarantined {len(lines)} messages to s3://{archive.bucket}/{key}")
        # Quarantined durably, so they may leave the queue with the rest.
        parsed.receipts.extend(m.receipt_handle for m, _, _ in parsed.quarantined)
    context.log.info(f"{len(parsed.events)} unique events, {parsed.duplicates} duplicates, {len(parsed.quarantined)} quarantined")
    return parsed


@op(out=Out(Nothing))
def land_in_archive(context: OpExecutionContext, parsed: drain.ParsedWindow, archive: ArchiveStore) -> None:
    """Write the window to the archive's landing area, one Parquet file per event-hour."""
    if not parsed.events:
        return
    ingested_at = utc_now()
    written = write_landing(archive.filesystem(), archive.bucket, archive.landing_prefix, parsed.events, context.run_id, ingested_at)
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
                    self.archive.get_client(), self.archive.bucket, self.context.run_id, self.context.op.name,
                    [m.message_id for m in self.window.messages], f"{exc_type.__name__}: {exc}",
                )
                self.context.log.error(f"{self.context.op.name} failed; window stays in SQS; reason recorded at {key}")
            except Exception as record_exc:  # the original failure matters more than its record
                self.context.log.error(f"could not record the failure: {record_exc}")
        return False


def _hand_over(context: OpExecutionContext, window: drain.Window, parsed: drain.ParsedWindow, sqs: SQSResource, archive: ArchiveStore, routing: RoutingSettings, route, what: str) -> None:
    """One SQS destination's share of the window; a failure is recorded for the events-dlq replay."""
    with _DestinationStep(context, window, archive):
        client, urls = sqs.get_client(), {}

        def url(name: str) -> str:
            if name not in urls:
                urls[name] = client.get_queue_url(QueueName=name)["QueueUrl"]
            return urls[name]

        counts = route(client, routing.load(), parsed.events, url)
    context.log.info(f"{what} accepted {counts}")


@op(out=Out(Nothing))
def route_to_partner_queues(context: OpExecutionContext, window: drain.Window, parsed: drain.ParsedWindow, sqs: SQSResource, archive: ArchiveStore, routing: RoutingSettings) -> None:
    """Subscribed events only, already transformed to each partner's schema, into each partner's queue."""
    _hand_over(context, window, parsed, sqs, archive, routing, destinations.route_to_partner_queues, "partner queues")


@op(out=Out(Nothing))
def route_to_priority_queues(context: OpExecutionContext, window: drain.Window, parsed: drain.ParsedWindow, sqs: SQSResource, archive: ArchiveStore, routing: RoutingSettings) -> None:
    """Every event into the high, medium or low queue its event type maps to."""
    _hand_over(context, window, parsed, sqs, archive, routing, destinations.route_to_priority_queues, "priority queues")


@op(out=Out(Nothing))
def send_to_monitoring(context: OpExecutionContext, window: drain.Window, parsed: drain.ParsedWindow, sqs: SQSResource, routing: RoutingSettings) -> None:
    """Operational events to Loki (when configured) and the window's cloud metrics to the Pushgateway."""
    config = routing.load().monitoring
    operational = [e for e in parsed.events if e.event_type in config.event_types]
    loki = config.loki_url()
    if loki and operational and not monitoring.push_to_loki(loki, operational):
        context.log.warning(f"Loki did not accept {len(operational)} operational event lines (they are archived)")
    visible, _ = drain.queue_depth(sqs.get_client(), sqs.queue_url())
    gauges = monitoring.window_metrics(len(window), len(parsed.quarantined), parsed.events, visible)
    push_gauges("pipeline_drain", gauges, labels={"queue": sqs.events_queue})
    context.log.info(f"{len(operational)} operational events; metrics {({k: round(v[1], 3) for k, v in gauges.items()})}")


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
