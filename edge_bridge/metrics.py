"""The edge service's Prometheus metrics (names from the design: jobs_pending_count, dlq_size, mqtt_message_rate).

Each service owns its registry, so two services in one process (tests) never share counters.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class MessageRate:
    """Messages per second over a sliding window, for the `mqtt_message_rate` gauge."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._ticks: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, n: int = 1) -> None:
        now = time.monotonic()
        with self._lock:
            if self._ticks and now - self._ticks[-1][0] < 0.1:
                t, count = self._ticks[-1]
                self._ticks[-1] = (t, count + n)
            else:
                self._ticks.append((now, n))

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._ticks and now - self._ticks[0][0] > self.window_s:
                self._ticks.popleft()
            return sum(n for _, n in self._ticks) / self.window_s


class EdgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_pending = Gauge(
            "jobs_pending_count", "Jobs waiting in the retry log for another SQS attempt", registry=r
        )
        self.dlq_size = Gauge(
            "dlq_size", "Events in the local DLQ (failed every retry; replayed daily at 02:00 site time)", registry=r
        )
        self.rate = MessageRate()
        Gauge("mqtt_message_rate", "MQTT messages received per second (10 s window)", registry=r).set_function(
            self.rate.rate
        )
        self.received = Counter("edge_mqtt_messages_received", "MQTT messages received", registry=r)
        self.internal = Counter(
            "edge_internal_events", "Internal events of the edge service (check-ins, jobs, robot actions)", registry=r
        )
        self.delivered = Counter("edge_events_delivered", "Events SQS accepted", ["path"], registry=r)
        self.spilled = Counter(
            "edge_events_spilled", "Events committed to the retry log instead of SQS", ["cause"], registry=r
        )
        self.retry_failures = Counter("edge_retry_failures", "Failed retry attempts by the poller", registry=r)
        self.dead_lettered = Counter("edge_events_dead_lettered", "Jobs moved to the local DLQ", registry=r)
        self.replayed = Counter("edge_dlq_replayed", "DLQ jobs moved back for delivery by a replay", registry=r)
        self.quarantined = Counter("edge_events_quarantined", "Bad input kept with its reason", ["reason"], registry=r)
        self.quarantine_dropped = Counter(
            "edge_quarantine_dropped",
            "Quarantine entries deleted unread: the oldest rotated file, at the quarantine's byte bound",
            registry=r,
        )
        self.claim_checks = Counter(
            "edge_claim_checks", "Oversized events sent to S3 with a pointer in SQS", registry=r
        )
        self.express_sent = Counter(
            "edge_express_sent", "High-priority events also sent to the express queue", registry=r
        )
        self.express_failed = Counter(
            "edge_express_failed",
            "Express sends that failed (ignored: the event still goes through the events queue and the drain)",
            registry=r,
        )
        self.express_calls = Counter(
            "edge_express_calls", "SendMessageBatch calls to the express queue (SQS bills per call)", registry=r
        )
        self.send_latency = Histogram(
            "edge_sqs_send_seconds",
            "SendMessageBatch latency",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.circuit_open = Gauge("edge_sqs_circuit_open", "1 while SQS is considered unreachable", registry=r)
        self.retry_log_full = Gauge(
            "edge_retry_log_full", "1 while the retry log is at its bound and MQTT acks are held", registry=r
        )
        self.held = Gauge("edge_events_held_unacked", "Events held unacked because the retry log is full", registry=r)
        self.mqtt_connected = Gauge("edge_mqtt_connected", "1 while subscribed to the broker", registry=r)
        self.mqtt_connections = Counter(
            "edge_mqtt_connections", "MQTT connections made (more than one: the broker dropped the service)", registry=r
        )
        self.retry_log_salvaged = Counter(
            "edge_retry_log_salvaged",
            "Rows copied from a corrupt retry log into a fresh one when the service started",
            ["table"],
            registry=r,
        )
        self.retry_log_lost = Counter(
            "edge_retry_log_lost",
            "Rows of a corrupt retry log that could not be read when the service started (those it could count)",
            ["table"],
            registry=r,
        )
        self.retry_log_loss_unknown = Gauge(
            "edge_retry_log_salvage_loss_unknown",
            "1 when the corrupt retry log found at start could not be counted: an unknown number of rows is lost",
            registry=r,
        )
        self.retry_log_corrupt_files = Gauge(
            "edge_retry_log_corrupt_files",
            "Corrupt retry logs moved aside in the state directory and not yet cleared away",
            registry=r,
        )

    def watch_retry_log_salvage(self, report, retry_log_path: Path) -> None:
        """Count what the start-up check salvaged and lost; keep the moved-aside files in sight until cleared."""
        from edge_bridge.retry_log_salvage import EVENT_TABLES, moved_aside

        for table in EVENT_TABLES:
            self.retry_log_salvaged.labels(table).inc(report.salvaged.get(table, 0))
            self.retry_log_lost.labels(table).inc(report.lost.get(table) or 0)
        self.retry_log_loss_unknown.set(int(report.loss_unknown))
        self.retry_log_corrupt_files.set_function(lambda: len(moved_aside(retry_log_path)))
