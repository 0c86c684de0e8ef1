"""NVRs and the door-access system over HTTP: one server, a path each, answered only for what the site has.

- `POST /isapi/events`: Hikvision ISAPI event notifications, as a recorder posts them to its "alarm host"
  (HTTP listening): an `EventNotificationAlert` in XML or JSON, or a `multipart/form-data` body whose
  first XML/JSON part is the notification (picture parts are left out). 200 once the envelope is at the
  site broker, or once a notification the catalog has no type for is quarantined (so the recorder does
  not resend it for ever); 400 and a quarantine entry for a body that is not a notification at all;
  503 while the broker has not acknowledged, so the recorder resends.
- `POST /idp/access`: the door-access system's webhook, one access decision per request, signed with a
  shared secret: `X-Signature: sha256=<hex HMAC-SHA256 of the body>` (the bare hex is accepted too).
  A missing or wrong signature is 401, counted and logged, and goes nowhere: it is not a device event.
  200 once forwarded; 400 and a quarantine entry for a decision that cannot be read; 503 as above.
- `GET /healthz`, `GET /status` (what each ingress received and answered), `GET /metrics` (Prometheus).

Bodies are bounded (`max_body_bytes`; 413 and a quarantine entry beyond it, unread), requests in flight
are bounded (503 beyond), and a slow sender is cut off after `read_timeout` seconds.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import hmac
import json
import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from edge_bridge.adapters import nvr as nvr_adapter
from edge_bridge.adapters.base import AdapterRejected
from edge_bridge.envelope import utc_now
from edge_bridge.forwarder import Outcome

log = logging.getLogger(__name__)

NVR_PATH = "/isapi/events"
IDP_PATH = "/idp/access"
SIGNATURE_HEADER = "X-Signature"
NVR_SOURCE = "nvr/isapi"
IDP_SOURCE = "idp/access"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
RETRY_AFTER_S = "5"


def sign(secret: str | bytes, body: bytes) -> str:
    """The `X-Signature` value for a body: what the door system sends and this ingress checks."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def signature_ok(secret: bytes, body: bytes, header: str | None) -> bool:
    if not header:
        return False
    given = header.strip()
    given = given[len("sha256=") :] if given.lower().startswith("sha256=") else given
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given.lower())


def notification_part(body: bytes, content_type: str) -> tuple[bytes, int]:
    """The notification inside an ISAPI post, and how many other parts (pictures) came with it."""
    if not content_type.lower().startswith("multipart/"):
        return body, 0
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise AdapterRejected("bad_multipart", "a multipart content type without readable parts")
    parts = list(message.iter_parts())
    for part in parts:
        data = part.get_payload(decode=True) or b""
        kind = part.get_content_type()
        if "xml" in kind or "json" in kind or data.lstrip()[:1] in (b"<", b"{"):
            return data, len(parts) - 1
    raise AdapterRejected("bad_multipart", f"no XML or JSON part among {len(parts)} parts")


