"""Edge service settings, read from the environment at start (one service process per site)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


@dataclass(frozen=True)
class EdgeConfig:
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    client_id: str = "edge-bridge"
    site_id: str = "site-local"
    site_timezone: str = "UTC"
    queue_name: str = "events"
    queue_url_override: str | None = None
    fifo: bool = False
    state_dir: Path = Path(".edge_state")
    # SQS senders: processes (default: one per core) so boto3's work runs beside, not inside, the
    # MQTT process; 0 runs `sender_threads` threads in the service's own process instead.
    sender_processes: int = 0
    sender_threads: int = 4
    max_inflight: int = 1000
    linger_s: float = 0.005
    admin_host: str = "127.0.0.1"
    admin_port: int = 9108
    # Retry log: bound on jobs + DLQ rows, first backoff (doubling), attempts before the DLQ.
    retry_log_max_events: int = 5_000_000
    retry_backoff_s: float = 5.0
    retry_max_attempts: int = 3
    # While SQS is unreachable the service probes it this often instead of trying every event.
    probe_interval_s: float = 1.0
    max_message_bytes: int = 262144
    claim_check_bucket: str = "events-claim-check"
    # Mutating admin endpoints (POST /events, /dlq/replay) need this bearer token; unset: they refuse.
    admin_token: str | None = None
    # Edge quarantine: rotated at this size, keeping this many rotated files; what rotation drops is counted.
    quarantine_max_bytes: int = 64 * 1024 * 1024
    quarantine_keep_files: int = 4
    # The express lane: high-priority events are also sent to this queue (the cloud's fast path to the
    # priority consumer and partners); unset: no express lane. Best effort, never instead of `events`.
    express_queue_url: str | None = None
    # How the retry log hands out due jobs: "priority" (high first, oldest first within a priority) or
    # "fifo" (oldest first, as before priorities; for comparison).
    retry_order: str = "priority"
    # Reconciliation manifests (edge_bridge.manifest): the bucket they go to ("" or "none": not written)
    # and how often the changed hours are put.
    manifest_bucket: str | None = "events-archive"
    manifest_interval_s: float = 60.0

    @classmethod
    def from_env(cls) -> EdgeConfig:
        return cls(
            mqtt_host=_env("EDGE_MQTT_HOST", "127.0.0.1"),
            mqtt_port=int(_env("EDGE_MQTT_PORT", "1883")),
            mqtt_username=_env("EDGE_MQTT_USERNAME"),
            mqtt_password=_env("EDGE_MQTT_PASSWORD"),
            client_id=_env("EDGE_CLIENT_ID", "edge-bridge"),
            site_id=_env("EDGE_SITE_ID", "site-local"),
            site_timezone=_env("EDGE_SITE_TIMEZONE", "UTC"),
            queue_name=_env("EDGE_EVENTS_QUEUE", "events"),
            queue_url_override=_env("EDGE_EVENTS_QUEUE_URL"),
            fifo=_env("EDGE_EVENTS_QUEUE", "events").endswith(".fifo"),
            state_dir=Path(_env("EDGE_STATE_DIR", ".edge_state")),
            sender_processes=int(_env("EDGE_SENDER_PROCESSES", str(os.cpu_count() or 1))),
            sender_threads=int(_env("EDGE_SENDER_THREADS", "4")),
            max_inflight=int(_env("EDGE_MAX_INFLIGHT", "1000")),
            admin_host=_env("EDGE_ADMIN_HOST", "127.0.0.1"),
            admin_port=int(_env("EDGE_ADMIN_PORT", "9108")),
            retry_log_max_events=int(_env("EDGE_RETRY_LOG_MAX_EVENTS", "5000000")),
            retry_backoff_s=float(_env("EDGE_RETRY_BACKOFF_S", "5")),
            retry_max_attempts=int(_env("EDGE_RETRY_MAX_ATTEMPTS", "3")),
            probe_interval_s=float(_env("EDGE_PROBE_INTERVAL_S", "1")),
            max_message_bytes=int(_env("EDGE_MAX_MESSAGE_BYTES", "262144")),
            claim_check_bucket=_env("EDGE_CLAIM_CHECK_BUCKET", "events-claim-check"),
            admin_token=_env("EDGE_ADMIN_TOKEN"),
            quarantine_max_bytes=int(_env("EDGE_QUARANTINE_MAX_BYTES", str(64 * 1024 * 1024))),
            quarantine_keep_files=int(_env("EDGE_QUARANTINE_KEEP_FILES", "4")),
            express_queue_url=_env("EDGE_EXPRESS_QUEUE_URL"),
            retry_order=_env("EDGE_RETRY_ORDER", "priority"),
            manifest_bucket=None
            if _env("EDGE_MANIFEST_BUCKET", "events-archive").lower() == "none"
            else _env("EDGE_MANIFEST_BUCKET", "events-archive"),
            manifest_interval_s=float(_env("EDGE_MANIFEST_INTERVAL_S", "60")),
        )

    def queue_url(self) -> str:
        if self.queue_url_override:
            return self.queue_url_override
        from edge_bridge.sqs_sender import sqs_client

        return sqs_client().get_queue_url(QueueName=self.queue_name)["QueueUrl"]
