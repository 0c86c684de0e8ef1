"""Pipeline metrics for Prometheus: Dagster runs are short-lived, so they push to a Pushgateway.

Names are part of the monitoring contract (DESIGN.md): sqs_queue_depth, consumer_lag,
processing_error_rate, partner_delivery_success_rate, parquet_files_written, archival_lag_minutes.
Pushing is a no-op unless PIPELINE_PUSHGATEWAY_URL is set, and a Pushgateway that is down never fails
a run (metrics are observability, not delivery). The Pushgateway serves a group's last values for ever
and stamps each push as push_time_seconds{job, ...grouping key}: that, not the value, says how old a
gauge is (archival_lag_minutes is pushed every minute by a timer, see pipeline.freshness).
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

log = logging.getLogger(__name__)


def pushgateway_url() -> str | None:
    return os.environ.get("PIPELINE_PUSHGATEWAY_URL") or None


def push_gauges(
    job: str,
    gauges: dict[str, tuple[str, float]],
    labels: dict[str, str] | None = None,
    grouping_key: dict[str, str] | None = None,
) -> bool:
    """Push `{name: (help, value)}` as gauges under `job`; returns whether anything was pushed."""
    url = pushgateway_url()
    if not url:
        return False
    registry = CollectorRegistry()
    label_names = sorted(labels or {})
    for name, (help_text, value) in gauges.items():
        gauge = Gauge(name, help_text, label_names, registry=registry)
        (gauge.labels(**labels) if labels else gauge).set(value)
    try:
        push_to_gateway(url, job=job, registry=registry, grouping_key=grouping_key or {}, timeout=5)
        return True
    except OSError as exc:
        log.warning("could not push metrics to %s: %s", url, exc)
        return False
