"""What the pollers have received and the writer has not yet written: most urgent first, and bounded.

The bound counts messages from the moment they are received until their batch is written (or left
for redelivery), per lane: high has a lane of its own, so high never waits behind medium or low;
medium and low share the background lane, which the background poller keeps to one batch at a time.
A lane at its bound makes its poller wait, and SQS keeps the rest.
"""

from __future__ import annotations

import itertools
import queue
import threading

from pipeline.routing.config import PRIORITIES

RANK = {p: n for n, p in enumerate(PRIORITIES)}
HIGH, BACKGROUND = "high", "background"
LANES = (HIGH, BACKGROUND)


def lane(priority: str) -> str:
    return HIGH if priority == "high" else BACKGROUND


class PendingWork:
    def __init__(self, high_limit: int) -> None:
        self.high_limit = high_limit
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._changed = threading.Condition()
        self._counts = {HIGH: 0, BACKGROUND: 0}

    def count(self, name: str) -> int:
        return self._counts[name]

    def outstanding(self) -> int:
        """Messages received and not yet settled, in either lane."""
        with self._changed:
            return sum(self._counts.values())

    def wait_for_high_room(self, room: int, timeout: float) -> bool:
        """Wait until `room` more high messages fit under the bound (False at the timeout)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._counts[HIGH] + room <= self.high_limit, timeout)

    def wait_background_idle(self, timeout: float) -> bool:
        """Wait until the background lane's last batch is settled (False at the timeout)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._counts[BACKGROUND] == 0, timeout)

    def admit(self, priority: str, n: int) -> None:
        """Count `n` just-received messages; each is settled later by `settle`, written or not."""
        with self._changed:
            self._counts[lane(priority)] += n

    def settle(self, priority: str, n: int) -> None:
        with self._changed:
            self._counts[lane(priority)] -= n
            self._changed.notify_all()

    def put(self, priority: str, items: list) -> None:
        """Hand admitted messages to the writer."""
        self._queue.put((RANK[priority], next(self._seq), priority, items))

    def queued(self) -> bool:
        """Whether anything waits for the writer."""
        return not self._queue.empty()

    def take(self, timeout: float, max_items: int = 500) -> tuple[str, list] | None:
        """The most urgent batch, with every other waiting batch of the same priority behind it.

        One commit costs about as much as ten, so a burst is written in one transaction instead of
        queueing behind itself.
        """
        try:
            _, _, priority, items = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        while len(items) < max_items:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry[2] != priority:
                self._queue.put(entry)
                break
            items = items + entry[3]
        return priority, items
