"""Sender processes: parsing, claim checks and SendMessageBatch calls, outside the MQTT process.

boto3 spends most of a SendMessageBatch call in Python (serialising, signing, parsing), and so does
pydantic validating an envelope. In the MQTT process that work competes for one interpreter lock
with paho's network loop; in a pool of processes it runs on every core. The service hands a pool
worker a chunk of raw MQTT messages (or retry jobs) and gets back, per message, what happened:
sent, rejected as bad input (with the reason), or failed (with the error). The worker never
acknowledges, quarantines or persists anything: the service does, in its own process, so the
persist-before-ack order and the single DuckDB writer stay where they were.

With `processes=0` the same functions run on threads of the service's own process (tests, tiny
sites). A worker that dies (OOM, `kill -9`) breaks the pool; the service rebuilds it and resubmits
the chunk, whose messages were never acknowledged.

Whatever one message raises, foreseen or not, is that message's fate: it comes back `rejected` as a
`processing_error` (stage and exception type in the detail) and the rest of its chunk goes on.

The express lane: with an express queue configured, an event of a high-priority type (the catalog's)
is also sent there, in the same round and before the chunk's sends to the events queue, so an alarm
reaches the cloud's fast path without waiting for the drain. That send is extra and best effort: it
never decides whether a message is acknowledged (only the events queue does), a failure is counted
and ignored (the drain brings the event anyway), and the cloud de-duplicates the two copies.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from edge_bridge.claim_check import ClaimChecker, s3_client
from edge_bridge.envelope import EnvelopeRejected, parse_envelope
from edge_bridge.manifest import HourKey, event_hour, event_hour_of_body
from edge_bridge.priorities import EXPRESS_PRIORITY, UNKNOWN_PRIORITY
from edge_bridge.quarantine import PROCESSING_ERROR, error_detail
from edge_bridge.sqs_sender import SQS_BATCH_MAX, Outgoing, SqsBatchSender, sqs_client

log = logging.getLogger(__name__)

# A chunk is the unit handed to a worker: large enough to pay for the hand-over (250 gave ~8% more
# than 100 on the edge benchmark), small enough that the acks of a chunk follow its first message by
# milliseconds, and that the chunks in flight (two per sender) fit in the broker's 1,000-message window.
CHUNK_MAX = 250


@dataclass(frozen=True)
class WorkerSettings:
    fifo: bool
    claim_check_bucket: str
    max_message_bytes: int
    express_queue_url: str | None = None  # None: no express lane
    # (event type, priority) pairs from the catalog: which events take the express lane, and the
    # priority a failed one is committed to the retry log with.
    priorities: tuple[tuple[str, str], ...] = ()


@dataclass
class ChunkResult:
    """What became of each message of a chunk, by the caller's token."""

    sent: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (token, reason, detail)
    failed: list[tuple[int, str, str]] = field(
        default_factory=list
    )  # (token, event_id, error): the caller has the body
    call_error: str | None = None  # a call failed outright (network, throttling): SQS may be down
    claim_checks: int = 0
    send_seconds: list[float] = field(default_factory=list)
    priorities: dict[int, str] = field(default_factory=dict)  # token -> priority, for the failed ones (retry log)
    express_sent: int = 0  # events the express queue took as well
    express_failed: int = 0  # express sends that failed (ignored: the events queue decides)
    express_calls: int = 0
    # Reconciliation (edge_bridge.manifest): SQS messages created per (site, event hour), and the
    # (site, event hour) of each failed token, for the accepted count when the retry log commits it.
    sent_hours: dict[HourKey, int] = field(default_factory=dict)
    hours: dict[int, HourKey] = field(default_factory=dict)


@dataclass(frozen=True)
class _Item:
    token: int
    event_id: str
    site_id: str
    body: str
    priority: str = UNKNOWN_PRIORITY
    hour: HourKey | None = None  # (site, event hour); a retry job's is read from its body when it is sent


