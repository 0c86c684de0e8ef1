"""Event priorities at the edge: which events take the express lane, and the retry log's replay order.

The catalog (`config/events.yaml`) gives each event type its priority. At the edge that priority decides
two things: a high-priority event is also sent to the express queue (when one is configured), and a job
waiting in the retry log is replayed high first, then medium, then low.
"""

from __future__ import annotations

from typing import get_args

from edge_bridge.catalog import Priority, load_event_catalog

PRIORITIES: tuple[str, ...] = get_args(Priority)  # ("high", "medium", "low"): most urgent first
# An event type the catalog does not know is accepted on the wire and treated as the cloud routes it.
UNKNOWN_PRIORITY = "low"
EXPRESS_PRIORITY = "high"


def priority_rank(priority: str | None) -> int:
    """0 for high, 1 for medium, 2 for low (and for anything unknown): the order jobs are replayed in."""
    try:
        return PRIORITIES.index(priority)
    except ValueError:
        return PRIORITIES.index(UNKNOWN_PRIORITY)


def priority_name(rank: int | None) -> str:
    return PRIORITIES[rank] if rank is not None and 0 <= rank < len(PRIORITIES) else UNKNOWN_PRIORITY


def catalog_priorities() -> tuple[tuple[str, str], ...]:
    """(event type, priority) for every catalog type, sorted: hashable, so sender settings can carry it."""
    return tuple(sorted(load_event_catalog().priorities.items()))
