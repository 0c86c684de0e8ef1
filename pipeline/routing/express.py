"""The express lane in the cloud: an alarm reaches the priority consumer and partners within a second.

The edge sends a high-priority event twice: to the events queue, which the drain takes as the system of
record (archive, partners, monitoring), and to the express queue, which `ExpressLane` long-polls. Here
an event whose routing priority is high goes to its priority queue and to every subscribed partner's
queue through the drain's own code (`route_to_priority_queues`, `route_to_partner_queues`: the same
`PartnerTransform`, the same contract record, the same webhook-id) and is never archived. The priority
consumer and partners de-duplicate by (site_id, event_id), so the drain's later copy changes nothing.

The lane is best effort by design: a message it cannot route (unreadable, not high, refused by one
destination) is dropped from the express queue, because the drain brings the event anyway and
quarantines whatever is bad about it; a shared failure (SQS unreachable) leaves the batch in the queue,
which gives it back after its visibility timeout. Plain Python; `pipeline/express_jobs.py` runs it in a
long-running Dagster run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from botocore.config import Config

from edge_bridge.envelope import Envelope, claim_check_pointer, parse_envelope
from pipeline.routing.config import RoutingConfig, load_routing_config, routing_config_path
from pipeline.routing.destinations import QueueLimits, route_to_partner_queues, route_to_priority_queues

log = logging.getLogger(__name__)

DEFAULT_EXPRESS_QUEUE = "events-express"
EXPRESS_PRIORITY = "high"
# The lane's SQS client: long polls of up to 20 s need a read timeout above that, and the user agent
# names the lane, so SQS's own records (CloudTrail, a proxy's counts) tell its calls from the drain's.
CLIENT_CONFIG = Config(
    retries={"max_attempts": 2, "mode": "standard"},
    connect_timeout=3,
    read_timeout=30,
    user_agent_appid="pipeline-express-lane",
)


@dataclass
class ExpressStats:
    received: int = 0  # messages taken from the express queue
    routed: int = 0  # high-priority events handed to their priority queue (and partners)
    partner_messages: dict[str, int] = field(default_factory=dict)  # partner -> messages queued
    not_high: int = 0  # events whose routing priority is not high: left to the drain
    unreadable: int = 0  # not an envelope (or a claim-check pointer): left to the drain
    refused: dict[str, int] = field(
        default_factory=dict
    )  # reason -> events a destination refused (the drain quarantines them)
    failed_batches: int = 0  # batches left in the queue for a shared failure
    sqs_calls: Counter = field(default_factory=Counter)  # operation -> calls

    def as_metadata(self) -> dict:
        return {
            "received": self.received,
            "routed": self.routed,
            "partner_messages": dict(self.partner_messages),
            "not_high": self.not_high,
            "unreadable": self.unreadable,
            "refused": dict(self.refused),
            "failed_batches": self.failed_batches,
            "sqs_calls": sum(self.sqs_calls.values()),
            "sqs_calls_by_operation": dict(self.sqs_calls),
        }


def provision_express_queue(sqs, name: str = DEFAULT_EXPRESS_QUEUE, max_message_bytes: int = 262144) -> str:
    """Create the express queue (idempotent) and return its URL.

    An express copy is useful for seconds, so the queue keeps a message five minutes at most (the drain
    has the event anyway) and sets aside one that three receives could not route.
    """
    dlq = sqs.create_queue(QueueName=f"{name}-dlq", Attributes={"MessageRetentionPeriod": "86400"})["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    attributes = {
        "VisibilityTimeout": "30",
        "MessageRetentionPeriod": "300",
        "MaximumMessageSize": str(max_message_bytes),
        "RedrivePolicy": f'{{"deadLetterTargetArn": "{arn}", "maxReceiveCount": "3"}}',
    }
    return sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]


def routing_reloader(path: str | None = None) -> Callable[[], RoutingConfig]:
    """The routing config, read again whenever its file changes: a long-running lane takes a partner's
    new contract as soon as the drain does, and a batch costs no parsing when nothing changed."""
    cached: dict = {}

    def current() -> RoutingConfig:
        file = routing_config_path(path)
        stat = file.stat()
        stamp = (str(file), stat.st_mtime_ns, stat.st_size)
        if cached.get("stamp") != stamp:
            cached.update(stamp=stamp, config=load_routing_config(file))
        return cached["config"]

    return current


class ExpressLane:
    """Long-polls the express queue and routes each high-priority event it brings; see the module docstring.

    `routing` gives the routing config in force (e.g. `routing_reloader()`); `queue_url` looks a queue
    name up; `history` records each partner's contract before a body made under it is queued.
    """

    def __init__(
        self,
        sqs,
        routing: Callable[[], RoutingConfig],
        express_url: str,
        queue_url: Callable[[str], str],
        limits: QueueLimits = QueueLimits(),
        history=None,
    ) -> None:
        self.sqs, self.routing, self.express_url, self.queue_url = sqs, routing, express_url, queue_url
        self.limits, self.history = limits, history
        self.stats = ExpressStats()
        self._urls: dict[str, str] = {}
        self._calls_lock = threading.Lock()
        sqs.meta.events.register("before-call.sqs", self._count_call)

    def _count_call(self, model, **kwargs) -> None:
        with self._calls_lock:  # the destinations send from a few threads at once
            self.stats.sqs_calls[model.name] += 1

    def run(
        self,
        max_seconds: float,
        stop: threading.Event | None = None,
        wait_time_s: int = 20,
        on_progress: Callable[[ExpressStats], None] | None = None,
        progress_every_s: float = 60.0,
    ) -> ExpressStats:
        """Route until `max_seconds` have passed or `stop` is set; a failed round is counted and the loop goes on."""
        stop = stop or threading.Event()
        deadline = time.monotonic() + max_seconds
        next_progress = time.monotonic() + progress_every_s
        while not stop.is_set() and (remaining := deadline - time.monotonic()) > 0:
            try:
                self.route_once(wait_time_s=max(1, min(wait_time_s, int(remaining))))
            except Exception as exc:  # noqa: BLE001 - SQS down or the like: the batch stays in the queue
                self.stats.failed_batches += 1
                log.warning(
                    "express lane round failed (%s: %s); its messages come back after the visibility timeout",
                    type(exc).__name__,
                    exc,
                )
                stop.wait(1)
            if on_progress and time.monotonic() >= next_progress:
                on_progress(self.stats)
                next_progress = time.monotonic() + progress_every_s
        return self.stats

    def route_once(self, wait_time_s: int = 20) -> int:
        """One long poll and what it brought; returns how many messages it received."""
        messages = self.sqs.receive_message(
            QueueUrl=self.express_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_time_s
        ).get("Messages", [])
        if messages:
            self.route([m["Body"] for m in messages])
            self.sqs.delete_message_batch(
                QueueUrl=self.express_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
            )
        return len(messages)

    def route(self, bodies: list[str]) -> None:
        """Hand the high-priority events among `bodies` to their priority queue first, then to partners."""
        self.stats.received += len(bodies)
        routing = self.routing()
        events: dict[tuple[str, str], Envelope] = {}
        for body in bodies:
            try:
                if claim_check_pointer(body) is not None:
                    raise ValueError("a claim-check pointer (the edge sends none on the express lane)")
                event = parse_envelope(body)
            except Exception as exc:  # noqa: BLE001 - the drain has the same message and quarantines it
                self.stats.unreadable += 1
                log.info("express lane left an unreadable message to the drain: %s", str(exc)[:200])
                continue
            if routing.priority.for_event_type(event.event_type) != EXPRESS_PRIORITY:
                self.stats.not_high += 1
                continue
            events.setdefault(event.key, event)
        if not events:
            return
        high = list(events.values())
        # The consumer's copy first: partners are the slower path anyway.
        handed = route_to_priority_queues(self.sqs, routing, high, self._url, self.limits)
        self._count_refused(handed.refused)
        self.stats.routed += sum(handed.accepted.values())
        extra = {"history": self.history} if self.history is not None else {}
        handed = route_to_partner_queues(self.sqs, routing, high, self._url, self.limits, **extra)
        self._count_refused(handed.refused)
        for partner, count in handed.accepted.items():
            if count:
                self.stats.partner_messages[partner] = self.stats.partner_messages.get(partner, 0) + count

    def _url(self, name: str) -> str:
        """A destination queue's URL, looked up once per lane (not once per batch: SQS bills per call)."""
        if name not in self._urls:
            self._urls[name] = self.queue_url(name)
        return self._urls[name]

    def _count_refused(self, refused) -> None:
        for r in refused:
            self.stats.refused[r.reason] = self.stats.refused.get(r.reason, 0) + 1
            log.info(
                "express lane: %s refused %s (%s); the drain quarantines it", r.destination, r.event.dedupe_id, r.reason
            )
