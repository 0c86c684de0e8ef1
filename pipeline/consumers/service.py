"""The priority consumer service: high, medium and low SQS queues, high always served first.

Four threads. The high poller long-polls the high queue without pause, so a high event is picked up
within milliseconds of arriving. The background poller fetches medium (then low) only when nothing
waits to be written and keeps at most one such batch pending, so a backlog there never delays high.
One writer thread owns the DuckDB connection (DuckDB allows one writer) and always takes the most
urgent pending batch; a fourth deletes a batch's messages from SQS once it has committed.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

import os

import requests
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from edge_bridge.envelope import EnvelopeRejected, format_ts, parse_envelope
from pipeline.consumers.store import RETRYING, ConsumerStore, Item
from pipeline.routing.config import PRIORITIES, RoutingConfig
from pipeline.routing.logs import PRIORITY_HANDLED_SCHEMA, write_log
from pipeline.routing.webhooks import post_signed

log = logging.getLogger(__name__)
RANK = {p: n for n, p in enumerate(PRIORITIES)}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class ConsumerMetrics:
    """What the consumer exports on /metrics (names from the monitoring contract where they exist)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "priority_queue_to_handled_seconds", "Seconds from SQS accepting an event to its batch committing", ["priority"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.handled = Counter("priority_events_handled", "Events handled (first time)", ["priority"], registry=self.registry)
        self.duplicates = Counter("priority_duplicates_skipped", "Redelivered events recognised by event_id", ["priority"], registry=self.registry)
        self.rejected = Counter("priority_messages_rejected", "Messages that were not valid envelopes (kept in the rejected table)", ["priority"], registry=self.registry)
        self.errors = Counter("priority_batch_errors", "Batches that failed and were left for SQS to redeliver", ["priority"], registry=self.registry)
        self.lag = Gauge("consumer_lag", "Queue-to-handled seconds of the most recent batch", ["priority"], registry=self.registry)
        self.depth = Gauge("sqs_queue_depth", "Visible messages in a priority queue", ["queue"], registry=self.registry)
        self.error_rate = Gauge("processing_error_rate", "Failed or rejected messages / messages received", registry=self.registry)
        self._received = 0
        self._failed = 0

    def count(self, received: int, failed: int) -> None:
        self._received += received
        self._failed += failed
        self.error_rate.set(self._failed / self._received if self._received else 0.0)


@dataclass
class ConsumerSettings:
    db_path: str
    metrics_port: int | None = None
    archive_bucket: str | None = None
    export_interval_s: float = 5.0
    high_wait_s: int = 1
    background_batch: int = 100  # per transaction; a high batch waits for at most one of these
    depth_interval_s: float = 5.0


class PriorityConsumer:
    def __init__(self, routing: RoutingConfig, sqs, settings: ConsumerSettings, filesystem=None) -> None:
        self.routing, self.sqs, self.settings, self.filesystem = routing, sqs, settings, filesystem
        self.urls = {p: sqs.get_queue_url(QueueName=routing.priority.queue_for(p))["QueueUrl"] for p in PRIORITIES}
        self.metrics = ConsumerMetrics()
        self.pending: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._background_done = threading.Event()
        self._background_done.set()
        self.stopping = threading.Event()
        self.threads: dict[str, threading.Thread] = {}
        self.webhooks = ThreadPoolExecutor(max_workers=2)
        self.webhook_results: queue.Queue = queue.Queue()
        self._webhook_retries: list[tuple[float, int, int, dict]] = []  # heap of (due, seq, attempt, incident)
        self._webhook_retries_lock = threading.Lock()
        self.deletes: queue.Queue = queue.Queue()
        self.http = None
        self.ready = threading.Event()

    # -- receiving -------------------------------------------------------------------------------

    def _receive(self, priority: str, wait_s: int) -> list[Item]:
        messages = self.sqs.receive_message(
            QueueUrl=self.urls[priority], MaxNumberOfMessages=10, WaitTimeSeconds=wait_s, MessageSystemAttributeNames=["SentTimestamp"]
        ).get("Messages", [])
        items = []
        for m in messages:
            sent = datetime.fromtimestamp(int(m["Attributes"]["SentTimestamp"]) / 1000, tz=timezone.utc)
            try:
                event, reason = parse_envelope(m["Body"]), None
            except EnvelopeRejected as exc:
                event, reason = None, f"{exc.reason}: {exc.detail}"
            items.append(Item(priority, m["ReceiptHandle"], sent, event, m["Body"], reason))
        return items

    def _enqueue(self, priority: str, items: list[Item], done: threading.Event | None = None) -> None:
        self.pending.put((RANK[priority], next(self._seq), priority, items, done))

    def _high_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                items = self._receive("high", self.settings.high_wait_s)
            except Exception as exc:
                log.warning("high queue receive failed: %s", exc)
                self.stopping.wait(0.5)
                continue
            if items:
                self._enqueue("high", items)

    def _background_loop(self) -> None:
        last_depth = 0.0
        while not self.stopping.is_set():
            if time.monotonic() - last_depth > self.settings.depth_interval_s:
                self._update_depths()
                last_depth = time.monotonic()
            # One background batch at a time, and only when nothing more urgent waits to be written.
            if not self._background_done.wait(0.5) or not self.pending.empty():
                self.stopping.wait(0.005)
                continue
            try:
                items = self._receive_background("medium") or self._receive_background("low")
            except Exception as exc:
                log.warning("medium/low receive failed: %s", exc)
                self.stopping.wait(0.5)
                continue
            if not items:
                self.stopping.wait(0.2)
                continue
            self._background_done.clear()
            self._enqueue(items[0].priority, items, self._background_done)

    def _receive_background(self, priority: str) -> list[Item]:
        """Up to `background_batch` messages of one queue: a backlog is written in few transactions."""
        items: list[Item] = []
        while len(items) < self.settings.background_batch and self.pending.empty():
            got = self._receive(priority, 0)
            items += got
            if len(got) < 10:
                break
        return items

    def _update_depths(self) -> None:
        for priority, url in self.urls.items():
            try:
                attrs = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
                self.metrics.depth.labels(queue=self.routing.priority.queue_for(priority)).set(int(attrs["ApproximateNumberOfMessages"]))
            except Exception as exc:
                log.debug("queue depth unavailable: %s", exc)

    # -- writing (the only thread that touches DuckDB) -----------------------------------------------

    def _writer_loop(self) -> None:
        store = ConsumerStore(self.settings.db_path, self.routing.automation)
        try:
            for incident in store.pending_webhooks():
                self._call_automation(incident)
            last_export = time.monotonic()
            while not (self._pollers_done() and self.pending.empty()):
                try:
                    _, _, priority, items, done = self.pending.get(timeout=0.2)
                except queue.Empty:
                    items = None
                if items:
                    items, dones = self._coalesce(priority, items, done)
                    try:
                        self._write(store, priority, items)
                    finally:
                        for event in dones:
                            event.set()
                self._retry_due_webhooks()
                self._store_webhook_results(store)
                if time.monotonic() - last_export > self.settings.export_interval_s:
                    self._export(store)
                    last_export = time.monotonic()
            self.webhooks.shutdown(wait=True)
            self._store_webhook_results(store)
            self._export(store)
        finally:
            store.close()

    def _coalesce(self, priority: str, items: list[Item], done: threading.Event | None) -> tuple[list[Item], list[threading.Event]]:
        """Take every other pending batch of the same priority too: one commit costs about as much as
        ten, so a burst is written in one transaction instead of queueing behind itself."""
        dones = [done] if done is not None else []
        held = []
        while len(items) < 500:
            try:
                entry = self.pending.get_nowait()
            except queue.Empty:
                break
            if entry[2] != priority:
                held.append(entry)
                break
            items = items + entry[3]
            if entry[4] is not None:
                dones.append(entry[4])
        for entry in held:
            self.pending.put(entry)
        return items, dones

    def _pollers_done(self) -> bool:
        return self.stopping.is_set() and not any(self.threads[n].is_alive() for n in ("high", "background"))

    def _write(self, store: ConsumerStore, priority: str, items: list[Item]) -> None:
        try:
            result = store.handle_batch(items)
        except Exception as exc:
            log.exception("batch of %d %s events failed; SQS will redeliver it: %s", len(items), priority, exc)
            self.metrics.errors.labels(priority=priority).inc()
            self.metrics.count(len(items), len(items))
            return
        self.deletes.put((priority, [it.receipt_handle for it in items]))
        for item, latency_ms in result.handled:
            self.metrics.latency.labels(priority=item.priority).observe(latency_ms / 1000)
        if result.handled:
            self.metrics.lag.labels(priority=priority).set(max(l for _, l in result.handled) / 1000)
        self.metrics.handled.labels(priority=priority).inc(len(result.handled))
        self.metrics.duplicates.labels(priority=priority).inc(result.duplicates)
        self.metrics.rejected.labels(priority=priority).inc(result.rejected)
        self.metrics.count(len(items), result.rejected)
        if result.rejected:
            log.warning("%d %s messages were not valid envelopes; kept in the rejected table", result.rejected, priority)
        for incident in result.new_incidents:
            self._call_automation(incident)

    def _delete_loop(self) -> None:
        """Deletes committed messages from SQS off the writer thread, so the writer is free for high."""
        while not (self.deletes.empty() and self._pollers_done() and not self.threads["writer"].is_alive()):
            try:
                priority, handles = self.deletes.get(timeout=0.2)
            except queue.Empty:
                continue
            for start in range(0, len(handles), 10):
                chunk = handles[start : start + 10]
                try:
                    self.sqs.delete_message_batch(QueueUrl=self.urls[priority], Entries=[{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(chunk)])
                except Exception as exc:  # handled already: a redelivery is recognised by event_id
                    log.warning("delete of %d %s messages failed; they will come back as duplicates: %s", len(chunk), priority, exc)

    def _call_automation(self, incident: dict, attempt: int = 1) -> None:
        rule = self.routing.automation.rule_for(incident["event_type"])
        url = os.environ.get(rule.webhook_env) if rule and rule.webhook_env else None
        secret = os.environ.get(rule.secret_env) if rule and rule.secret_env else None
        if not url:
            return  # recorded as not_configured in the incident row itself
        if not secret:
            self.webhook_results.put((incident["incident_id"], f"failed: {rule.secret_env} is not set"))
            return
        self.webhooks.submit(self._post_automation, url, secret, incident, attempt)

    def _post_automation(self, url: str, secret: str, incident: dict, attempt: int) -> None:
        """One signed attempt; a failed one is tried again after the routing config's `retry_delays_s`.

        The webhook-id is the incident id on every attempt, so the receiver can de-duplicate. Between
        attempts the incident reads `retrying (attempt n): <error>`, which a restarted consumer resumes.
        """
        import json

        body = json.dumps({**incident, "opened_at": format_ts(incident["opened_at"])}, sort_keys=True)
        result = post_signed(requests.Session(), url, secret, incident["incident_id"], body, 10)
        if result.ok:
            self.webhook_results.put((incident["incident_id"], "delivered"))
        elif attempt <= len(self.routing.retry_delays_s):
            # The status goes first: the next attempt's, however soon it is due, is stored after it.
            self.webhook_results.put((incident["incident_id"], f"{RETRYING} (attempt {attempt}): {result.error}"))
            with self._webhook_retries_lock:
                due = time.monotonic() + self.routing.retry_delays_s[attempt - 1]
                heapq.heappush(self._webhook_retries, (due, next(self._seq), attempt + 1, incident))
        else:
            self.webhook_results.put((incident["incident_id"], f"failed after {attempt} attempts: {result.error}"))
            log.warning("automation webhook for incident %s failed %d times; giving up: %s", incident["incident_id"], attempt, result.error)

    def _retry_due_webhooks(self) -> None:
        now, due = time.monotonic(), []
        with self._webhook_retries_lock:
            while self._webhook_retries and self._webhook_retries[0][0] <= now:
                due.append(heapq.heappop(self._webhook_retries))
        for _, _, attempt, incident in due:
            self._call_automation(incident, attempt)

    def _store_webhook_results(self, store: ConsumerStore) -> None:
        statuses = []
        while True:
            try:
                statuses.append(self.webhook_results.get_nowait())
            except queue.Empty:
                break
        if statuses:
            store.set_webhook_statuses(statuses)

    def _export(self, store: ConsumerStore) -> None:
        """Copy newly handled rows to the archive bucket's priority_handled log (for dbt SLA models)."""
        if not (self.filesystem and self.settings.archive_bucket):
            return
        rows = store.unexported()
        if not rows:
            return
        try:
            write_log(self.filesystem, self.settings.archive_bucket, "priority_handled", PRIORITY_HANDLED_SCHEMA, rows, "handled_at")
        except Exception as exc:
            log.warning("priority_handled export failed (will retry): %s", exc)
            return
        store.mark_exported([r["event_id"] for r in rows])

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> "PriorityConsumer":
        if self.settings.metrics_port is not None:
            self.http, _ = start_http_server(self.settings.metrics_port, addr="127.0.0.1", registry=self.metrics.registry)
        for name, target in (("writer", self._writer_loop), ("deleter", self._delete_loop), ("high", self._high_loop), ("background", self._background_loop)):
            thread = threading.Thread(target=target, name=f"consumer-{name}", daemon=True)
            self.threads[name] = thread
            thread.start()
        self.ready.set()
        log.info("priority consumer ready: queues %s", {p: self.routing.priority.queue_for(p) for p in PRIORITIES})
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        for name in ("high", "background", "writer", "deleter"):
            self.threads[name].join(timeout)
        if self.http:
            self.http.shutdown()