class _Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.endpoint = os.environ.get("AWS_ENDPOINT_URL")
        self.sqs = sqs_client()
        self.claim_checker = ClaimChecker(s3_client(), settings.claim_check_bucket, settings.max_message_bytes)
        self.priorities = dict(settings.priorities)

    def prepare_and_send(self, messages: list[tuple[int, str, bytes]], queue_url: str) -> ChunkResult:
        """Validate raw MQTT messages, then send them."""
        items, result = validate(messages, self.priorities)
        self._send_all(items, queue_url, result)
        return result

    def send_jobs(self, jobs: list[tuple[int, str, str] | tuple[int, str, str, str]], queue_url: str) -> ChunkResult:
        """Send retry-log jobs (token, event_id, body[, priority]): bodies were validated when they came in."""
        result = ChunkResult()
        self._send_all([_Item(job[0], job[1], "", job[2], *job[3:4]) for job in jobs], queue_url, result)
        return result

    def _send_all(self, items: list[_Item], queue_url: str, result: ChunkResult) -> None:
        if self.settings.express_queue_url:
            self._send_express([item for item in items if item.priority == EXPRESS_PRIORITY], result)
        sender = SqsBatchSender(self.sqs, queue_url, fifo=self.settings.fifo)
        for batch in self._batches(items):
            if result.call_error:
                # A call already failed outright: fail the rest of the chunk at once, with no claim
                # check put to S3 for it and no timeout per batch.
                result.failed += [(item.token, item.event_id, result.call_error) for item in batch]
                continue
            outgoing = []
            for item in batch:
                try:
                    outgoing.append(self._outgoing(item, result))
                except Exception as exc:  # noqa: BLE001 - S3 down: the event waits in the retry log
                    result.failed.append(
                        (item.token, item.event_id, f"claim check failed: {type(exc).__name__}: {exc}")
                    )
            if not outgoing:
                continue
            try:
                self._send(sender, outgoing, result)
            except Exception:  # noqa: BLE001 - unforeseen: send the batch's events one by one to find the one at fault
                for event in outgoing:
                    if result.call_error:
                        result.failed.append((event.key.token, event.event_id, result.call_error))
                        continue
                    try:
                        self._send(sender, [event], result)
                    except Exception as exc:  # noqa: BLE001 - it raises alone: its own fate
                        result.rejected.append((event.key.token, PROCESSING_ERROR, error_detail("send", exc)))
        if result.failed:
            by_token = {item.token: item for item in items}
            result.priorities.update((token, by_token[token].priority) for token, _, _ in result.failed)
            result.hours.update((token, by_token[token].hour) for token, _, _ in result.failed if by_token[token].hour)

    def _send_express(self, items: list[_Item], result: ChunkResult) -> None:
        """Best effort: the high-priority events of the chunk to the express queue too, never instead.

        A body over the SQS limit is left to the drain (the express lane carries no claim checks).
        Whatever fails here is counted and forgotten; it changes nothing about the message's fate. A
        call that fails outright ends the express sends of this chunk, so an unreachable express queue
        costs a chunk at most one timeout before its sends to the events queue.
        """
        url = self.settings.express_queue_url
        items = [item for item in items if not self.claim_checker.needs_claim_check(item.body)]
        if not items:
            return
        sender = SqsBatchSender(self.sqs, url, fifo=url.endswith(".fifo"))
        batches = self._batches(items)
        for i, batch in enumerate(batches):
            result.express_calls += 1
            try:
                outcome = sender.send(
                    [
                        Outgoing(key=item, event_id=item.event_id, site_id=_group_of(item, sender.fifo), body=item.body)
                        for item in batch
                    ]
                )
            except Exception as exc:  # noqa: BLE001 - best effort, whatever it was
                log.warning(
                    "express send of %d events raised %s: ignored, the drain brings them",
                    len(batch),
                    type(exc).__name__,
                )
                result.express_failed += len(batch)
                continue
            result.express_sent += len(outcome.sent)
            result.express_failed += len(outcome.failed)
            if outcome.call_error:
                # The express queue does not answer: the rest of the chunk does not wait for it.
                log.warning("express send failed (%s): ignored, the drain brings the events", outcome.call_error)
                result.express_failed += sum(len(rest) for rest in batches[i + 1 :])
                return

    @staticmethod
    def _send(sender: SqsBatchSender, outgoing: list[Outgoing], result: ChunkResult) -> None:
        started = time.perf_counter()
        outcome = sender.send(outgoing)
        result.send_seconds.append(time.perf_counter() - started)
        result.sent += [event.key.token for event in outcome.sent]
        for event in outcome.sent:
            key = event.key.hour or _hour_of(event.key.body)
            if key is not None:
                result.sent_hours[key] = result.sent_hours.get(key, 0) + 1
        result.failed += [(event.key.token, event.event_id, error) for event, error in outcome.failed]
        if outcome.call_error:
            result.call_error = outcome.call_error

    def _outgoing(self, item: _Item, result: ChunkResult) -> Outgoing:
        """The SQS message for an item: an oversized body goes to S3 and SQS carries the pointer.

        A retry job's site is parsed from its body only where something reads it (a FIFO
        MessageGroupId, a claim check's key), and then once.
        """
        body = item.body
        oversized = self.claim_checker.needs_claim_check(body)
        site = item.site_id or (_site_of(body) if self.settings.fifo or oversized else "")
        if oversized:
            body = self.claim_checker.check_in(item.event_id, site, body)
            result.claim_checks += 1
        return Outgoing(key=item, event_id=item.event_id, site_id=site, body=body)

    def _batches(self, items: list[_Item]) -> list[list[_Item]]:
        """Batches of at most ten whose bodies fit SQS's per-request size limit together."""
        batches, current, size = [], [], 0
        limit = self.claim_checker.max_body_bytes
        for item in items:
            n = min(len(item.body), limit)
            if current and (len(current) == SQS_BATCH_MAX or size + n > limit):
                batches.append(current)
                current, size = [], 0
            current.append(item)
            size += n
        if current:
            batches.append(current)
        return batches


