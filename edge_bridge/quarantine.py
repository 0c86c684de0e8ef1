"""Where bad input goes: kept with its reason, counted, and never allowed to stall the stream.

A message is quarantined for what is wrong with it (the envelope's reasons, `site_mismatch`, ...) or,
whatever else went wrong while it alone was being handled, as `processing_error` with the stage and
the exception type in the detail: one message's fault is never its neighbours' fate.

The file is bounded: at `max_bytes` it is rotated (`quarantine.jsonl` -> `.1` -> ... -> `.<keep_files>`)
and the oldest file is deleted; the entries it held are counted (`on_dropped`), so an operator is told
that bad input arrived faster than anyone looked at it. Each entry is bounded too.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from edge_bridge.envelope import format_ts, utc_now

log = logging.getLogger(__name__)

PROCESSING_ERROR = "processing_error"
# Per entry: a payload is kept up to 64 KiB (its full size is recorded), a topic and detail are cut.
MAX_PAYLOAD_BYTES = 65536
MAX_TOPIC_CHARS = 1024
MAX_REASON_CHARS = 64
MAX_DETAIL_CHARS = 500


def error_detail(stage: str, exc: BaseException) -> str:
    """The detail for a `processing_error`: where it happened, the exception type, its message."""
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - an exception whose message itself fails still has a type
        message = "(message unreadable)"
    return f"{stage}: {type(exc).__name__}: {message}"[:MAX_DETAIL_CHARS]


class Quarantine:
    """An append-only JSON-lines file, fsynced before `put` returns so an acked bad message is never lost."""

    def __init__(
        self,
        path: Path,
        max_bytes: int = 64 * 1024 * 1024,
        keep_files: int = 4,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self.keep_files = max(0, keep_files)
        self.on_dropped = on_dropped
        self._file = open(path, "ab")
        self._size = self._file.tell()
        self._lock = threading.Lock()
        self.reasons: Counter[str] = Counter()
        self.dropped = 0  # entries deleted with the oldest rotated file

    def put(self, topic: str, payload: bytes, reason: str, detail: str = "") -> None:
        self.put_many([(topic, payload, reason, detail)])

    def put_many(self, items: list[tuple[str, bytes, str, str]]) -> None:
        """Append `(topic, payload, reason, detail)` entries with one fsync: a burst of bad input costs
        one disk flush, not one per message, on the path that also acknowledges the good ones."""
        if not items:
            return
        now = format_ts(utc_now())
        lines = [_entry(now, *item) for item in items]
        with self._lock:
            start = 0
            for i, line in enumerate(lines):
                if self._size and self._size + len(line) > self.max_bytes:
                    self._write(lines[start:i])
                    self._rotate()
                    start = i
                self._size += len(line)
            self._write(lines[start:])
            self.reasons.update(reason for _, _, reason, _ in items)

    def _write(self, lines: list[bytes]) -> None:
        if lines:
            self._file.write(b"".join(lines))
            self._file.flush()
            os.fsync(self._file.fileno())

    def _rotate(self) -> None:
        """quarantine.jsonl -> .1 -> ... -> .keep_files; what falls off the end is counted as dropped."""
        self._file.close()
        rotated = [self.path.with_name(f"{self.path.name}.{i}") for i in range(1, self.keep_files + 1)]
        oldest = rotated[-1] if rotated else self.path
        dropped = _count_lines(oldest)
        oldest.unlink(missing_ok=True)
        for older, newer in zip(reversed(rotated[:-1]), reversed(rotated[1:])):
            if older.exists():
                os.replace(older, newer)
        if rotated:
            os.replace(self.path, rotated[0])
        _fsync_dir(self.path.parent)
        self._file = open(self.path, "ab")
        self._size = 0
        if dropped:
            self.dropped += dropped
            log.warning(
                "quarantine rotated at %d bytes: %d entries of its oldest file deleted", self.max_bytes, dropped
            )
            if self.on_dropped is not None:
                self.on_dropped(dropped)

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _entry(now: str, topic: str, payload: bytes, reason: str, detail: str) -> bytes:
    """One bounded JSON line; an entry that cannot be written as given is written as a processing_error."""
    try:
        entry = {
            "quarantined_at": now,
            "topic": topic[:MAX_TOPIC_CHARS],
            "reason": reason[:MAX_REASON_CHARS],
            "detail": detail[:MAX_DETAIL_CHARS],
            "payload_b64": base64.b64encode(payload[:MAX_PAYLOAD_BYTES]).decode("ascii"),
            "payload_bytes": len(payload),
        }
        return (json.dumps(entry) + "\n").encode("utf-8")
    except Exception as exc:  # noqa: BLE001 - the entry's own fault: keep what can be kept, never fail its batch
        raw = payload[:MAX_PAYLOAD_BYTES] if isinstance(payload, (bytes, bytearray)) else b""
        entry = {
            "quarantined_at": now,
            "topic": topic[:MAX_TOPIC_CHARS] if isinstance(topic, str) else "",
            "reason": PROCESSING_ERROR,
            "detail": error_detail(f"quarantine entry (reason {reason!r:.64})", exc),
            "payload_b64": base64.b64encode(raw).decode("ascii"),
            "payload_bytes": len(payload) if isinstance(payload, (bytes, bytearray)) else 0,
        }
        return (json.dumps(entry) + "\n").encode("utf-8")


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as file:
            return sum(block.count(b"\n") for block in iter(lambda: file.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def _fsync_dir(path: Path) -> None:
    """Make the renames durable: a crash right after a rotation must not bring a deleted file back."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- for operators: reading entries back, and releasing one -----------------------------------------