class HttpIngress:
    """The HTTP ingresses of one site's forwarder (either may be off)."""

    def __init__(
        self,
        forwarder,
        host: str = "0.0.0.0",
        port: int = 0,
        nvr: bool = True,
        idp_secret: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        publish_timeout: float = 5.0,
        max_concurrent: int = 64,
        read_timeout: float = 30.0,
        status: Callable[[], dict] | None = None,
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        self.forwarder = forwarder
        self.host, self.requested_port = host, port
        self.nvr = nvr
        self.idp_secret = idp_secret.encode("utf-8") if idp_secret else None
        self.max_body_bytes = max_body_bytes
        self.publish_timeout = publish_timeout
        self.read_timeout = read_timeout
        self.status_provider = status
        self.metrics_provider = metrics
        self.counts: Counter[str] = Counter()  # "<family>:<status code>" and refusals
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.requested_port

    def start(self) -> HttpIngress:
        handler = type("Handler", (_Handler,), {"ingress": self, "timeout": self.read_timeout})
        server = ThreadingHTTPServer((self.host, self.requested_port), handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http-ingress", daemon=True
        )
        self._thread.start()
        paths = [p for p, on in ((NVR_PATH, self.nvr), (IDP_PATH, self.idp_secret is not None)) if on]
        log.info("HTTP ingress on %s:%d (%s)", self.host, self.port, ", ".join(paths) or "status only")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def status(self) -> dict:
        return {"port": self.port, "nvr": self.nvr, "idp": self.idp_secret is not None, "counts": dict(self.counts)}

    # --- one request each; the handler calls these with the body read ---------------------------------

    def nvr_post(self, body: bytes, content_type: str) -> tuple[int, dict]:
        received_at = utc_now()
        try:
            part, pictures = notification_part(body, content_type)
            nvr_adapter.read_notification(part)
        except AdapterRejected as exc:
            return self._refused("nvr", NVR_SOURCE, body, exc.reason, exc.detail)
        except Exception as exc:  # noqa: BLE001 - a body no parser can take is this request's, never the server's
            return self._refused("nvr", NVR_SOURCE, body, "unreadable", f"{type(exc).__name__}: {exc}"[:300])
        if pictures:
            self.count("nvr:pictures_left_out")
        outcome = self.forwarder.handle("nvr", NVR_SOURCE, part, received_at, timeout=self.publish_timeout)
        return self._answer("nvr", outcome, refused_status=200)

    def idp_post(self, body: bytes, signature: str | None) -> tuple[int, dict]:
        if not signature_ok(self.idp_secret, body, signature):
            self.count("idp:bad_signature")
            log.warning(
                "door-access webhook with a %s signature refused (401); not forwarded",
                "missing" if not signature else "wrong",
            )
            return 401, {"error": "bad signature"}
        outcome = self.forwarder.handle("idp", IDP_SOURCE, body, utc_now(), timeout=self.publish_timeout)
        return self._answer("idp", outcome, refused_status=400)

    def too_large(self, family: str, source: str, length: int) -> tuple[int, dict]:
        """413, unread. An NVR's is quarantined (a recorder misconfigured); a webhook's is only counted, since
        its signature cannot be checked unread and an unsigned sender must not fill the quarantine."""
        self.count(f"{family}:too_large")
        if family == "idp":
            log.warning("door-access webhook of %d bytes refused unread (limit %d)", length, self.max_body_bytes)
            return 413, {"error": "body too large"}
        outcome = self.forwarder.reject(
            source, b"", "too_large", f"a {length}-byte body (limit {self.max_body_bytes}), left unread", family=family
        )
        return (413, {"error": "body too large"}) if outcome.received else (503, {"error": "not received, send again"})

    def _refused(self, family: str, source: str, body: bytes, reason: str, detail: str) -> tuple[int, dict]:
        outcome = self.forwarder.reject(source, body, reason, detail, family=family)
        if outcome.received:
            return 400, {"error": reason, "detail": detail[:200]}
        return 503, {"error": "not received, send again"}

    def _answer(self, family: str, outcome: Outcome, refused_status: int) -> tuple[int, dict]:
        if outcome is Outcome.FORWARDED:
            return 200, {"status": "received"}
        if outcome is Outcome.QUARANTINED:
            return refused_status, {"status": "quarantined"}
        return 503, {"error": "not received, send again"}


class _Handler(BaseHTTPRequestHandler):
    ingress: HttpIngress
    protocol_version = "HTTP/1.1"
    server_version = "edge-forwarder"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        # The answer's headers and body go out in two writes: without this, Nagle holds the body until the
        # client's delayed ACK (40 ms) comes, and a device posting one request at a time waits that long each.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's name
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        ingress = self.ingress
        if self.path == "/healthz":
            self._send(200, {"status": "ok"})
        elif self.path == "/status":
            self._send(200, ingress.status_provider() if ingress.status_provider else ingress.status())
        elif self.path == "/metrics" and ingress.metrics_provider is not None:
            self._send_bytes(200, ingress.metrics_provider(), "text/plain; version=0.0.4")
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        ingress = self.ingress
        path = self.path.split("?", 1)[0]
        if path == NVR_PATH and ingress.nvr:
            family, source = "nvr", NVR_SOURCE
        elif path == IDP_PATH and ingress.idp_secret is not None:
            family, source = "idp", IDP_SOURCE
        else:
            self.close_connection = True
            return self._send(404, {"error": "not found"})
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            ingress.count(f"{family}:no_length")
            return self._send(411, {"error": "Content-Length required"})
        length = int(length)
        if length > ingress.max_body_bytes:
            self.close_connection = True
            return self._send(*ingress.too_large(family, source, length))
        if not ingress._slots.acquire(blocking=False):
            self.close_connection = True
            ingress.count(f"{family}:busy")
            return self._send(503, {"error": "busy, send again"}, retry_after=True)
        try:
            body = self.rfile.read(length)
            if len(body) < length:  # the sender stopped or timed out: nothing was received
                self.close_connection = True
                ingress.count(f"{family}:short_body")
                return
            if family == "nvr":
                status, answer = ingress.nvr_post(body, self.headers.get("Content-Type", ""))
            else:
                status, answer = ingress.idp_post(body, self.headers.get(SIGNATURE_HEADER))
        except Exception as exc:  # noqa: BLE001 - never ack what was not handed on; the server goes on
            log.exception("%s request failed", family)
            status, answer = 503, {"error": f"not received ({type(exc).__name__}), send again"}
        finally:
            ingress._slots.release()
        ingress.count(f"{family}:{status}")
        self._send(status, answer, retry_after=status == 503)

    def _send(self, status: int, answer: dict, retry_after: bool = False) -> None:
        self._send_bytes(status, json.dumps(answer).encode("utf-8"), "application/json", retry_after)

    def _send_bytes(self, status: int, body: bytes, content_type: str, retry_after: bool = False) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if retry_after:
                self.send_header("Retry-After", RETRY_AFTER_S)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the sender hung up; it resends what it got no answer for
            self.close_connection = True
