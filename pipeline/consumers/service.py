"""The priority consumer service: high, medium and low SQS queues, high always served first.

Four threads. The high poller long-polls the high queue without pause, so a high event is picked up
within milliseconds of arriving. The background poller fetches medium (then low) only when nothing
waits to be written and keeps at most one such batch pending, so a backlog there never delays high.
One writer thread owns the DuckDB connection (DuckDB allows one writer) and always takes the most
urgent pending batch; a fourth deletes a batch's messages from SQS once it has committed.

One message's trouble is its own: a batch whose transaction fails is split until each failure is a
single message, which goes to the `rejected` table and is deleted, while the rest are handled. Only a
cause shared by all (the database cannot even record a rejection) leaves the batch in SQS, whose
redrive policy sets a message aside after a few receives. An event too big for SQS arrives as a
claim-check pointer; it is fetched off the pollers' threads, so a slow S3 holds no other message.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import requests
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from edge_bridge.claim_check import ROUTED_PREFIX, verify_and_fetch
from edge_bridge.envelope import EnvelopeRejected, claim_check_pointer, format_ts, parse_envelope
from pipeline.consumers.pending import LANES, PendingWork, lane
from pipeline.consumers.store import RETRYING, BatchResult, ConsumerStore, Item, open_store
from pipeline.routing.config import PRIORITIES, RoutingConfig
from pipeline.routing.logs import PRIORITY_HANDLED_SCHEMA, write_log
from pipeline.routing.webhooks import post_signed
from pipeline.stack import aws_client, load_stack_config

log = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class ConsumerMetrics:
    """What the consumer exports on /metrics (names from the monitoring contract where they exist)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "priority_queue_to_handled_seconds",
            "Seconds from SQS accepting an event to its batch committing",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.handled = Counter(
            "priority_events_handled", "Events handled (first time)", ["priority"], registry=self.registry
        )
        self.duplicates = Counter(
            "priority_duplicates_skipped",
            "Redelivered events recognised by (site_id, event_id)",
            ["priority"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "priority_messages_rejected",
            "Messages kept in the rejected table instead of handled (not valid envelopes, or failed alone)",
            ["priority"],
            registry=self.registry,
        )
        self.errors = Counter(
            "priority_batch_errors",
            "Batch transactions that failed (their messages were then tried in smaller groups)",
            ["priority"],
            registry=self.registry,
        )
        self.left = Counter(
            "priority_messages_left_for_redelivery",
            "Messages not deleted for a shared cause (database not writable, S3 unreachable)",
            ["priority"],
            registry=self.registry,
        )
        self.lag = Gauge(
            "consumer_lag", "Queue-to-handled seconds of the most recent batch", ["priority"], registry=self.registry
        )
        self.depth = Gauge("sqs_queue_depth", "Visible messages in a priority queue", ["queue"], registry=self.registry)
        self.error_rate = Gauge(
            "processing_error_rate", "Failed or rejected messages / messages received", registry=self.registry
        )
        self.taken_over = Counter(
            "priority_automation_taken_over",
            "Unsettled automation webhooks taken over from a consumer replica that is gone",
            registry=self.registry,
        )
        self.in_hand = Gauge(
            "priority_messages_in_hand",
            "Messages received from SQS and not yet settled (committed, rejected or left for redelivery)",
            registry=self.registry,
        )
        self._received = 0
        self._failed = 0

    def count(self, received: int, failed: int) -> None:
        self._received += received
        self._failed += failed
        self.error_rate.set(self._failed / self._received if self._received else 0.0)


@dataclass
class ConsumerSettings:
    db_path: str  # the DuckDB file, unless store_url names a PostgreSQL server
    store_url: str | None = None  # postgresql://…: the store shared by every replica
    metrics_port: int | None = None
    archive_bucket: str | None = None
    claim_check_bucket: str | None = None  # None: the stack config's claim_check.bucket
    export_interval_s: float = 5.0
    high_wait_s: int = 1
    background_batch: int = 100  # per transaction; a high batch waits for at most one of these
    max_pending_high: int = 1000  # high messages received and not yet written; the high poller waits beyond
    claim_check_workers: int = 2  # per lane (high; medium and low)
    depth_interval_s: float = 5.0
    takeover_interval_s: float = 5.0  # how often to look for automation webhooks a gone replica left

    @property
    def store_location(self) -> str:
        return self.store_url or self.db_path


def _without_body(item: Item) -> Item:
    return Item(
        item.priority,
        item.receipt_handle,
        item.enqueued_at,
        item.event,
        "",
        message_id=item.message_id,
        receive_count=item.receive_count,
    )


class PriorityConsumer:
    def __init__(self, routing: RoutingConfig, sqs, settings: ConsumerSettings, filesystem=None, s3=None) -> None:
        self.routing, self.sqs, self.settings, self.filesystem = routing, sqs, settings, filesystem
        self.urls = {p: sqs.get_queue_url(QueueName=routing.priority.queue_for(p))["QueueUrl"] for p in PRIORITIES}
        self.metrics = ConsumerMetrics()
        self.pending = PendingWork(settings.max_pending_high)
        self.metrics.in_hand.set_function(self.pending.outstanding)
        self._seq = itertools.count()
        self.stopping = threading.Event()
        self.threads: dict[str, threading.Thread] = {}
        self._s3 = s3
        self._s3_lock = threading.Lock()
        self.claim_check_bucket = settings.claim_check_bucket or load_stack_config().claim_check.bucket
        # A lane each, so claim checks of a medium/low backlog never queue ahead of a high one.
        self.claim_checks = {
            name: ThreadPoolExecutor(
                max_workers=settings.claim_check_workers, thread_name_prefix=f"consumer-claim-check-{name}"
            )
            for name in LANES
        }
        self.webhooks = ThreadPoolExecutor(max_workers=2)
        self.webhook_results: queue.Queue = queue.Queue()
        self._webhook_retries: list[tuple[float, int, int, dict]] = []  # heap of (due, seq, attempt, incident)
        self._webhook_retries_lock = threading.Lock()
        self.deletes: queue.Queue = queue.Queue()
        self.http = None
        self.ready = threading.Event()

    # -- receiving -------------------------------------------------------------------------------

    def _receive(self, priority: str, wait_s: int, max_messages: int = 10) -> tuple[list[Item], int]:
        """Received messages as items, and how many there were (claim-check pointers come later)."""
        messages = self.sqs.receive_message(
            QueueUrl=self.urls[priority],
            MaxNumberOfMessages=max_messages,
            WaitTimeSeconds=wait_s,
            MessageSystemAttributeNames=["SentTimestamp", "ApproximateReceiveCount"],
        ).get("Messages", [])
        self.pending.admit(priority, len(messages))
        items = []
        for message in messages:
            try:
                item = self._item(priority, message)
            except Exception:  # noqa: BLE001 - a message SQS sent without a receipt handle: nothing to settle
                log.exception("%s message %s unusable", priority, message.get("MessageId"))
                self.pending.settle(priority, 1)
                continue
            if item is not None:
                items.append(item)
        return items, len(messages)

    def _item(self, priority: str, message: dict) -> Item | None:
        """The message as an item; a claim-check pointer is fetched on another thread (None here)."""
        attributes = message.get("Attributes", {})
        try:
            enqueued_at = datetime.fromtimestamp(int(attributes["SentTimestamp"]) / 1000, tz=UTC)
        except (KeyError, ValueError):
            enqueued_at = datetime.now(UTC)
        count = attributes.get("ApproximateReceiveCount", "0")
        base = {
            "priority": priority,
            "receipt_handle": message["ReceiptHandle"],
            "enqueued_at": enqueued_at,
            "body": message.get("Body", ""),
            "message_id": message.get("MessageId", ""),
            "receive_count": int(count) if count.isdigit() else 0,
        }
        try:
            if claim_check_pointer(base["body"]) is None:
                return Item(**base, event=parse_envelope(base["body"]))
        except EnvelopeRejected as exc:
            return Item(**base, event=None, reject_reason=f"{exc.reason}: {exc.detail}", error_type=type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - whatever it is, it is this message's alone
            return Item(
                **base,
                event=None,
                reject_reason=f"unreadable: {type(exc).__name__}: {exc}",
                error_type=type(exc).__name__,
            )
        try:
            self.claim_checks[lane(priority)].submit(self._resolve_claim_check, base)
        except RuntimeError:  # shutting down: the message comes back to the next consumer
            self.pending.settle(priority, 1)
        return None

    def _resolve_claim_check(self, base: dict) -> None:
        """Fetch the envelope a pointer names; bad input is rejected, an unreachable S3 leaves it in SQS."""
        try:
            text = verify_and_fetch(
                self._s3_client(), base["body"], bucket=self.claim_check_bucket, prefix=ROUTED_PREFIX
            )
            item = Item(**base, event=parse_envelope(text))
        except EnvelopeRejected as exc:
            item = Item(**base, event=None, reject_reason=f"{exc.reason}: {exc.detail}", error_type=type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - S3 (or its client) failed: not this message's fault
            log.warning(
                "claim check of %s message %s not fetched; left for redelivery: %s: %s",
                base["priority"],
                base["message_id"],
                type(exc).__name__,
                exc,
            )
            self.metrics.left.labels(priority=base["priority"]).inc()
            self.pending.settle(base["priority"], 1)
            return
        self.pending.put(base["priority"], [item])

    def _s3_client(self):
        with self._s3_lock:
            if self._s3 is None:
                self._s3 = aws_client("s3")
            return self._s3

    def _high_loop(self) -> None:
        while not self.stopping.is_set():
            if not self.pending.wait_for_high_room(10, timeout=0.5):
                continue  # the writer is behind: SQS keeps the rest until there is room
            try:
                items, _ = self._receive("high", self.settings.high_wait_s)
            except Exception as exc:
                log.warning("high queue receive failed: %s", exc)
                self.stopping.wait(0.5)
                continue
            if items:
                self.pending.put("high", items)

    def _background_loop(self) -> None:
        last_depth = 0.0
        while not self.stopping.is_set():
            if time.monotonic() - last_depth > self.settings.depth_interval_s:
                self._update_depths()
                last_depth = time.monotonic()
            # One background batch at a time, and only when nothing more urgent waits to be written.
            if not self.pending.wait_background_idle(0.5) or self.pending.queued():
                self.stopping.wait(0.005)
                continue
            try:
                priority, items = "medium", self._receive_background("medium")
                if items is None:
                    priority, items = "low", self._receive_background("low")
            except Exception as exc:
                log.warning("medium/low receive failed: %s", exc)
                self.stopping.wait(0.5)
                continue
            if items is None:
                self.stopping.wait(0.2)
            elif items:
                self.pending.put(priority, items)

    def _receive_background(self, priority: str) -> list[Item] | None:
        """Up to `background_batch` messages of one queue (None: it had none), written in few transactions."""
        items: list[Item] = []
        received = 0
        while received < self.settings.background_batch and not self.pending.queued():
            want = min(10, self.settings.background_batch - received)
            try:
                got, n = self._receive(priority, 0, want)
            except Exception as exc:
                if not received:
                    raise
                log.warning("%s receive failed; writing the %d messages received so far: %s", priority, received, exc)
                break
            items += got
            received += n
            if n < want:
                break
        return items if received else None

    def _update_depths(self) -> None:
        for priority, url in self.urls.items():
            try:
                attrs = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])[
                    "Attributes"
                ]
                self.metrics.depth.labels(queue=self.routing.priority.queue_for(priority)).set(
                    int(attrs["ApproximateNumberOfMessages"])
                )
            except Exception as exc:
                log.debug("queue depth unavailable: %s", exc)

    # -- writing (the only thread that touches DuckDB) -----------------------------------------------

    def _writer_loop(self) -> None:
        store = open_store(self.settings.store_location, self.routing.automation)
        try:
            self._take_over_webhooks(store)
            last_export = last_takeover = time.monotonic()
            while not (self._pollers_done() and self.pending.outstanding() == 0):
                try:
                    taken = self.pending.take(timeout=0.2)
                    if taken:
                        priority, items = taken
                        try:
                            self._write(store, priority, items)
                        finally:
                            self.pending.settle(priority, len(items))
                    self._retry_due_webhooks()
                    self._store_webhook_results(store)
                    if time.monotonic() - last_takeover > self.settings.takeover_interval_s:
                        self._take_over_webhooks(store)
                        last_takeover = time.monotonic()
                    if time.monotonic() - last_export > self.settings.export_interval_s:
                        self._export(store)
                        last_export = time.monotonic()
                except Exception:  # noqa: BLE001 - the writer outlives anything one round throws
                    log.exception("priority consumer writer round failed")
            self.webhooks.shutdown(wait=True)
            self._store_webhook_results(store)
            self._export(store)
        finally:
            store.close()

    def _take_over_webhooks(self, store: ConsumerStore) -> None:
        """Call the webhooks of incidents no running consumer sees to (at start: this one's own, left by its
        previous run; later: a gone replica's)."""
        incidents = store.orphaned_webhooks()
        self.metrics.taken_over.inc(len(incidents))
        for incident in incidents:
            self._call_automation(incident)

    def _pollers_done(self) -> bool:
        return self.stopping.is_set() and not any(self.threads[n].is_alive() for n in ("high", "background"))

    def _write(self, store: ConsumerStore, priority: str, items: list[Item]) -> None:
        """Commit a batch, or each of its messages' own fate if the batch cannot commit; then delete."""
        try:
            results, left = [store.handle_batch(items)], []
        except Exception as exc:
            log.warning(
                "batch of %d %s messages failed (%s: %s); trying them in smaller groups",
                len(items),
                priority,
                type(exc).__name__,
                exc,
            )
            self.metrics.errors.labels(priority=priority).inc()
            results, left = self._isolate(store, items, exc)
        kept = {id(item) for item in left}
        settled = [item.receipt_handle for item in items if id(item) not in kept]
        if settled:
            self.deletes.put((priority, settled))
        handled = [h for r in results for h in r.handled]
        for item, latency_ms in handled:
            self.metrics.latency.labels(priority=item.priority).observe(latency_ms / 1000)
        if handled:
            self.metrics.lag.labels(priority=priority).set(max(latency for _, latency in handled) / 1000)
        rejected = sum(r.rejected for r in results)
        self.metrics.handled.labels(priority=priority).inc(len(handled))
        self.metrics.duplicates.labels(priority=priority).inc(sum(r.duplicates for r in results))
        self.metrics.rejected.labels(priority=priority).inc(rejected)
        self.metrics.left.labels(priority=priority).inc(len(left))
        self.metrics.count(len(items), rejected + len(left))
        if rejected:
            log.warning("%d %s messages kept in the rejected table", rejected, priority)
        for incident in (i for r in results for i in r.new_incidents):
            try:
                self._call_automation(incident)
            except Exception as exc:  # noqa: BLE001 - one incident's automation is its own
                log.exception("automation for incident %s not started", incident["incident_id"])
                self.webhook_results.put((incident["incident_id"], f"failed: {type(exc).__name__}: {exc}"))

    def _isolate(
        self, store: ConsumerStore, items: list[Item], failure: Exception
    ) -> tuple[list[BatchResult], list[Item]]:
        """Split a failed batch until each failure is one message's own, and reject that message.

        Halving costs about 2·log2(n) transactions per bad message instead of n. If even the rejection
        cannot be written, the cause is shared (the database): what has not committed stays in SQS.
        Returns the results and the messages left for redelivery.
        """
        results: list[BatchResult] = []
        groups: deque[tuple[list[Item], Exception | None]] = deque([(items, failure)])
        while groups:
            group, exc = groups.popleft()
            if exc is None:
                try:
                    results.append(store.handle_batch(group))
                    continue
                except Exception as failed:  # noqa: BLE001 - bisected below
                    exc = failed
            if len(group) > 1:
                half = len(group) // 2
                groups.extendleft([(group[half:], None), (group[:half], None)])
                continue
            [item] = group
            if not self._reject_alone(store, item, exc):
                return results, [item] + [other for rest, _ in groups for other in rest]
            results.append(BatchResult(rejected=1))
        return results, []

    def _reject_alone(self, store: ConsumerStore, item: Item, exc: Exception) -> bool:
        """Record a message that failed by itself; False when nothing can be recorded (a shared cause)."""
        error_type = type(exc).__name__
        for candidate, reason in (
            (item, f"handling_failed: {error_type}: {exc}"),
            (_without_body(item), f"handling_failed: {error_type}"),
        ):
            try:
                store.reject([(candidate, reason, error_type)])
            except Exception as failed:  # noqa: BLE001 - tried once more without the message's own text
                cause = failed
                continue
            where = item.event.dedupe_id if item.event else "-"
            log.warning(
                "%s message %s (event %s) failed alone and is kept in the rejected table: %s",
                item.priority,
                item.message_id,
                where,
                reason,
            )
            return True
        log.error(
            "the rejected table cannot be written either (%s: %s); leaving the batch in SQS",
            type(cause).__name__,
            cause,
        )
        return False

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
                    failed = self.sqs.delete_message_batch(
                        QueueUrl=self.urls[priority],
                        Entries=[{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(chunk)],
                    ).get("Failed", [])
                except Exception as exc:  # settled already: a redelivery is recognised by (site_id, event_id)
                    log.warning(
                        "delete of %d %s messages failed; they will come back as duplicates: %s",
                        len(chunk),
                        priority,
                        exc,
                    )
                    continue
                if failed:
                    log.warning(
                        "%d of %d %s deletes failed; they will come back as duplicates: %s",
                        len(failed),
                        len(chunk),
                        priority,
                        failed[0].get("Message"),
                    )

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
        try:
            self._attempt_automation(url, secret, incident, attempt)
        except Exception as exc:  # noqa: BLE001 - an attempt that cannot even be made ends this incident's webhook
            log.exception("automation webhook for incident %s could not be attempted", incident["incident_id"])
            self.webhook_results.put((incident["incident_id"], f"failed: {type(exc).__name__}: {exc}"))

    def _attempt_automation(self, url: str, secret: str, incident: dict, attempt: int) -> None:
        """One signed attempt; a failed one is tried again after the routing config's `retry_delays_s`.

        The webhook-id is the incident id on every attempt, so the receiver can de-duplicate. Between
        attempts the incident reads `retrying (attempt n): <error>`, which a restarted consumer resumes.
        """
        body = json.dumps({**incident, "opened_at": format_ts(incident["opened_at"])}, sort_keys=True)
        with requests.Session() as session:
            result = post_signed(session, url, secret, incident["incident_id"], body, 10)
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
            log.warning(
                "automation webhook for incident %s failed %d times; giving up: %s",
                incident["incident_id"],
                attempt,
                result.error,
            )

    def _retry_due_webhooks(self) -> None:
        now, due = time.monotonic(), []
        with self._webhook_retries_lock:
            while self._webhook_retries and self._webhook_retries[0][0] <= now:
                due.append(heapq.heappop(self._webhook_retries))
        for _, _, attempt, incident in due:
            try:
                self._call_automation(incident, attempt)
            except Exception as exc:  # noqa: BLE001 - one incident's automation is its own
                self.webhook_results.put((incident["incident_id"], f"failed: {type(exc).__name__}: {exc}"))

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

        def write(rows: list[dict]) -> None:
            write_log(
                self.filesystem,
                self.settings.archive_bucket,
                "priority_handled",
                PRIORITY_HANDLED_SCHEMA,
                rows,
                "handled_at",
            )

        try:
            store.export(write)
        except Exception as exc:
            log.warning("priority_handled export failed (will retry): %s", exc)

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> PriorityConsumer:
        if self.settings.metrics_port is not None:
            self.http, _ = start_http_server(
                self.settings.metrics_port, addr="127.0.0.1", registry=self.metrics.registry
            )
        for name, target in (
            ("writer", self._writer_loop),
            ("deleter", self._delete_loop),
            ("high", self._high_loop),
            ("background", self._background_loop),
        ):
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
        for executor in self.claim_checks.values():
            executor.shutdown(wait=False, cancel_futures=True)
        if self.http:
            self.http.shutdown()
