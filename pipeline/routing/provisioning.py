"""Queues the routing config implies: high/medium/low priority queues and a queue + DLQ per partner."""

from __future__ import annotations

import logging

from pipeline.provisioning import ensure_queue, ensure_queue_with_dlq
from pipeline.routing.config import PRIORITIES, RoutingConfig, load_routing_config

log = logging.getLogger(__name__)

PRIORITY_QUEUE_ATTRIBUTES = {"VisibilityTimeout": 30, "MessageRetentionPeriod": 1209600, "ReceiveMessageWaitTimeSeconds": 0}
PARTNER_QUEUE_ATTRIBUTES = {"VisibilityTimeout": 60, "MessageRetentionPeriod": 1209600}


def provision_routing(sqs, routing: RoutingConfig | None = None) -> dict[str, str]:
    """Create or update every routing queue; idempotent. Returns name -> URL."""
    routing = routing or load_routing_config()
    queues: dict[str, str] = {}
    for priority in PRIORITIES:
        name = routing.priority.queue_for(priority)
        queues[name] = ensure_queue(sqs, name, PRIORITY_QUEUE_ATTRIBUTES)
    for partner in routing.partners:
        # Retries are counted by the delivery run; the redrive is only a backstop for a message
        # that crashes every run that receives it.
        url, dlq = ensure_queue_with_dlq(sqs, partner.queue_name, partner.dlq_name, routing.max_attempts + 3, PARTNER_QUEUE_ATTRIBUTES)
        queues[partner.queue_name], queues[partner.dlq_name] = url, dlq
    log.info("provisioned routing queues %s", sorted(queues))
    return queues
