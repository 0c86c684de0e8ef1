"""Reconciliation in three legs, per site and event hour: what the edge sent, what the drain received,
what the archive kept. Plain Python; `pipeline.reconciliation_checks` is the Dagster wiring.

- Edge: each edge service puts `manifests/edge/hour=YYYY-MM-DDTHH/site=<site>/<client>.json` with its
  cumulative `accepted` and `sent` (SQS messages it created) for that hour (`edge_bridge.manifest`).
  `accepted - sent` is still buffered at the edge (retry log or its DLQ): not sent, so not missing.
- Drain: `land_in_archive` puts `manifests/drain/hour=YYYY-MM-DDTHH/<run id>.json` before it writes the
  window's landing files: per site, every message it received as `[message id, event id, resent]`
  (SQS redeliveries and duplicates included). Read back, the distinct message ids the edge made (not the
  cloud's re-sends: an events-dlq replay, a quarantine release) are the messages drained, and the distinct
  event ids the events drained. Landing files name events but not messages, so they cannot serve here.
- Archive: distinct (site_id, event_id) in the hour's archive files.

An hour agrees when, per site, edge sent = messages drained and events drained = events archived.
Counting messages on the first leg makes it exact although SQS and the edge deliver at least once: an
event the edge sent twice is two messages on both sides, and one event on the second leg.

Before an hour has settled (its end plus `settle_minutes`), events of it may still be in SQS or in an
edge manifest not yet put (every minute): only the drain-to-archive leg is judged then.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pyarrow import fs

from edge_bridge.manifest import EDGE_MANIFEST_PREFIX
from pipeline.archive import archive_hour, parse_hour_key, read_archive_hour

DRAIN_MANIFEST_PREFIX = "manifests/drain"
DEFAULT_SETTLE_MINUTES = 15.0


def _hour_dir(prefix: str, hour: str) -> str:
    return f"{prefix}/hour={parse_hour_key(hour):%Y-%m-%dT%H}/"


def drain_manifests(parsed) -> dict[str, dict[str, list[list]]]:
    """A parsed window's messages by event hour and site: `{hour: {site: [[message id, event id, resent]]}}`."""
    events = parsed.events
    by_hour: dict[str, dict[str, list[list]]] = defaultdict(lambda: defaultdict(list))
    for index, message_id, resent in parsed.received:
        env = events[index]
        by_hour[archive_hour(env.timestamp, env.received_at)][env.site_id].append(
            [message_id, env.event_id, int(resent)]
        )
    return {hour: dict(sites) for hour, sites in by_hour.items()}


def write_drain_manifests(s3, bucket: str, run_id: str, parsed) -> dict[str, int]:
    """One object per event hour of the window (a re-run of a window puts new ones; reading de-duplicates)."""
    written = {}
    for hour, sites in sorted(drain_manifests(parsed).items()):
        body = {"run_id": run_id, "hour": hour, "sites": sites}
        s3.put_object(
            Bucket=bucket,
            Key=_hour_dir(DRAIN_MANIFEST_PREFIX, hour) + f"{run_id}.json",
            Body=json.dumps(body, separators=(",", ":")).encode("utf-8"),
            ContentType="application/json",
        )
        written[hour] = sum(len(messages) for messages in sites.values())
    return written


