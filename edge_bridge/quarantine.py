"""Where bad input goes: kept with its reason, counted, and never allowed to stall the stream."""

from __future__ import annotations

import base64
import json
import os
import threading
from collections import Counter
from pathlib import Path

from edge_bridge.envelope import format_ts, utc_now


class Quarantine:
    """An append-only JSON-lines file, fsynced before `put` returns so an acked bad message is never lost."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self.reasons: Counter[str] = Counter()

    def put(self, topic: str, payload: bytes, reason: str, detail: str = "") -> None:
        self.put_many([(topic, payload, reason, detail)])

    def put_many(self, items: list[tuple[str, bytes, str, str]]) -> None:
        """Append `(topic, payload, reason, detail)` entries with one fsync: a burst of bad input costs
        one disk flush, not one per message, on the path that also acknowledges the good ones."""
        if not items:
            return
        now = format_ts(utc_now())
        lines = "".join(
            json.dumps(
                {
                    "quarantined_at": now,
                    "topic": topic,
                    "reason": reason,
                    "detail": detail[:500],
                    "payload_b64": base64.b64encode(payload[:65536]).decode("ascii"),
                    "payload_bytes": len(payload),
                }
            )
            + "\n"
            for topic, payload, reason, detail in items
        )
        with self._lock:
            self._file.write(lines)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.reasons.update(reason for _, _, reason, _ in items)

    def close(self) -> None:
        with self._lock:
            self._file.close()
