"""The Grafana route: operational event lines to Loki's push API, and the drain's cloud metrics.

Monitoring is observability, not delivery: a Loki that is down is logged and counted by the caller,
and never holds a window in SQS (the events are still archived, so nothing is lost).
"""

from __future__ import annotations

import json
import logging
import time

import requests

from edge_bridge.envelope import Envelope, utc_now

log = logging.getLogger(__name__)


MAX_LOKI_LINE_BYTES = 64 * 1024  # Loki refuses a push whose lines exceed its max_line_size (256 KiB by default)

# What an operational line may carry from an event's payload: device-health facts, as scalars, and
# nothing else. Loki is read by more people than any partner and keeps lines for weeks, so it gets a
# whitelist like a partner does: a payload key outside this set (a user name, a credential, a nested
# object) never reaches it, whatever the event type. Add a key here only if an operator needs it.
LOKI_PAYLOAD_FIELDS = frozenset(
    {"state", "battery", "battery_low", "voltage", "linkquality", "tamper", "event_code", "device_type", "channel"}
)
LOKI_LINE_FIELDS = ("event_id", "device_id", "payload")  # the line's own keys (site, type and source are stream labels)


def loki_payload(payload: object) -> dict:
    """The declared device-health fields of a payload, scalars only."""
    if not isinstance(payload, dict):
        return {}
    return {
        key: value
        for key, value in payload.items()
        if key in LOKI_PAYLOAD_FIELDS and (value is None or isinstance(value, (str, int, float, bool)))
    }


def loki_line(event: Envelope) -> str:
    """One event's log line: its ids and its declared payload fields. A line too big for Loki (a huge
    string in a declared field) keeps only the ids and the size, so one event cannot make Loki refuse
    the whole push."""
    line = json.dumps(
        {"event_id": event.event_id, "device_id": event.device_id, "payload": loki_payload(event.payload)},
        separators=(",", ":"),
        allow_nan=False,
    )
    if len(line) > MAX_LOKI_LINE_BYTES:
        line = json.dumps(
            {"event_id": event.event_id, "device_id": event.device_id, "payload_truncated_bytes": len(line)},
            separators=(",", ":"),
        )
    return line


def loki_streams(events: list[Envelope]) -> dict:
    """Loki push body: one stream per (site, event type, source), values as [ns timestamp, JSON line].

    An event whose line cannot be built is left out (logged): monitoring must not fail on one event.
    """
    streams: dict[tuple[str, str, str], list[list[str]]] = {}
    for event in events:
        try:
            key = (event.site_id, event.event_type, event.source)
            value = [str(int(event.timestamp.timestamp() * 1e9)), loki_line(event)]
        except Exception as exc:  # noqa: BLE001 - one event's line, not the push
            log.warning("no Loki line for event %r: %s: %s", getattr(event, "event_id", "?"), type(exc).__name__, exc)
            continue
        streams.setdefault(key, []).append(value)
    return {
        "streams": [
            {"stream": {"job": "edge-events", "site_id": s, "event_type": t, "source": src}, "values": sorted(values)}
            for (s, t, src), values in sorted(streams.items())
        ]
    }


def push_to_loki(url: str, events: list[Envelope], timeout_s: float = 5.0, attempts: int = 3) -> bool:
    """POST to `<url>/loki/api/v1/push`; returns whether Loki accepted it (after a few quick tries)."""
    if not events:
        return True
    endpoint = url.rstrip("/") + "/loki/api/v1/push"
    body = loki_streams(events)
    if not body["streams"]:
        return True
    data = json.dumps(body, separators=(",", ":")).encode("utf-8")
    for attempt in range(1, attempts + 1):
        try:
            response = requests.post(
                endpoint, data=data, headers={"Content-Type": "application/json"}, timeout=timeout_s
            )
            if response.status_code < 300:
                return True
            log.warning("Loki push attempt %d: HTTP %s %s", attempt, response.status_code, response.text[:200])
        except requests.RequestException as exc:
            log.warning("Loki push attempt %d: %s", attempt, exc)
        time.sleep(0.2 * attempt)
    return False


def window_metrics(
    received: int, quarantined: int, events: list[Envelope], queue_visible: int
) -> dict[str, tuple[str, float]]:
    """The seed's cloud metrics for one drain window, as push_gauges expects them."""
    now = utc_now()
    lag = max(((now - e.received_at).total_seconds() for e in events), default=0.0)
    return {
        "sqs_queue_depth": ("Visible messages in the events queue after this drain window", float(queue_visible)),
        "consumer_lag": (
            "Seconds between the edge receiving the oldest event of the window and its drain",
            max(lag, 0.0),
        ),
        "processing_error_rate": (
            "Share of the window's messages quarantined as invalid",
            quarantined / received if received else 0.0,
        ),
    }
