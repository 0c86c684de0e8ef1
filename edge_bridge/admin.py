"""The service's local admin API: the only way in to the retry log, since the service owns the DuckDB file.

GET  /metrics      Prometheus text format
GET  /healthz      200 when the service can take events; 503 when MQTT is down or the retry log is full
GET  /status       counts as JSON (the CLI's `status`)
GET  /dlq?limit=N  dead letters (event id, attempts, last error)
POST /dlq/replay   move the DLQ back for delivery (the 02:00 schedule and the CLI call this)
POST /events       an internal event {"event_type", "payload", "device_id"}; 202 once persisted

It listens on loopback by default: it is for the site's own tools, not the network.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlparse

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

if TYPE_CHECKING:
    from edge_bridge.service import EdgeService

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    service: "EdgeService"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("admin %s", format % args)

    def _reply(self, status: int, body: bytes | dict | list, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        if url.path == "/metrics":
            self._reply(200, generate_latest(self.service.metrics.registry), CONTENT_TYPE_LATEST)
        elif url.path == "/healthz":
            status = self.service.status()
            ok = status["mqtt_connected"] and not status["retry_log_full"]
            self._reply(200 if ok else 503, {"ok": ok, **status})
        elif url.path == "/status":
            self._reply(200, self.service.status())
        elif url.path == "/dlq":
            limit = int(parse_qs(url.query).get("limit", ["100"])[0])
            letters = self.service.retry_log.dead_letters(limit)
            self._reply(200, [letter.__dict__ for letter in letters])
        else:
            self._reply(404, {"error": f"no such endpoint {url.path}"})

    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        if url.path == "/dlq/replay":
            self._reply(200, {"replayed": self.service.replay_dlq()})
        elif url.path == "/events":
            self._post_event()
        else:
            self._reply(404, {"error": f"no such endpoint {url.path}"})

    def _post_event(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_REQUEST_BYTES:
            self._reply(413, {"error": f"request over {MAX_REQUEST_BYTES} bytes"})
            return
        try:
            data = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(data, dict) or not isinstance(data.get("event_type"), str):
                raise ValueError("expected an object with a string event_type")
            payload = data.get("payload", {})
            if not isinstance(payload, dict):
                raise ValueError("payload must be an object")
            envelope = self.service.emit(data["event_type"], payload, device_id=str(data.get("device_id") or "edge-service"))
        except (ValueError, ValidationError) as exc:
            self._reply(400, {"error": str(exc)[:500]})
            return
        except TimeoutError as exc:
            self._reply(503, {"error": str(exc)})
            return
        self._reply(202, {"event_id": envelope.event_id, "idempotency_key": envelope.idempotency_key})


class AdminServer:
    def __init__(self, service: "EdgeService", host: str, port: int) -> None:
        handler = type("AdminHandler", (_Handler,), {"service": service})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="admin-api", daemon=True)

    def start(self) -> "AdminServer":
        self._thread.start()
        log.info("admin API on http://%s:%d", *self.httpd.server_address[:2])
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
