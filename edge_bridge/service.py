"""The edge service: MQTT (QoS 1, persistent session) to SQS, with a DuckDB retry log behind it.

Every event gets an immediate, batched attempt at SQS. What SQS does not take becomes a job in the
retry log (committed in one transaction per group), and only then is its MQTT message acknowledged:
persist before acknowledging, so a `kill -9` at any instant leaves each event in the broker, in SQS
or in the retry log. A poller retries due jobs with backoff; after the third failure a job moves to
the local DLQ, which a replay (daily at 02:00 site time, or on demand) puts back in line.

When a call to SQS fails outright, a circuit breaker sends new events straight to the retry log
(no per-event timeout) and a probe checks SQS every `probe_interval_s` until it answers again.
At the retry log's size bound the service stops acknowledging: the broker keeps the backlog.

An event's priority (the catalog's) decides two things here: with an express queue configured, a
high-priority event is also sent there in the same sender round (best effort, never instead of the
events queue, so the acknowledgement still waits for `events` or the retry log), and the retry log
replays high-priority jobs before the rest, so an alarm buffered during an outage goes out first.

One bad message never holds up another. Whatever a message raises at any stage (intake, a sender,
settling, the retry log writer, a retry) is its own fate: a chunk or group that raises is split until
the message at fault is alone, and that one is quarantined as `processing_error` and acknowledged,
while the rest goes on. Only a cause that is truly shared (a sender process died, SQS unreachable, a
full disk) fails a whole chunk, and then nothing of it is acknowledged.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Iterable
from concurrent.futures import BrokenExecutor, Future
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_bridge.config import EdgeConfig
from edge_bridge.envelope import Envelope, make_idempotency_key, utc_now
from edge_bridge.manifest import HourCounts, HourKey, ManifestWriter
from edge_bridge.metrics import EdgeMetrics
from edge_bridge.mqtt_client import Client
from edge_bridge.priorities import UNKNOWN_PRIORITY, catalog_priorities
from edge_bridge.quarantine import PROCESSING_ERROR, Quarantine, error_detail
from edge_bridge.retry_log import Job, RetryLog
from edge_bridge.retry_log_salvage import check_at_start
from edge_bridge.send_workers import (
    CHUNK_MAX,
    ChunkResult,
    SenderPool,
    WorkerSettings,
    not_sent,
    prepare_and_send,
    send_jobs,
)
from edge_bridge.sqs_sender import sqs_client

log = logging.getLogger(__name__)

EVENTS_TOPIC = "sites/+/events/#"
INTERNAL_SOURCE = "edge"
SPILL_GROUP_MAX = 2000
SPILL_GROUP_MIN = 1000
SPILL_LINGER_S = 0.02
POLL_BATCH = 1000


@dataclass(slots=True)
class Received:
    """One message on its way, acknowledged exactly when the event is safe (SQS, retry log, quarantine).

    An MQTT message is acknowledged by its `mid` on the connection (`session`) it came on; an internal
    event, which has no MQTT message, by setting `persisted`.
    """

    topic: str
    payload: bytes
    mid: int = 0
    session: int = 0
    persisted: threading.Event | None = None


@dataclass(slots=True)
class Ready:
    received: Received
    event_id: str
    priority: str = UNKNOWN_PRIORITY  # the catalog's, recorded with the job so high is replayed first
    hour: HourKey | None = None  # (site, event hour), counted as accepted when the retry log commits it

    @property
    def body(self) -> str:
        """The envelope as received (validated UTF-8); the retry log keeps this, never a claim-check pointer."""
        return self.received.payload.decode("utf-8")


class Inbox:
    """MQTT loop → dispatcher: an append costs the loop no lock; the dispatcher takes whole chunks."""

    def __init__(self) -> None:
        self._items: collections.deque[Received] = collections.deque()
        self._arrived = threading.Event()

    def put(self, item: Received) -> None:
        self._items.append(item)
        if not self._arrived.is_set():
            self._arrived.set()

    def take(self, max_items: int, linger_s: float, timeout: float) -> list[Received]:
        """Up to `max_items`; lingers `linger_s` once for a chunk to fill; [] after `timeout` with nothing."""
        if not self._items:
            self._arrived.clear()
            if not self._items and not self._arrived.wait(timeout):
                return []
        if len(self._items) < max_items and linger_s > 0:
            time.sleep(linger_s)  # like a producer's linger: a fuller chunk for a few ms of latency
        items = self._items
        return [items.popleft() for _ in range(min(max_items, len(items)))]


@dataclass
class _RetryOutcome:
    done: list[int] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    quarantined: list[tuple[Job, str, str]] = field(default_factory=list)
    sent_hours: collections.Counter = field(default_factory=collections.Counter)


class CircuitBreaker:
    """Open after a failed SQS call; closed again by a successful probe."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self.last_error = ""
        self.opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def trip(self, error: str) -> None:
        self.last_error = error
        if not self._open.is_set():
            self.opened_at = time.time()
            self._open.set()
            log.warning("SQS unreachable (%s): new events go straight to the retry log", error)

    def reset(self) -> None:
        if self._open.is_set():
            self._open.clear()
            log.info(
                "SQS reachable again after %.1fs: resuming realtime sends and retries",
                time.time() - (self.opened_at or time.time()),
            )


