"""The service's local admin API: the only way in to the retry log, since the service owns the DuckDB file.

GET  /metrics      Prometheus text format
GET  /healthz      200 when the service can take events; 503 when MQTT is down or the retry log is full
GET  /status       counts as JSON (the CLI's `status`)
GET  /dlq?limit=N  dead letters (event id, attempts, last error); N from 1 to MAX_DLQ_LIMIT, default 100
POST /dlq/replay   move the DLQ back for delivery (the 02:00 schedule and the CLI call this)
POST /events       an internal event {"event_type", "payload", "device_id"}; 202 once persisted
GET  /quarantine?limit=N&reason=R   quarantined messages, newest first, each with its `ref`
POST /quarantine/release {"ref"}   send one back through the intake, once the cause is fixed: 200 once
                   it is in SQS or the retry log; 409 when it would still be refused (the reason says why)
GET  /trace?event_id=E&site_id=S   where this service holds an event: its pending retry-log jobs, its
                   DLQ rows and its quarantine entries (site_id optional); read-only, for `python -m pipeline.trace`

It listens on loopback by default: it is for the site's own tools, not the network. Loopback is still
reachable from any browser on the machine, so:

- the POST endpoints need `Authorization: Bearer $EDGE_ADMIN_TOKEN` (403 while no token is configured,
  401 for a missing or wrong one); the GET endpoints stay open, for Prometheus and health checks;
- a request a browser made for another site's page is refused (403): it carries `Origin`, or
  `Sec-Fetch-Site` other than `same-origin`/`none`. None of the site's tools sends either;
- a POST body must say `Content-Type: application/json` (a cross-site form cannot) and declare its
  `Content-Length`, at most MAX_REQUEST_BYTES; a larger one is refused (413) before any of it is read.

Every refusal is a JSON object with an `error` that says what was wrong.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

if TYPE_CHECKING:
    from edge_bridge.service import EdgeService

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20
MAX_DLQ_LIMIT = 100_000
# A client that declares a body and then does not send it must not hold a handler thread for ever.
REQUEST_TIMEOUT_S = 30.0
_BROWSER_FETCH_SITES_ALLOWED = {"same-origin", "none"}
_DIGITS = re.compile(r"[0-9]{1,12}")


class Refused(Exception):
    """A request the API answers with `status` and a JSON error instead of doing what it asked."""

    def __init__(self, status: int, error: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.headers = headers or {}


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


class _Handler(BaseHTTPRequestHandler):
    service: EdgeService
    admin_token: str | None
    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("admin %s", format % args)

    def _reply(
        self,
        status: int,
        body: bytes | dict | list,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _answer(self, route) -> None:
        """Run `route`, turning a refusal into its JSON error and anything unforeseen into a 500 that names it."""
        try:
            try:
                self._refuse_cross_origin()
                route(urlsplit(self.path))
            except Refused as refused:
                self._reply(refused.status, {"error": refused.error}, headers=refused.headers)
            except ConnectionError:
                raise
            except Exception as exc:
                log.exception("admin %s %s failed", self.command, self.path)
                self._reply(500, {"error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        except ConnectionError:
            log.debug("admin client of %s %s went away", self.command, self.path)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._post)

    def _get(self, url) -> None:
        if url.path == "/metrics":
            self._reply(200, generate_latest(self.service.metrics.registry), CONTENT_TYPE_LATEST)
        elif url.path == "/healthz":
            status = self.service.status()
            ok = status["mqtt_connected"] and not status["retry_log_full"]
            self._reply(200 if ok else 503, {"ok": ok, **status})
        elif url.path == "/status":
            self._reply(200, self.service.status())
        elif url.path == "/dlq":
            limit = _dlq_limit(url.query)
            letters = self.service.retry_log.dead_letters(limit)
            self._reply(200, [letter.__dict__ for letter in letters])
        elif url.path == "/quarantine":
            from edge_bridge.quarantine import read_entries

            limit, reason = _quarantine_query(url.query)
            quarantine = self.service.quarantine
            self._reply(200, read_entries(quarantine.path, quarantine.keep_files, limit, reason))
        elif url.path == "/trace":
            event_id, site_id = _trace_query(url.query)
            self._reply(200, trace_event(self.service, event_id, site_id))
        else:
            raise Refused(404, f"no such endpoint {url.path}")

    def _post(self, url) -> None:
        if url.path not in ("/dlq/replay", "/events", "/quarantine/release"):
            raise Refused(404, f"no such endpoint {url.path}")
        self._authorize()
        body = self._read_json_body(required=url.path != "/dlq/replay")
        if url.path == "/dlq/replay":
            self._reply(200, {"replayed": self.service.replay_dlq()})
        elif url.path == "/quarantine/release":
            self._release(body)
        else:
            self._post_event(body)

    def _release(self, data: object) -> None:
        """Put a quarantined message back through the intake, only if it would now pass (a fix shipped).

        It is checked first, so a release that would only be quarantined again says why instead; then
        it goes the way every message goes and the answer waits until it is in SQS or the retry log.
        """
        from edge_bridge.quarantine import find_entry, record_release, released_ids
        from edge_bridge.send_workers import validate
        from edge_bridge.service import Received

        if not isinstance(data, dict) or not isinstance(data.get("ref"), str):
            raise Refused(400, "expected a JSON object with a string ref (as GET /quarantine lists it)")
        quarantine = self.service.quarantine
        try:
            entry, entry_id = find_entry(quarantine.path, quarantine.keep_files, data["ref"])
        except (LookupError, ValueError) as exc:
            raise Refused(404, str(exc)[:300]) from None
        with _RELEASES:
            if entry_id in released_ids(quarantine.path):
                raise Refused(409, f"{data['ref']} was released already")
            payload = base64.b64decode(entry.get("payload_b64", ""))
            if entry.get("payload_bytes", 0) > len(payload):
                raise Refused(
                    422,
                    f"only the first {len(payload)} of {entry['payload_bytes']} bytes were kept; send it again from its source",
                )
            topic = entry.get("topic", "")
            items, result = validate([(0, topic, payload)])
            if result.rejected:
                _, reason, detail = result.rejected[0]
                self._reply(409, {"error": f"it would be refused again: {reason}: {detail}"[:500], "reason": reason})
                return
            persisted = threading.Event()
            self.service.inbox.put(Received(topic, payload, persisted=persisted))
            if not persisted.wait(REQUEST_TIMEOUT_S):
                raise Refused(503, "not persisted in time; it stays quarantined (nothing was recorded as released)")
            record_release(quarantine.path, entry_id, data["ref"], items[0].event_id)
        self._reply(200, {"released": data["ref"], "event_id": items[0].event_id, "site_id": items[0].site_id})

    def _refuse_cross_origin(self) -> None:
        """A browser tags what a page makes it send; the site's own tools are not browsers, so refuse those."""
        if self.headers.get("Origin") is not None:
            raise Refused(
                403, "cross-origin requests are refused: the admin API is for the site's own tools, not browsers"
            )
        fetch_site = self.headers.get("Sec-Fetch-Site")
        if fetch_site is not None and fetch_site.strip().lower() not in _BROWSER_FETCH_SITES_ALLOWED:
            raise Refused(403, f"cross-origin requests are refused (Sec-Fetch-Site: {fetch_site[:40]})")

    def _authorize(self) -> None:
        if not self.admin_token:
            raise Refused(403, "mutating endpoints are disabled until EDGE_ADMIN_TOKEN is set for the edge service")
        scheme, _, presented = (self.headers.get("Authorization") or "").strip().partition(" ")
        # Compared as bytes: compare_digest refuses non-ASCII str, and headers arrive decoded as latin-1.
        presented_bytes = presented.strip().encode("latin-1", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented_bytes, self.admin_token.encode("utf-8")):
            raise Refused(
                401,
                "missing or wrong admin token: send Authorization: Bearer $EDGE_ADMIN_TOKEN",
                {"WWW-Authenticate": "Bearer"},
            )

    def _read_json_body(self, required: bool) -> object:
        """The request's JSON body, bounded by a declared Content-Length; None when there is none."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise Refused(411, "send the body with a Content-Length, not a Transfer-Encoding")
        if len(self.headers.get_all("Content-Length") or []) > 1:
            raise Refused(400, "Content-Length given more than once")
        declared = self.headers.get("Content-Length")
        if declared is None:
            if required:
                raise Refused(411, "a Content-Length is required")
            return None
        if not _DIGITS.fullmatch(declared.strip()):
            raise Refused(400, f"malformed Content-Length: {declared[:40]!r}")
        length = int(declared)
        if length > MAX_REQUEST_BYTES:
            self.close_connection = True  # the body stays unread, so the connection cannot carry another request
            raise Refused(413, f"request body of {length} bytes is over the limit of {MAX_REQUEST_BYTES} bytes")
        if length == 0:
            if required:
                raise Refused(400, "a JSON body is required")
            return None
        media_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            self.close_connection = True
            raise Refused(415, f"Content-Type must be application/json, not {media_type[:60] or 'missing'!r}")
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise Refused(408, f"request body not received within {REQUEST_TIMEOUT_S:.0f}s") from None
        if len(raw) < length:
            self.close_connection = True
            raise Refused(400, f"request body ended after {len(raw)} of {length} declared bytes")
        try:
            return json.loads(raw, parse_constant=_reject_constant)
        except RecursionError:
            raise Refused(400, "invalid JSON: nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
            raise Refused(400, f"invalid JSON: {str(exc)[:200]}") from None

    def _post_event(self, data: object) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("event_type"), str):
            raise Refused(400, "expected a JSON object with a string event_type")
        payload = data.get("payload", {})
        if not isinstance(payload, dict):
            raise Refused(400, "payload must be a JSON object")
        device_id = data.get("device_id")
        if device_id is not None and not isinstance(device_id, str):
            raise Refused(400, "device_id must be a string")
        try:
            envelope = self.service.emit(data["event_type"], payload, device_id=device_id or "edge-service")
        except (ValueError, ValidationError) as exc:
            raise Refused(400, str(exc)[:500]) from None
        except RecursionError:
            raise Refused(400, "payload nested too deeply") from None
        except TimeoutError as exc:
            raise Refused(503, str(exc)) from None
        self._reply(202, {"event_id": envelope.event_id, "idempotency_key": envelope.idempotency_key})


def _dlq_limit(query: str) -> int:
    """`limit` of GET /dlq: a whole number from 1 to MAX_DLQ_LIMIT; anything else is the caller's mistake (400)."""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=10)
    except ValueError as exc:
        raise Refused(400, f"malformed query string: {str(exc)[:100]}") from None
    unknown = sorted(set(params) - {"limit"})
    if unknown:
        raise Refused(400, f"unknown query parameter {unknown[0][:40]!r}; /dlq takes only limit")
    values = params.get("limit", ["100"])
    if len(values) != 1:
        raise Refused(400, "limit given more than once")
    [value] = values
    if not _DIGITS.fullmatch(value) or not 1 <= int(value) <= MAX_DLQ_LIMIT:
        raise Refused(400, f"limit must be a whole number from 1 to {MAX_DLQ_LIMIT}, not {value[:40]!r}")
    return int(value)