RELEASED_SUFFIX = ".released"  # beside the quarantine file: one line per released entry


def entry_id(line: bytes | str) -> str:
    """A released entry is recognised by its content (rotation renames files, so line numbers move)."""
    import hashlib

    return hashlib.sha256(line.encode("utf-8") if isinstance(line, str) else line).hexdigest()[:24]


def read_entries(path: Path, keep_files: int, limit: int, reason: str | None = None) -> list[dict]:
    """Newest first, across the rotated files: each entry with `ref` (`<file>:<line>`) and `released`."""
    released = released_ids(path)
    files = [path] + [path.with_name(f"{path.name}.{i}") for i in range(1, keep_files + 1)]
    found: list[dict] = []
    for file in files:
        try:
            lines = file.read_bytes().splitlines()
        except FileNotFoundError:
            continue
        for number in range(len(lines), 0, -1):
            line = lines[number - 1]
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"reason": "unreadable_entry"}
            if reason and entry.get("reason") != reason:
                continue
            entry["ref"] = f"{file.name}:{number}"
            entry["released"] = entry_id(line) in released
            found.append(entry)
            if len(found) >= limit:
                return found
    return found


def find_entry(path: Path, keep_files: int, ref: str) -> tuple[dict, str]:
    """The entry a `ref` names, and its id; LookupError when there is none."""
    name, _, number = ref.rpartition(":")
    allowed = {path.name} | {f"{path.name}.{i}" for i in range(1, keep_files + 1)}
    if name not in allowed or not number.isdigit():
        raise LookupError(f"{ref!r} is not <quarantine file>:<line> (files: {', '.join(sorted(allowed))})")
    try:
        lines = path.with_name(name).read_bytes().splitlines()
    except FileNotFoundError:
        raise LookupError(f"no file {name}") from None
    if not 1 <= int(number) <= len(lines):
        raise LookupError(f"{name} has no line {number}")
    line = lines[int(number) - 1]
    return json.loads(line), entry_id(line)


def released_ids(path: Path) -> set[str]:
    try:
        return {
            json.loads(line)["entry"]
            for line in path.with_name(path.name + RELEASED_SUFFIX).read_text().splitlines()
            if line.strip()
        }
    except FileNotFoundError:
        return set()


def record_release(path: Path, entry: str, ref: str, event_id: str) -> None:
    with open(path.with_name(path.name + RELEASED_SUFFIX), "a", encoding="utf-8") as file:
        file.write(
            json.dumps({"entry": entry, "ref": ref, "event_id": event_id, "released_at": format_ts(utc_now())}) + "\n"
        )
        file.flush()
        os.fsync(file.fileno())