class EdgeService:
    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.metrics = EdgeMetrics()
        # Read once at start: a broken catalog is a deployment error, and the service says so at once.
        self.priorities = catalog_priorities()
        self._priority_of = dict(self.priorities)
        self.sqs = sqs_client()
        self.queue_url = self._lookup_queue_url()
        self.quarantine = Quarantine(
            config.state_dir / "quarantine.jsonl",
            max_bytes=config.quarantine_max_bytes,
            keep_files=config.quarantine_keep_files,
            on_dropped=self.metrics.quarantine_dropped.inc,
        )
        # A retry log that cannot be read whole is moved aside and salvaged here, so the service still starts.
        retry_log_path = config.state_dir / "retry_log.duckdb"
        self.retry_log_check = check_at_start(retry_log_path, priorities=self._priority_of)
        self.metrics.watch_retry_log_salvage(self.retry_log_check, retry_log_path)
        self.retry_log = RetryLog(
            retry_log_path,
            max_events=config.retry_log_max_events,
            backoff_s=config.retry_backoff_s,
            max_attempts=config.retry_max_attempts,
            priorities=self._priority_of,
            order=config.retry_order,
        )
        self.metrics.jobs_pending.set_function(lambda: self.retry_log.pending)
        self.metrics.dlq_size.set_function(lambda: self.retry_log.dlq_size)
        self.reconciliation = HourCounts(config.state_dir)  # accepted/sent per site and hour (edge_bridge.manifest)
        self.manifests: ManifestWriter | None = None
        self.breaker = CircuitBreaker()
        self.metrics.circuit_open.set_function(lambda: int(self.breaker.is_open))
        self.inbox = Inbox()
        self._completed: queue.Queue[tuple[list[Received], Future, bool]] = queue.Queue()
        self._spill_q: queue.Queue[list[tuple[Ready, str, str]]] = queue.Queue()
        self._held = 0
        self._full = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.senders: SenderPool | None = None
        self._slots: threading.Semaphore | None = None
        self.connected = threading.Event()
        self._session = 0  # counts MQTT connections; an ack belongs to the connection its message came on
        self.admin = None
        self.client = self._make_client()

    def _lookup_queue_url(self) -> str | None:
        try:
            return self.config.queue_url()
        except Exception as exc:  # noqa: BLE001 - SQS may be down at start; the probe looks it up later
            log.warning("cannot look up the SQS queue URL yet (%s); events go to the retry log until it answers", exc)
            return None

    # --- MQTT -----------------------------------------------------------------------------------
    def _make_client(self) -> Client:
        client = Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            clean_session=False,  # persistent session: the broker queues for us while we are away
            manual_ack=True,
        )
        if self.config.mqtt_username:
            client.username_pw_set(self.config.mqtt_username, self.config.mqtt_password)
        client.max_inflight_messages_set(self.config.max_inflight)
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("MQTT connect refused: %s", reason_code)
            return
        self._session += 1
        self.metrics.mqtt_connections.inc()
        client.subscribe(EVENTS_TOPIC, qos=1)
        log.info(
            "connected to MQTT %s:%s (session present: %s)",
            self.config.mqtt_host,
            self.config.mqtt_port,
            flags.session_present,
        )

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.connected.set()
        self.metrics.mqtt_connected.set(1)
        log.info("subscribed to %s", EVENTS_TOPIC)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self.metrics.mqtt_connected.set(0)
        if not self._stop.is_set():
            log.warning("MQTT disconnected (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        # A QoS 0 message arrives with mid 0: it is never acknowledged (see Client.ack_many).
        try:
            self.inbox.put(Received(message.topic, message.payload, message.mid, self._session))
        except Exception as exc:  # noqa: BLE001 - raised out of this callback it would end paho's network loop
            self._refuse_at_intake(message, exc)

    def _refuse_at_intake(self, message: mqtt.MQTTMessage, exc: Exception) -> None:
        """A message the intake itself cannot take is quarantined and acknowledged on the spot."""
        try:
            topic = bytes(getattr(message, "_topic", b"")).decode("utf-8", "replace")
            self.quarantine.put(topic, bytes(message.payload), PROCESSING_ERROR, error_detail("intake", exc))
            self.metrics.quarantined.labels(PROCESSING_ERROR).inc()
            self.client.ack_many([message.mid])
        except Exception:  # noqa: BLE001 - the quarantine is unwritable: the message stays unacked
            log.exception("cannot quarantine a message the intake refused (%s); it stays unacked", exc)

    def _acknowledge(self, items: Iterable[Received]) -> None:
        """Acknowledge events that are safe, the MQTT ones in one write."""
        session, mids = self._session, []
        for item in items:
            if item.persisted is not None:
                item.persisted.set()
            elif item.session == session:
                mids.append(item.mid)
            # else: it came on an earlier connection and is redelivered on this one, with a mid the
            # broker may since have given to another message: acking the old mid could ack the wrong event.
        self.client.ack_many(mids)

    # --- internal events ------------------------------------------------------------------------
    def emit(
        self, event_type: str, payload: dict[str, Any], device_id: str = "edge-service", timeout: float = 30.0
    ) -> Envelope:
        """Submit an internal event (check-in, job, robot action); returns once it is in SQS or the retry log."""
        ts = utc_now()
        envelope = Envelope(
            idempotency_key=make_idempotency_key(self.config.site_id, device_id, event_type, ts),
            event_type=event_type,
            source=INTERNAL_SOURCE,
            site_id=self.config.site_id,
            device_id=device_id,
            timestamp=ts,
            payload=payload,
        )
        persisted = threading.Event()
        self.inbox.put(Received(envelope.topic, envelope.to_json().encode("utf-8"), persisted=persisted))
        if not persisted.wait(timeout):
            raise TimeoutError(f"internal event {envelope.event_id} not persisted within {timeout:.0f}s")
        self.metrics.internal.inc()
        return envelope

    # --- realtime path: MQTT -> sender pool -> acks / quarantine / retry log ---------------------
    def _dispatcher(self) -> None:
        while not self._stop.is_set():
            batch = self.inbox.take(CHUNK_MAX, self.config.linger_s, timeout=0.2)
            if batch:
                self.metrics.received.inc(len(batch))  # counted per chunk: per message it costs the MQTT loop a lock
                self.metrics.rate.add(len(batch))
                while not self._slots.acquire(timeout=0.2):
                    if self._stop.is_set():
                        return  # unacked: the broker redelivers after the restart
                self._dispatch(batch)

    def _dispatch(self, batch: list[Received], holds_slot: bool = True) -> None:
        """Hand a chunk to a sender; with SQS down it is only validated, here, and goes to the retry log.

        `holds_slot`: the chunk counts against the chunks in flight (a split chunk's second half does not).
        """
        messages = [(token, r.topic, r.payload) for token, r in enumerate(batch)]
        if self.breaker.is_open or self.queue_url is None:
            # Nothing to send: validating here costs less than the round trip to a sender process.
            if self.breaker.is_open:
                reason, cause = f"SQS unreachable: {self.breaker.last_error}", "circuit_open"
            else:
                reason, cause = "SQS queue URL not known yet", "call_failed"
            if holds_slot:
                self._slots.release()
            try:
                result = not_sent(messages, reason, self._priority_of)
            except Exception as exc:  # noqa: BLE001 - not one message's own (those are rejected): halve the chunk anyway
                self._split(batch, False, exc, "validate")
                return
            self._settle_safely(batch, result, cause)
            return
        while True:
            try:
                future = self.senders.submit(prepare_and_send, messages, self.queue_url)
                break
            except Exception:  # noqa: BLE001 - e.g. no new sender process could start: keep the chunk, try again
                log.exception("cannot hand a chunk of %d to the senders; trying again in 1 s", len(batch))
                if self._stop.wait(1):
                    return  # unacked: the broker redelivers after the restart
        future.add_done_callback(lambda f: self._completed.put((batch, f, holds_slot)))

    def _completer(self) -> None:
        while not (self._stop.is_set() and self._completed.empty()):
            try:
                batch, future, holds_slot = self._completed.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                result = future.result()
            except BrokenExecutor:  # shared: a sender process died; the chunk was not at fault, send it again
                self.senders.rebuild(future.executor)
                if not self._stop.is_set():
                    self._dispatch(batch, holds_slot)
                continue
            except Exception as exc:  # noqa: BLE001 - something in the chunk raised: find it, never resend it unchanged
                self._split(batch, holds_slot, exc, "sender")
                continue
            if holds_slot:
                self._slots.release()
            self._settle_safely(batch, result)

    def _split(self, batch: list[Received], holds_slot: bool, exc: Exception, stage: str) -> None:
        """A chunk that raised goes again as two halves, until the message at fault is alone and quarantined."""
        if len(batch) == 1:
            if holds_slot:
                self._slots.release()
            log.warning("a message on %s raised %s (%s): quarantined", batch[0].topic, type(exc).__name__, stage)
            self._quarantine_safely([(batch[0], PROCESSING_ERROR, error_detail(stage, exc))])
            return
        log.warning(
            "a chunk of %d raised %s (%s): handling it again in halves to find the message at fault",
            len(batch),
            type(exc).__name__,
            stage,
        )
        half = len(batch) // 2
        self._dispatch(batch[:half], holds_slot)
        self._dispatch(batch[half:], holds_slot=False)

    def _settle_safely(self, batch: list[Received], result: ChunkResult, cause: str | None = None) -> None:
        try:
            self._settle(batch, result, cause)
        except Exception:  # noqa: BLE001 - never let one chunk stop the completer; unacked ones come back
            log.exception("settling a chunk of %d failed; what it did not settle stays unacked", len(batch))

    def _settle(self, batch: list[Received], result: ChunkResult, cause: str | None = None) -> None:
        """Ack what SQS took, hand what failed to the retry log writer, quarantine what was rejected.

        Each step settles its own messages, so a failure in one (the quarantine file unwritable)
        leaves only that step's messages unacked. `cause` is set when nothing was sent (SQS known to
        be down); otherwise it follows from the result.
        """
        for seconds in result.send_seconds:
            self.metrics.send_latency.observe(seconds)
        if result.claim_checks:
            self.metrics.claim_checks.inc(result.claim_checks)
        self._count_express(result)
        if result.sent:
            self.reconciliation.record(accepted=result.sent_hours, sent=result.sent_hours)
            self._acknowledge([batch[token] for token in result.sent])
            self.metrics.delivered.labels("realtime").inc(len(result.sent))
        if result.failed:
            if result.call_error:
                self.breaker.trip(result.call_error)
            if cause is None:
                cause = "call_failed" if result.call_error else "entry_failed"
                log.warning(
                    "SQS refused %d events (%s); committing them to the retry log",
                    len(result.failed),
                    result.failed[0][2],
                )
            elif cause == "call_failed":
                self.breaker.trip(result.failed[0][2])
            priority = result.priorities.get
            self._spill_q.put(
                [
                    (
                        Ready(batch[token], event_id, priority(token, UNKNOWN_PRIORITY), result.hours.get(token)),
                        error,
                        cause,
                    )
                    for token, event_id, error in result.failed
                ]
            )
        if result.rejected:
            self._quarantine([(batch[token], reason, detail) for token, reason, detail in result.rejected])

    def _count_express(self, result: ChunkResult) -> None:
        if result.express_sent:
            self.metrics.express_sent.inc(result.express_sent)
        if result.express_failed:
            self.metrics.express_failed.inc(result.express_failed)
        if result.express_calls:
            self.metrics.express_calls.inc(result.express_calls)

    def _quarantine(self, entries: list[tuple[Received, str, str]]) -> None:
        """Quarantine durably, then acknowledge: acking those loses nothing and unblocks the stream."""
        self.quarantine.put_many([(r.topic, r.payload, reason, detail) for r, reason, detail in entries])
        self._acknowledge([r for r, _, _ in entries])
        for reason, count in collections.Counter(reason for _, reason, _ in entries).items():
            self.metrics.quarantined.labels(reason).inc(count)

    def _quarantine_safely(self, entries: list[tuple[Received, str, str]]) -> bool:
        try:
            self._quarantine(entries)
            return True
        except Exception:  # noqa: BLE001 - the quarantine is unwritable (shared): the messages stay unacked
            log.exception("cannot quarantine %d messages; they stay unacked", len(entries))
            return False

    # --- retry log writer (group commit, then ack) ----------------------------------------------
    def _spill_writer(self) -> None:
        held: list[tuple[Ready, str, str]] = []
        while not self._stop.is_set():
            held = self._collect(held)
            if not held:
                continue
            room = self.retry_log.max_events - self.retry_log.pending - self.retry_log.dlq_size
            size = max(0, min(room, SPILL_GROUP_MAX, len(held)))
            kept = self._commit(held[:size]) if size else []
            if kept:
                held = kept + held[size:]
                self._stop.wait(1)  # e.g. a full disk: what is not committed stays held and unacked; try again
                continue
            held = held[size:]
            # Reported after the commit, so the status never shows a group in neither place; what is
            # left over only means "full" when the bound, not the group size, kept it out.
            self._report_held(len(held) if size == room else 0)

    def _collect(self, held: list[tuple[Ready, str, str]]) -> list[tuple[Ready, str, str]]:
        try:
            held += self._spill_q.get(timeout=0.05 if held else 0.2)
        except queue.Empty:
            if not held:
                return held
        # Group commit: a DuckDB transaction costs ~3 ms of CPU whatever its size, so during an
        # outage the writer lingers a little to commit hundreds of events at a time.
        linger_until = time.monotonic() + SPILL_LINGER_S
        while len(held) < SPILL_GROUP_MAX:
            remaining = linger_until - time.monotonic()
            try:
                held += (
                    self._spill_q.get(timeout=remaining)
                    if remaining > 0 and len(held) < SPILL_GROUP_MIN
                    else self._spill_q.get_nowait()
                )
            except queue.Empty:
                break
        return held

    def _commit(self, group: list[tuple[Ready, str, str]]) -> list[tuple[Ready, str, str]]:
        """One transaction for the group, then its acks: persist before acknowledging.

        Returns what stays held. A refused group is held whole when the retry log takes no write at
        all (a full disk); otherwise rows of its own made it fail, and halving it finds them.
        """
        try:
            self._add(group)
            return []
        except Exception as exc:  # noqa: BLE001 - shared or one row's: the probe tells which
            if not self.retry_log.writable():
                log.error(
                    "retry log write failed (%s: %s); %d events stay unacked and are retried",
                    type(exc).__name__,
                    exc,
                    len(group),
                )
                return group
            log.warning(
                "the retry log refused a group of %d (%s) but takes writes: looking for the event at fault",
                len(group),
                type(exc).__name__,
            )
            return self._bisect(group, exc)

    def _bisect(self, group: list[tuple[Ready, str, str]], exc: Exception) -> list[tuple[Ready, str, str]]:
        if len(group) == 1:
            ready = group[0][0]
            if not self.retry_log.writable() or not self._quarantine_safely(
                [(ready.received, PROCESSING_ERROR, error_detail("retry log", exc))]
            ):
                return group  # shared after all: it stays held
            log.warning(
                "event %s cannot be written to the retry log (%s): quarantined", ready.event_id, type(exc).__name__
            )
            return []
        half = len(group) // 2
        kept = []
        for part in (group[:half], group[half:]):
            try:
                self._add(part)
            except Exception as part_exc:  # noqa: BLE001 - narrowed down further
                kept += self._bisect(part, part_exc)
        return kept

    def _add(self, group: list[tuple[Ready, str, str]]) -> None:
        self.retry_log.add([(r.event_id, r.body, error, r.priority) for r, error, _ in group])
        # Committed: from here on nothing may send the group to the retry log again.
        try:
            self.reconciliation.record(accepted=collections.Counter(r.hour for r, _, _ in group if r.hour))
            self._acknowledge([r.received for r, _, _ in group])
            for cause, count in collections.Counter(cause for _, _, cause in group).items():
                self.metrics.spilled.labels(cause).inc(count)
        except Exception:  # noqa: BLE001 - unacked ones come back and are committed again (a duplicate at worst)
            log.exception("acknowledging %d committed events failed", len(group))

    def _report_held(self, held: int) -> None:
        """`held`: events kept unacked because the retry log is at its bound."""
        was_full, self._full = self._full, held > 0
        self._held = held
        self.metrics.held.set(held)
        self.metrics.retry_log_full.set(int(self._full))
        if self._full and not was_full:
            log.warning(
                "retry log at its bound (%d events): holding %d MQTT messages unacked", self.retry_log.max_events, held
            )

    # --- poller: retries, probe -----------------------------------------------------------------
    def _probe(self) -> None:
        try:
            if self.queue_url is None:
                self.queue_url = self.config.queue_url()
            else:
                self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["QueueArn"])
        except Exception as exc:  # noqa: BLE001 - still down
            self.breaker.trip(f"{type(exc).__name__}: {exc}")
            return
        self.breaker.reset()

    def _retry(self, jobs: list[Job]) -> None:
        chunks = [jobs[i : i + CHUNK_MAX] for i in range(0, len(jobs), CHUNK_MAX)]
        submitted = [(chunk, self._submit_jobs(chunk)) for chunk in chunks]
        outcome = _RetryOutcome()
        for chunk, future in submitted:
            self._retry_outcome(chunk, future, outcome)
        if outcome.quarantined:
            # Quarantined before they leave the retry log: a crash in between quarantines one twice, never zero times.
            self.quarantine.put_many(
                [
                    ("", j.body.encode("utf-8"), reason, f"event {j.event_id}: {detail}")
                    for j, reason, detail in outcome.quarantined
                ]
            )
            for reason, count in collections.Counter(reason for _, reason, _ in outcome.quarantined).items():
                self.metrics.quarantined.labels(reason).inc(count)
        self.reconciliation.record(sent=outcome.sent_hours)  # before the jobs close: a crash counts a resend again
        moved = self.retry_log.record(outcome.done + [j.job_id for j, _, _ in outcome.quarantined], outcome.failed)
        self.metrics.delivered.labels("retry").inc(len(outcome.done))
        self.metrics.retry_failures.inc(len(outcome.failed))
        self.metrics.dead_lettered.inc(moved)
        if outcome.failed:
            log.warning(
                "retry of %d jobs failed (%s); %d moved to the DLQ", len(outcome.failed), outcome.failed[0][1], moved
            )

    def _submit_jobs(self, chunk: list[Job]) -> Future:
        return self.senders.submit(
            send_jobs, [(j.job_id, j.event_id, j.body, j.priority) for j in chunk], self.queue_url
        )

    def _retry_outcome(self, chunk: list[Job], future: Future, outcome: _RetryOutcome) -> None:
        """Collect a retried chunk's outcome; a chunk that raised is retried in halves until the job at fault is alone."""
        try:
            result = future.result()
        except BrokenExecutor:
            self.senders.rebuild(future.executor)
            return  # those jobs stay due, their attempt not counted
        except Exception as exc:  # noqa: BLE001 - one job's fault: never let it hold up the jobs behind it
            if len(chunk) == 1:
                log.warning("retry of event %s raised %s: quarantined", chunk[0].event_id, type(exc).__name__)
                outcome.quarantined.append((chunk[0], PROCESSING_ERROR, error_detail("retry", exc)))
                return
            half = len(chunk) // 2
            for part in (chunk[:half], chunk[half:]):
                self._retry_outcome(part, self._submit_jobs(part), outcome)
            return
        jobs = {j.job_id: j for j in chunk}
        outcome.done += result.sent
        outcome.sent_hours.update(result.sent_hours)
        outcome.failed += [(job_id, error) for job_id, _, error in result.failed]
        outcome.quarantined += [(jobs[job_id], reason, detail) for job_id, reason, detail in result.rejected]
        if result.call_error:
            self.breaker.trip(result.call_error)
        for seconds in result.send_seconds:
            self.metrics.send_latency.observe(seconds)
        self.metrics.claim_checks.inc(result.claim_checks)
        self._count_express(result)

    def _poller(self) -> None:
        while not self._stop.is_set():
            if self.breaker.is_open or self.queue_url is None:
                if self._stop.wait(self.config.probe_interval_s):
                    return
                self._probe()
                continue
            try:
                jobs = self.retry_log.due(POLL_BATCH)
                if not jobs:
                    self._stop.wait(0.2)
                    continue
                self._retry(jobs)
            except Exception:  # noqa: BLE001 - a failed round leaves the jobs in place for the next one
                log.exception("retry round failed")
                self._stop.wait(1)

    # --- operations (admin API) -----------------------------------------------------------------
    def replay_dlq(self) -> int:
        count = self.retry_log.replay_dlq()
        self.metrics.replayed.inc(count)
        return count

    def status(self) -> dict[str, Any]:
        return {
            "site_id": self.config.site_id,
            "mqtt_connected": self.connected.is_set(),
            "sqs_reachable": not self.breaker.is_open and self.queue_url is not None,
            "sqs_last_error": self.breaker.last_error if self.breaker.is_open else "",
            "jobs_pending": self.retry_log.pending,
            "dlq_size": self.retry_log.dlq_size,
            "retry_log_max_events": self.retry_log.max_events,
            "retry_log_full": self._full,
            "held_unacked": self._held,
            "retry_log_bytes": self.retry_log.size_bytes(),
            "mqtt_message_rate": round(self.metrics.rate.rate(), 2),
            "sender_pids": self.senders.pids if self.senders else [],
            "mqtt_connections": self._session,
            "quarantine_dropped": self.quarantine.dropped,
            "express_lane": self.config.express_queue_url is not None,
            "retry_order": self.retry_log.order,
            "retry_log_check": self.retry_log_check.as_dict(),
        }

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> EdgeService:
        settings = WorkerSettings(
            self.config.fifo,
            self.config.claim_check_bucket,
            self.config.max_message_bytes,
            self.config.express_queue_url,
            self.priorities,
        )
        self.senders = SenderPool(settings, self.config.sender_processes, self.config.sender_threads)
        self._slots = threading.Semaphore(
            2 * self.senders.size
        )  # chunks in flight: every sender busy, one more queued each
        targets = [("dispatcher", self._dispatcher), ("completer", self._completer)]
        targets += [("retry-log-writer", self._spill_writer), ("retry-poller", self._poller)]
        for name, target in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.config.manifest_bucket:
            from edge_bridge.claim_check import s3_client

            self.manifests = ManifestWriter(
                self.reconciliation,
                s3_client(),
                self.config.manifest_bucket,
                self.config.client_id,
                self.config.manifest_interval_s,
            ).start()
        if self.config.admin_port >= 0:
            from edge_bridge.admin import AdminServer

            self.admin = AdminServer(self, self.config.admin_host, self.config.admin_port).start()
        self.client.connect_async(self.config.mqtt_host, self.config.mqtt_port, keepalive=30)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        """Stop without acking what is not persisted: the broker keeps it for the next start."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)
        if self.senders:
            self.senders.shutdown()
        if self.admin:
            self.admin.stop()
        self.client.disconnect()
        self.client.loop_stop()
        if self.manifests:
            self.manifests.stop()  # the last counts, after every thread that counts has stopped
        self.retry_log.close()
        self.quarantine.close()