def _quarantine_query(query: str) -> tuple[int, str | None]:
    """`limit` (1 to 10,000, default 50) and an optional `reason` of GET /quarantine; anything else is a 400."""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=10)
    except ValueError as exc:
        raise Refused(400, f"malformed query string: {str(exc)[:100]}") from None
    unknown = sorted(set(params) - {"limit", "reason"})
    if unknown or any(len(v) != 1 for v in params.values()):
        raise Refused(400, "/quarantine takes limit and reason, each at most once")
    limit = params.get("limit", ["50"])[0]
    if not _DIGITS.fullmatch(limit) or not 1 <= int(limit) <= 10_000:
        raise Refused(400, f"limit must be a whole number from 1 to 10000, not {limit[:40]!r}")
    reason = params.get("reason", [None])[0]
    if reason is not None and not re.fullmatch(r"[a-z_]{1,64}", reason):
        raise Refused(400, "reason is a quarantine reason such as too_deep")
    return int(limit), reason


def _trace_query(query: str) -> tuple[str, str | None]:
    """`event_id` (required) and `site_id` of GET /trace; anything else is a 400."""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=10)
    except ValueError as exc:
        raise Refused(400, f"malformed query string: {str(exc)[:100]}") from None
    unknown = sorted(set(params) - {"event_id", "site_id"})
    if unknown or any(len(v) != 1 for v in params.values()):
        raise Refused(400, "/trace takes event_id and site_id, each at most once")
    event_id, site_id = params.get("event_id", [""])[0], params.get("site_id", [None])[0]
    for name, value in (("event_id", event_id), ("site_id", site_id)):
        if value is not None and not _TRACE_ID.fullmatch(value):
            raise Refused(400, f"{name} must be 1 to 128 letters, digits or . _ : -")
    return event_id, site_id


