"""The edge's leg of reconciliation: per site and event hour, what the service accepted and what SQS took.

The cloud compares three counts per site and hour (`pipeline.reconciliation`): what the edge sent, what
the drain received, what the archive kept. This module keeps the edge's two:

- `accepted`: events acknowledged to the broker because they were in SQS or committed to the retry log;
- `sent`: SQS messages created for them, by the realtime send or later by a retry (a DLQ replay included).

`accepted - sent` is what still waits at the edge (retry log or local DLQ), which is not a loss. Both
count messages, not distinct events: an event sent twice (a crash between SQS's answer and the ack, a
redelivery after a reconnect) counts twice. The drain counts distinct SQS message ids on its side, so the
edge and drain legs agree exactly with no per-event state here; the archive leg compares distinct events.

Durability: the counts live in memory under a lock, and every update is also appended to a journal with
one `write()` before its chunk is acknowledged, so a `kill -9` loses no count (the kernel keeps a write
that returned; only a power cut can tear the last line, which is then skipped). Every `interval_s` the
writer folds the journal into a snapshot (a new file renamed into place, then a new journal generation)
and puts a manifest to S3 for each hour whose counts changed:

    s3://<bucket>/manifests/edge/hour=YYYY-MM-DDTHH/site=<site_id>/<edge client id>.json

cumulative and overwritten (idempotent); a failed put is tried again on the next round.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

# pipeline.partitions.ARCHIVE_START (kept here so the edge never imports Dagster; a test holds them equal).
ARCHIVE_START = datetime(2024, 1, 1, tzinfo=UTC)
EDGE_MANIFEST_PREFIX = "manifests/edge"
HourKey = tuple[str, str]  # (site_id, hour as "YYYY-MM-DD-HH:00", Dagster's partition key)


def event_hour(timestamp: datetime, received_at: datetime) -> str:
    """The archive hour of an event (as `pipeline.archive.archive_hour`): its event time's hour, or the
    hour the edge received it when a device clock put it before the archive's first hour."""
    when = timestamp if timestamp >= ARCHIVE_START else max(received_at, ARCHIVE_START)
    return when.astimezone(UTC).strftime("%Y-%m-%d-%H:00")


def event_hour_of_body(body: str) -> HourKey:
    """(site_id, hour) of an envelope's JSON text (a retry job's body, validated when it came in)."""
    env = json.loads(body)
    ts = datetime.fromisoformat(env["timestamp"])
    received = datetime.fromisoformat(env.get("received_at") or env["timestamp"])
    return env["site_id"], event_hour(ts, received)


def manifest_key(site_id: str, hour: str, client_id: str) -> str:
    """`manifests/edge/hour=2024-01-15T10/site=<site>/<client>.json` for the partition key `hour`."""
    when = datetime.strptime(hour, "%Y-%m-%d-%H:%M")
    return f"{EDGE_MANIFEST_PREFIX}/hour={when:%Y-%m-%dT%H}/site={site_id}/{client_id}.json"