def validate(
    messages: list[tuple[int, str, bytes]], priorities: dict[str, str] | None = None
) -> tuple[list[_Item], ChunkResult]:
    """Envelopes that parse and match their topic's site; the others as `rejected`, with the reason.

    `priorities` (event type -> priority, the catalog's) gives each item its priority.
    """
    result, items = ChunkResult(), []
    priorities = priorities or {}
    for token, topic, payload in messages:
        try:
            envelope = parse_envelope(payload)
            parts = topic.split("/")
            if len(parts) < 2 or parts[0] != "sites" or parts[1] != envelope.site_id:
                result.rejected.append(
                    (token, "site_mismatch", f"topic {topic!r} carries an event of site {envelope.site_id!r}")
                )
                continue
            priority = priorities.get(envelope.event_type, UNKNOWN_PRIORITY)
            hour = (envelope.site_id, event_hour(envelope.timestamp, envelope.received_at))
            items.append(_Item(token, envelope.event_id, envelope.site_id, payload.decode("utf-8"), priority, hour))
        except EnvelopeRejected as exc:
            result.rejected.append((token, exc.reason, exc.detail))
        except Exception as exc:  # noqa: BLE001 - whatever else one message raises is its fate, not its chunk's
            result.rejected.append((token, PROCESSING_ERROR, error_detail("validate", exc)))
    return items, result


def not_sent(
    messages: list[tuple[int, str, bytes]], reason: str, priorities: dict[str, str] | None = None
) -> ChunkResult:
    """With SQS down: validated messages, all failed with `reason`, for the retry log."""
    items, result = validate(messages, priorities)
    result.failed = [(i.token, i.event_id, reason) for i in items]
    result.priorities = {i.token: i.priority for i in items}
    result.hours = {i.token: i.hour for i in items}
    return result