def _objects(s3, bucket: str, prefix: str) -> Iterator[dict]:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def _read_json(s3, bucket: str, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


@dataclass
class EdgeLeg:
    accepted: int = 0
    sent: int = 0
    clients: list[str] = field(default_factory=list)
    written_at: str = ""  # the newest manifest's

    @property
    def buffered(self) -> int:
        return self.accepted - self.sent


def read_edge_legs(s3, bucket: str, hour: str) -> dict[str, EdgeLeg]:
    """Per site, the sum over every edge client's manifest for the hour."""
    legs: dict[str, EdgeLeg] = defaultdict(EdgeLeg)
    for obj in _objects(s3, bucket, _hour_dir(EDGE_MANIFEST_PREFIX, hour)):
        manifest = _read_json(s3, bucket, obj["Key"])
        leg = legs[manifest["site_id"]]
        leg.accepted += int(manifest["accepted"])
        leg.sent += int(manifest["sent"])
        leg.clients.append(manifest["edge_client_id"])
        leg.written_at = max(leg.written_at, manifest.get("written_at", ""))
    return dict(legs)


@dataclass
class DrainLeg:
    messages: set[str] = field(default_factory=set)  # distinct message ids the edge made
    events: set[str] = field(default_factory=set)  # distinct event ids, whoever sent them
    resent_messages: set[str] = field(default_factory=set)  # the cloud's re-sends


def read_drain_legs(s3, bucket: str, hour: str) -> dict[str, DrainLeg]:
    legs: dict[str, DrainLeg] = defaultdict(DrainLeg)
    for obj in _objects(s3, bucket, _hour_dir(DRAIN_MANIFEST_PREFIX, hour)):
        for site, messages in _read_json(s3, bucket, obj["Key"])["sites"].items():
            leg = legs[site]
            for message_id, event_id, resent in messages:
                (leg.resent_messages if resent else leg.messages).add(message_id)
                leg.events.add(event_id)
    return dict(legs)


def archived_by_site(filesystem: fs.FileSystem, bucket: str, hour: str) -> dict[str, int]:
    """Distinct event ids per site in the hour's archive files."""
    table = read_archive_hour(filesystem, bucket, hour).select(["site_id", "event_id"])
    if table.num_rows == 0:
        return {}
    grouped = table.group_by("site_id").aggregate([("event_id", "count_distinct")])
    return dict(zip(grouped.column("site_id").to_pylist(), grouped.column("event_id_count_distinct").to_pylist()))


@dataclass
class SiteReconciliation:
    """The three legs of one site in one hour, and what disagrees."""

    site_id: str
    hour: str
    edge_accepted: int | None  # None: no edge manifest for the site and hour
    edge_sent: int | None
    drained_messages: int
    drained_events: int
    archived: int
    resent_in_cloud: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def edge_buffered(self) -> int:
        return (self.edge_accepted or 0) - (self.edge_sent or 0)

    def as_metadata(self) -> dict:
        return {
            "site_id": self.site_id,
            "hour": self.hour,
            "edge_accepted": self.edge_accepted,
            "edge_sent": self.edge_sent,
            "edge_buffered": self.edge_buffered,
            "drained_messages": self.drained_messages,
            "drained_events": self.drained_events,
            "resent_in_cloud": self.resent_in_cloud,
            "archived": self.archived,
            "problems": self.problems,
        }


@dataclass
class HourReconciliation:
    hour: str
    settled: bool
    settles_at: datetime
    sites: list[SiteReconciliation]

    @property
    def disagreeing(self) -> list[SiteReconciliation]:
        return [s for s in self.sites if s.problems]

    @property
    def passed(self) -> bool:
        return not self.disagreeing


def settles_at(hour: str, settle_minutes: float = DEFAULT_SETTLE_MINUTES) -> datetime:
    return parse_hour_key(hour) + timedelta(hours=1, minutes=settle_minutes)


def compare(
    hour: str, edge: dict[str, EdgeLeg], drain: dict[str, DrainLeg], archived: dict[str, int], settled: bool
) -> list[SiteReconciliation]:
    """Per site: the edge leg (judged once `settled`) and the drain-to-archive leg (always)."""
    sites = []
    for site in sorted(set(edge) | set(drain) | set(archived)):
        e, d, kept = edge.get(site), drain.get(site, DrainLeg()), archived.get(site, 0)
        row = SiteReconciliation(
            site,
            hour,
            e.accepted if e else None,
            e.sent if e else None,
            len(d.messages),
            len(d.events),
            kept,
            len(d.resent_messages),
        )
        if settled:
            if e is None and d.messages:
                row.problems.append(f"no edge manifest, {len(d.messages)} messages drained")
            elif e is not None and e.sent > len(d.messages):
                row.problems.append(
                    f"{e.sent - len(d.messages)} messages the edge sent were not drained (lost after the edge, "
                    "still in SQS or events-dlq, or quarantined by the drain)"
                )
            elif e is not None and e.sent < len(d.messages):
                row.problems.append(f"{len(d.messages) - e.sent} messages drained that the edge did not count as sent")
        if len(d.events) > kept:
            row.problems.append(f"{len(d.events) - kept} events drained but not archived")
        elif kept > len(d.events):
            row.problems.append(f"{kept - len(d.events)} events archived that no drain manifest names")
        sites.append(row)
    return sites


def reconcile_hour(
    s3,
    filesystem: fs.FileSystem,
    bucket: str,
    hour: str,
    now: datetime,
    settle_minutes: float = DEFAULT_SETTLE_MINUTES,
) -> HourReconciliation:
    """Read the three legs of `hour` and compare them site by site."""
    settled_at = settles_at(hour, settle_minutes)
    settled = now >= settled_at
    sites = compare(
        hour,
        read_edge_legs(s3, bucket, hour),
        read_drain_legs(s3, bucket, hour),
        archived_by_site(filesystem, bucket, hour),
        settled,
    )
    return HourReconciliation(hour, settled, settled_at, sites)


def mismatch_size(site: SiteReconciliation) -> int:
    """The gauge's value for a site: the largest gap between two of its legs (0 when they agree)."""
    if not site.problems:
        return 0
    gaps = [abs(site.drained_events - site.archived)]
    if site.edge_sent is not None:
        gaps.append(abs(site.edge_sent - site.drained_messages))
    else:
        gaps.append(site.drained_messages)
    return max(max(gaps), 1)