class HourCounts:
    """Accepted and sent per (site, hour), journaled before each acknowledgement, snapshotted periodically."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "manifest"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._counts: dict[HourKey, list[int]] = {}  # [accepted, sent]
        self._dirty: set[HourKey] = set()
        self._generation = self._load()
        self._fd = os.open(self._journal(self._generation), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._dirty.update(self._counts)  # a restart puts every manifest again: one may have been missed

    def _journal(self, generation: int) -> Path:
        return self.dir / f"journal.{generation}"

    def _load(self) -> int:
        snapshot = self.dir / "counts.json"
        generation = 0
        if snapshot.exists():
            state = json.loads(snapshot.read_text())
            generation = int(state["generation"])
            for site, hour, accepted, sent in state["counts"]:
                self._counts[(site, hour)] = [accepted, sent]
        journal = self._journal(generation)
        if journal.exists():
            for line in journal.read_bytes().split(b"\n"):
                try:
                    kind, site, hour, n = line.decode("utf-8").split("\t")
                    self._counts.setdefault((site, hour), [0, 0])[0 if kind == "a" else 1] += int(n)
                except ValueError:
                    continue  # the empty tail, or a line a power cut tore
        for stale in self.dir.glob("journal.*"):
            if stale.name != journal.name:
                stale.unlink(missing_ok=True)
        return generation

    def record(self, accepted: Mapping[HourKey, int] | None = None, sent: Mapping[HourKey, int] | None = None) -> None:
        """Count a settled chunk: one journal write, then the in-memory counts (call before acknowledging)."""
        lines = []
        for kind, counts in (("a", accepted), ("s", sent)):
            lines += [f"{kind}\t{site}\t{hour}\t{n}\n" for (site, hour), n in (counts or {}).items() if n]
        if not lines:
            return
        with self._lock:
            try:
                os.write(self._fd, "".join(lines).encode("utf-8"))
            except OSError:
                log.exception("cannot journal reconciliation counts; they are kept in memory until the next snapshot")
            for kind, counts in (("a", accepted), ("s", sent)):
                for key, n in (counts or {}).items():
                    self._counts.setdefault(key, [0, 0])[0 if kind == "a" else 1] += n
                    self._dirty.add(key)

    def get(self, site_id: str, hour: str) -> tuple[int, int]:
        with self._lock:
            accepted, sent = self._counts.get((site_id, hour), (0, 0))
        return accepted, sent

    def checkpoint(self) -> dict[HourKey, tuple[int, int]]:
        """Fold the journal into a snapshot; returns the counts of the hours changed since the last call."""
        with self._lock:
            generation = self._generation + 1
            state = {"generation": generation, "counts": [[s, h, a, n] for (s, h), (a, n) in self._counts.items()]}
            tmp = self.dir / "counts.json.tmp"
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.dir / "counts.json")
            old_fd, old_generation = self._fd, self._generation
            self._fd = os.open(self._journal(generation), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._generation = generation
            os.close(old_fd)
            self._journal(old_generation).unlink(missing_ok=True)
            changed = {key: tuple(self._counts[key]) for key in self._dirty}
            self._dirty.clear()
        return changed

    def mark_dirty(self, keys) -> None:
        with self._lock:
            self._dirty.update(keys)

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)


class ManifestWriter:
    """Every `interval_s` (and at stop): snapshot the counts and put the changed hours' manifests to S3."""

    def __init__(self, counts: HourCounts, s3, bucket: str, client_id: str, interval_s: float = 60.0) -> None:
        self.counts, self.s3, self.bucket, self.client_id = counts, s3, bucket, client_id
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="manifest-writer", daemon=True)

    def start(self) -> ManifestWriter:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def flush(self) -> int:
        """Put every changed hour's manifest; returns how many were put. What fails is put next round."""
        try:
            changed = self.counts.checkpoint()
        except Exception:  # noqa: BLE001 - e.g. a full disk: the journal still holds the counts
            log.exception("cannot snapshot the reconciliation counts")
            return 0
        failed, put = [], 0
        for (site, hour), (accepted, sent) in sorted(changed.items()):
            body = {
                "site_id": site,
                "hour": hour,
                "edge_client_id": self.client_id,
                "accepted": accepted,
                "sent": sent,
                "buffered": accepted - sent,
                "written_at": datetime.now(UTC).isoformat(),
            }
            try:
                self.s3.put_object(
                    Bucket=self.bucket,
                    Key=manifest_key(site, hour, self.client_id),
                    Body=json.dumps(body).encode("utf-8"),
                    ContentType="application/json",
                )
                put += 1
            except Exception as exc:  # noqa: BLE001 - S3 away: the hour stays changed and goes next round
                failed.append((site, hour))
                error = f"{type(exc).__name__}: {exc}"
        if failed:
            self.counts.mark_dirty(failed)
            log.warning("could not put %d reconciliation manifests (%s); trying again next round", len(failed), error)
        return put

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)
        self.flush()
        self.counts.close()