def _group_of(item: _Item, fifo: bool) -> str:
    """A FIFO queue's MessageGroupId is the site; a standard queue needs none."""
    return (item.site_id or _site_of(item.body)) if fifo else ""


def _hour_of(body: str) -> HourKey | None:
    try:
        return event_hour_of_body(body)
    except Exception:  # noqa: BLE001 - a body the retry log kept is valid; a count is not worth a failed send
        log.warning("cannot read the site and hour of a sent event for reconciliation")
        return None


def _site_of(body: str) -> str:
    try:
        return parse_envelope(body).site_id
    except Exception:  # noqa: BLE001 - the site only names a FIFO group or a claim-check key
        return "unknown"


# --- the pool's entry points (module-level, so a spawned process can import them) -------------------
_worker: _Worker | None = None
_worker_lock = threading.Lock()


def _init(settings: WorkerSettings, parent_pid: int | None = None, started=None) -> None:
    global _worker
    with _worker_lock:
        # In thread mode the worker is shared by the process: a new endpoint (a test's new emulator) needs new clients.
        if _worker is None or _worker.settings != settings or _worker.endpoint != os.environ.get("AWS_ENDPOINT_URL"):
            _worker = _Worker(settings)
    if parent_pid is not None:
        threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    if started is not None:
        started.put(os.getpid())


def _exit_with_parent(parent_pid: int) -> None:
    """A `kill -9`ed service cannot shut its pool down: its workers notice and leave on their own."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(0)


def _ping() -> int:
    return os.getpid()


def prepare_and_send(messages: list[tuple[int, str, bytes]], queue_url: str) -> ChunkResult:
    return _worker.prepare_and_send(messages, queue_url)


def send_jobs(jobs: list[tuple[int, str, str] | tuple[int, str, str, str]], queue_url: str) -> ChunkResult:
    return _worker.send_jobs(jobs, queue_url)


class SenderPool:
    """The service's handle on its workers; rebuilds the pool when a worker process dies."""

    def __init__(self, settings: WorkerSettings, processes: int, threads: int = 4) -> None:
        self.settings = settings
        self.processes = processes
        self.threads = threads
        self._lock = threading.Lock()
        self.pids: list[int] = []  # the worker processes, for the status page (none in thread mode)
        self._executor: Executor = self._new_executor()

    @property
    def size(self) -> int:
        return self.processes or self.threads

    def _new_executor(self) -> Executor:
        if self.processes <= 0:
            return ThreadPoolExecutor(
                self.threads, thread_name_prefix="sqs-sender", initializer=_init, initargs=(self.settings, None)
            )
        # spawn, not fork: the service has threads (paho, DuckDB) that a forked child must not inherit.
        context = multiprocessing.get_context("spawn")
        started = context.Queue()
        executor = ProcessPoolExecutor(
            self.processes, mp_context=context, initializer=_init, initargs=(self.settings, os.getpid(), started)
        )
        # The pool starts a process per task while none is idle; a process takes a second to start,
        # so these tasks start them all now, and the service fails at start, not on its first event.
        for future in [executor.submit(_ping) for _ in range(self.processes)]:
            future.result(timeout=120)
        self.pids = sorted(started.get(timeout=30) for _ in range(self.processes))
        log.info("%d sender processes ready (pids %s)", len(self.pids), ", ".join(map(str, self.pids)))
        return executor

    def submit(self, fn: Callable[..., ChunkResult], *args) -> Future:
        while True:
            executor = self._executor
            try:
                future = executor.submit(fn, *args)
            except BrokenProcessPool:
                self.rebuild(executor)
                continue
            future.executor = executor  # so whoever sees it fail can rebuild exactly that pool
            return future

    def rebuild(self, broken: Executor) -> None:
        """Replace a broken pool (once, however many callers noticed)."""
        with self._lock:
            if self._executor is not broken:
                return
            log.error("a sender process died: starting a new pool; its chunks stay unacked and are resubmitted")
            broken.shutdown(wait=False, cancel_futures=True)
            self._executor = self._new_executor()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
