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
    queue_name: str = "events"
    queue_url_override: str | None = None
    fifo: bool = False
    state_dir: Path = Path(".edge_state")
    sender_threads: int = 4
    max_inflight: int = 1000
    linger_s: float = 0.005

    @classmethod
    def from_env(cls) -> "EdgeConfig":
        return cls(
            mqtt_host=_env("EDGE_MQTT_HOST", "127.0.0.1"),
            mqtt_port=int(_env("EDGE_MQTT_PORT", "1883")),
            mqtt_username=_env("EDGE_MQTT_USERNAME"),
            mqtt_password=_env("EDGE_MQTT_PASSWORD"),
            client_id=_env("EDGE_CLIENT_ID", "edge-bridge"),
            queue_name=_env("EDGE_EVENTS_QUEUE", "events"),
            queue_url_override=_env("EDGE_EVENTS_QUEUE_URL"),
            fifo=_env("EDGE_EVENTS_QUEUE", "events").endswith(".fifo"),
            state_dir=Path(_env("EDGE_STATE_DIR", ".edge_state")),
            sender_threads=int(_env("EDGE_SENDER_THREADS", "4")),
        )

    def queue_url(self) -> str:
        if self.queue_url_override:
            return self.queue_url_override
        from edge_bridge.sqs_sender import sqs_client

        # Looked up once at start; while SQS is unreachable the service retries the lookup.
        return sqs_client().get_queue_url(QueueName=self.queue_name)["QueueUrl"]
