"""Signed webhook POSTs (Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature).

The webhook-id is a dedupe id the drain derives from the event (its `webhook_id`, else the event_id),
so a partner that receives the same event twice (SQS is at-least-once) can recognise it and keep one.

A partner's answer is read with a bound: at most `RESPONSE_READ_LIMIT` bytes, for at most the timeout
after its headers, so a partner that streams an endless body cannot hold a delivery thread or its memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

import requests
from standardwebhooks import Webhook

RESPONSE_READ_LIMIT = 64 * 1024


@dataclass(frozen=True)
class WebhookResult:
    status_code: int | None  # None: no HTTP answer (refused, timed out) or no request at all
    latency_ms: float
    error: str | None
    refused: bool = False  # the request could not be built from this message: retrying cannot help

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


CONTRACT_VERSION_HEADER = "x-contract-version"


def signed_headers(
    secret: str, msg_id: str, body: str, now: datetime | None = None, contract_version: str | None = None
) -> dict[str, str]:
    """Standard Webhooks headers, plus the partner contract version the body was made under (when known).

    The version header is not part of the signature (the standard signs id, timestamp and body); it
    tells the partner which schema to expect and is logged with the attempt on our side."""
    now = now or datetime.now(UTC)
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, body),
    }
    if contract_version is not None:
        headers[CONTRACT_VERSION_HEADER] = contract_version
    return headers


def prepare_signed(
    session: requests.Session, url: str, secret: str, msg_id: str, body: str, contract_version: str | None = None
) -> requests.PreparedRequest:
    """The signed request, ready to send; raises when this message cannot make one (never for the network).

    A webhook-id or body of the wrong type, or a header value the HTTP library refuses (CR/LF in an id),
    is the message's own fault, so callers treat the exception as that message's fate alone.
    """
    if not isinstance(msg_id, str) or not msg_id:
        raise TypeError(f"webhook id must be a non-empty string, not {type(msg_id).__name__}")
    if not isinstance(body, str):
        raise TypeError(f"webhook body must be a string, not {type(body).__name__}")
    headers = signed_headers(secret, msg_id, body, contract_version=contract_version)
    return session.prepare_request(requests.Request("POST", url, data=body.encode(), headers=headers))


def check_endpoint(session: requests.Session, url: str, secret: str) -> None:
    """Raise if the partner's URL or secret cannot make any request: a cause shared by all its messages."""
    Webhook(secret)
    session.prepare_request(requests.Request("POST", url, data=b"{}"))


def read_bounded(response: requests.Response, limit: int = RESPONSE_READ_LIMIT, seconds: float = 10.0) -> bytes:
    """At most `limit` bytes of the body, read for at most `seconds`; the rest is never read."""
    deadline = time.monotonic() + seconds
    data = bytearray()
    while len(data) < limit and time.monotonic() < deadline:
        chunk = response.raw.read1(limit - len(data), decode_content=True)  # one recv at a time: the deadline holds
        if not chunk:
            break
        data += chunk
    return bytes(data)


def send_signed(session: requests.Session, request: requests.PreparedRequest, timeout_s: float) -> WebhookResult:
    """One attempt; never raises for network trouble (the caller decides about retries)."""
    start = time.perf_counter()
    try:
        response = session.send(request, timeout=timeout_s, stream=True)
    except requests.RequestException as exc:
        return WebhookResult(None, (time.perf_counter() - start) * 1000, f"{type(exc).__name__}: {exc}"[:500])
    try:
        latency = (time.perf_counter() - start) * 1000
        if 200 <= response.status_code < 300:
            error = None
            try:
                read_bounded(response, seconds=timeout_s)  # lets a short answer free the connection for reuse
            except Exception:  # noqa: BLE001 - the partner has accepted; its body does not matter
                pass
        else:
            try:
                text = read_bounded(response, seconds=timeout_s)[:200].decode("utf-8", "replace")
            except Exception as exc:  # noqa: BLE001 - the status says enough
                text = f"(body unreadable: {type(exc).__name__})"
            error = f"HTTP {response.status_code}: {text}"
        return WebhookResult(response.status_code, latency, error)
    finally:
        response.close()


def post_signed(
    session: requests.Session, url: str, secret: str, msg_id: str, body: str, timeout_s: float
) -> WebhookResult:
    """One attempt; never raises for network trouble nor for a request this message cannot make (`refused`)."""
    try:
        request = prepare_signed(session, url, secret, msg_id, body)
    except (requests.RequestException, ValueError, TypeError) as exc:
        return WebhookResult(None, 0.0, f"{type(exc).__name__}: {exc}"[:500], refused=True)
    return send_signed(session, request, timeout_s)