_TRACE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}")
TRACE_MAX_ROWS = 100  # of each kind: an event id a careless site reuses must not make the answer huge


def trace_event(service: EdgeService, event_id: str, site_id: str | None) -> dict:
    """Every place this service holds the event: retry-log jobs, DLQ rows, quarantine entries and releases."""
    jobs, dead = _retry_log_rows(service.retry_log, event_id, site_id)
    entries, releases = _quarantine_entries(service.quarantine, event_id, site_id)
    return {
        "site_id": service.config.site_id,
        "event_id": event_id,
        "pending": jobs,
        "dlq": dead,
        "quarantine": entries,
        "released": releases,
    }


def _retry_log_rows(retry_log, event_id: str, site_id: str | None) -> tuple[list[dict], list[dict]]:
    """The retry log's rows for one event id (a body from another site is left out when `site_id` is given)."""
    held = retry_log.find(event_id, TRACE_MAX_ROWS)
    jobs = [
        (h.job_id, h.attempts, h.next_attempt_at, h.last_error, h.created_at, h.body)
        for h in held
        if h.state == "pending"
    ]
    dead = [(h.attempts, h.last_error, h.created_at, h.failed_at, h.body) for h in held if h.state == "dlq"]
    pending = [
        {
            "job_id": job_id,
            "attempts": attempts,
            "next_attempt_at": due,
            "last_error": error,
            "created_at": created,
            "site_id": _site_of(body),
        }
        for job_id, attempts, due, error, created, body in jobs
    ]
    letters = [
        {
            "attempts": attempts,
            "last_error": error,
            "created_at": created,
            "failed_at": failed,
            "site_id": _site_of(body),
        }
        for attempts, error, created, failed, body in dead
    ]
    if site_id is not None:
        pending = [j for j in pending if j["site_id"] in (site_id, None)]
        letters = [d for d in letters if d["site_id"] in (site_id, None)]
    return pending, letters


