"""Queues the routing config implies: high/medium/low priority queues and a queue + DLQ per partner.

Every one of them feeds a consumer, so every one has a redrive policy: a message that its consumer
cannot get past is set aside in a DLQ after a bounded number of receives instead of coming back for ever.
"""

from __future__ import annotations

import logging

from pipeline.provisioning import ensure_queue_with_dlq
from pipeline.routing.config import PRIORITIES, RoutingConfig, load_routing_config
from pipeline.stack import StackConfig, dead_letter_queue_name, load_stack_config

log = logging.getLogger(__name__)

PRIORITY_QUEUE_ATTRIBUTES = {
    "VisibilityTimeout": 30,
    "MessageRetentionPeriod": 1209600,
    "ReceiveMessageWaitTimeSeconds": 0,
}
PARTNER_QUEUE_ATTRIBUTES = {"VisibilityTimeout": 60, "MessageRetentionPeriod": 1209600}


def provision_routing(sqs, routing: RoutingConfig | None = None, stack: StackConfig | None = None) -> dict[str, str]:
    """Create or update every routing queue and its DLQ; idempotent. Returns name -> URL."""
    routing = routing or load_routing_config()
    stack = stack or load_stack_config()
    queues: dict[str, str] = {}
    # The drain packs what it sends to the events queue's size limit; the queues it feeds take no more.
    size = {"MaximumMessageSize": stack.events_queue.max_message_bytes}
    for priority in PRIORITIES:
        name = routing.priority.queue_for(priority)
        dlq_name = dead_letter_queue_name(name)
        url, dlq = ensure_queue_with_dlq(
            sqs,
            name,
            dlq_name,
            stack.priority_queues.dead_letter.max_receive_count,
            {**PRIORITY_QUEUE_ATTRIBUTES, **size},
        )
        queues[name], queues[dlq_name] = url, dlq
    for partner in routing.partners:
        # Retries are counted by the delivery run; the redrive is only a backstop for a message
        # that crashes every run that receives it.
        url, dlq = ensure_queue_with_dlq(
            sqs, partner.queue_name, partner.dlq_name, routing.max_attempts + 3, {**PARTNER_QUEUE_ATTRIBUTES, **size}
        )
        queues[partner.queue_name], queues[partner.dlq_name] = url, dlq
    log.info("provisioned routing queues %s", sorted(queues))
    return queues
