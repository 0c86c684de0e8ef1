"""Handing a drain window's events to the routing destinations: partner queues and priority queues.

Each call returns only once SQS has accepted every message it sends (SendMessageBatch with per-entry
outcomes; a failed entry raises), so the drain run may delete the window afterwards. A run that dies
half-way sends again when the window is redelivered; consumers de-duplicate by event_id.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from edge_bridge.envelope import Envelope
from pipeline.routing.config import RoutingConfig
from pipeline.routing.transform import PartnerTransform

log = logging.getLogger(__name__)


class SendFailed(RuntimeError):
    """SQS refused part of a batch; the drain run must not delete its window."""


def _send_chunk(sqs, queue_url: str, chunk: list[str]) -> None:
    response = sqs.send_message_batch(QueueUrl=queue_url, Entries=[{"Id": str(i), "MessageBody": b} for i, b in enumerate(chunk)])
    if response.get("Failed"):
        raise SendFailed(f"{queue_url}: {len(response['Failed'])} of {len(chunk)} refused, e.g. {response['Failed'][0]}")


def send_all(sqs, batches: dict[str, list[str]], parallelism: int = 4) -> None:
    """Send every body to its queue URL, ten per call, a few calls in parallel; raises on any refusal."""
    chunks = [(url, bodies[i : i + 10]) for url, bodies in batches.items() for i in range(0, len(bodies), 10)]
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=min(parallelism, len(chunks))) as pool:
        for future in [pool.submit(_send_chunk, sqs, url, chunk) for url, chunk in chunks]:
            future.result()


def partner_message(partner: str, event: Envelope, body: dict) -> str:
    """What a partner queue holds: the transformed body (signed as-is on delivery) and its event_id."""
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    return json.dumps({"event_id": event.event_id, "event_type": event.event_type, "partner": partner, "body": text})


def partner_shares(routing: RoutingConfig, events: Iterable[Envelope]) -> dict[str, list[str]]:
    """partner name -> messages for its queue: subscribed event types only, already in its schema."""
    transforms = {p.name: PartnerTransform(p) for p in routing.partners}
    shares: dict[str, list[str]] = {name: [] for name in transforms}
    for event in events:
        wire = None
        for name, transform in transforms.items():
            if transform.subscribes(event.event_type):
                wire = wire or event.to_wire()
                shares[name].append(partner_message(name, event, transform.apply(wire)))
    return shares


def route_to_partner_queues(sqs, routing: RoutingConfig, events: list[Envelope], queue_url: Callable[[str], str]) -> dict[str, int]:
    shares = partner_shares(routing, events)
    names = {p.name: p.queue_name for p in routing.partners}
    send_all(sqs, {queue_url(names[name]): bodies for name, bodies in shares.items() if bodies})
    return {name: len(bodies) for name, bodies in shares.items()}


def route_to_priority_queues(sqs, routing: RoutingConfig, events: list[Envelope], queue_url: Callable[[str], str]) -> dict[str, int]:
    """Every event goes to exactly one priority queue, chosen by its event_type (or the default)."""
    by_priority: dict[str, list[str]] = defaultdict(list)
    for event in events:
        by_priority[routing.priority.for_event_type(event.event_type)].append(event.to_json())
    send_all(sqs, {queue_url(routing.priority.queue_for(p)): bodies for p, bodies in by_priority.items()})
    return dict(Counter({p: len(b) for p, b in by_priority.items()}))