def _site_of(body: str) -> str | None:
    try:
        site = json.loads(body).get("site_id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return site if isinstance(site, str) else None


def _quarantine_entries(quarantine, event_id: str, site_id: str | None) -> tuple[list[dict], list[dict]]:
    """Quarantine entries whose payload carries the event id, newest first, read line by line across the
    rotated files; `match` says whether the payload is an envelope with that id or only mentions it."""
    from edge_bridge.quarantine import RELEASED_SUFFIX, entry_id, released_ids

    needle = event_id.encode("utf-8")
    released = released_ids(quarantine.path)
    files = [quarantine.path] + [
        quarantine.path.with_name(f"{quarantine.path.name}.{i}") for i in range(1, quarantine.keep_files + 1)
    ]
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
                payload = base64.b64decode(entry.get("payload_b64", ""))
            except (ValueError, TypeError, AttributeError):
                continue
            if needle not in payload and needle not in str(entry.get("detail", "")).encode("utf-8"):
                continue
            match, site = _payload_match(payload, event_id)
            if site_id is not None and site not in (site_id, None):
                continue
            found.append(
                {
                    "ref": f"{file.name}:{number}",
                    "quarantined_at": entry.get("quarantined_at"),
                    "reason": entry.get("reason"),
                    "detail": entry.get("detail"),
                    "topic": entry.get("topic"),
                    "site_id": site,
                    "match": match,
                    "released": entry_id(line) in released,
                }
            )
            if len(found) >= TRACE_MAX_ROWS:
                break
    releases: list[dict] = []
    try:
        for line in quarantine.path.with_name(quarantine.path.name + RELEASED_SUFFIX).read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("event_id") == event_id:
                releases.append(record)
    except (FileNotFoundError, ValueError):
        pass
    return found, releases[:TRACE_MAX_ROWS]


def _payload_match(payload: bytes, event_id: str) -> tuple[str, str | None]:
    """("envelope", site) when the payload is a JSON object with this event_id; ("mentions", site or None) otherwise."""
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return "mentions", None
    if not isinstance(body, dict):
        return "mentions", None
    site = body.get("site_id") if isinstance(body.get("site_id"), str) else None
    return ("envelope" if body.get("event_id") == event_id else "mentions"), site


_RELEASES = threading.Lock()  # one release at a time: its check and its record must not interleave


class AdminServer:
    def __init__(self, service: EdgeService, host: str, port: int, admin_token: str | None = None) -> None:
        token = admin_token if admin_token is not None else service.config.admin_token
        handler = type("AdminHandler", (_Handler,), {"service": service, "admin_token": token or None})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="admin-api", daemon=True)

    def start(self) -> AdminServer:
        self._thread.start()
        log.info("admin API on http://%s:%d", *self.httpd.server_address[:2])
        if not self.httpd.RequestHandlerClass.admin_token:
            log.warning("EDGE_ADMIN_TOKEN is not set: POST /events and /dlq/replay refuse every request")
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
