"""What a send to a FIFO queue must carry that a standard queue does not: a group and a deduplication id.

Moves between queues (the events-dlq replay, a partner DLQ's redelivery, setting a message aside)
resend bodies that were already sent once, so they cannot reuse the edge's ids: the group is the
event's site (per-site order is what FIFO is for), and the deduplication id is a hash of the body and
the moved message's id, so a move retried after a crash is dropped by SQS while a body that truly
arrived twice is not.
"""

from __future__ import annotations

import hashlib
import json
import re

UNPARSEABLE_GROUP = "unparseable"
# SQS: up to 128 characters of alphanumerics and punctuation.
_VALID_GROUP = re.compile(r"[\x21-\x7e]{1,128}")


def is_fifo(queue_url: str) -> bool:
    return queue_url.endswith(".fifo")


def group_of(body: str) -> str:
    """The event's site, read from the body (an envelope or a claim-check pointer), or `unparseable`."""
    try:
        site = json.loads(body).get("site_id")
    except (ValueError, AttributeError, RecursionError):
        return UNPARSEABLE_GROUP
    return site if isinstance(site, str) and _VALID_GROUP.fullmatch(site) else UNPARSEABLE_GROUP


def send_fields(queue_url: str, body: str, message_id: str) -> dict[str, str]:
    """Extra send_message(_batch) fields for `queue_url`: none for a standard queue."""
    if not is_fifo(queue_url):
        return {}
    dedup = hashlib.sha256(body.encode("utf-8", "surrogatepass") + b"\0" + message_id.encode()).hexdigest()
    return {"MessageGroupId": group_of(body), "MessageDeduplicationId": dedup}
