"""Signed webhook POSTs (Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature).

The webhook-id is the event_id, so a partner that receives the same event twice (SQS is
at-least-once) can recognise it and keep one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

import requests
from standardwebhooks import Webhook


@dataclass(frozen=True)
class WebhookResult:
    status_code: int | None  # None: no HTTP answer (refused, timed out)
    latency_ms: float
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def signed_headers(secret: str, msg_id: str, body: str, now: datetime | None = None) -> dict[str, str]:
    now = now or datetime.now(timezone.utc)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, body),
    }


def post_signed(session: requests.Session, url: str, secret: str, msg_id: str, body: str, timeout_s: float) -> WebhookResult:
    """One attempt; never raises for network trouble (the caller decides about retries)."""
    headers = signed_headers(secret, msg_id, body)
    start = time.perf_counter()
    try:
        response = session.post(url, data=body.encode(), headers=headers, timeout=timeout_s)
    except requests.RequestException as exc:
        return WebhookResult(None, (time.perf_counter() - start) * 1000, f"{type(exc).__name__}: {exc}"[:500])
    latency = (time.perf_counter() - start) * 1000
    error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}: {response.text[:200]}"
    return WebhookResult(response.status_code, latency, error)
