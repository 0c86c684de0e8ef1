"""A partner's webhook endpoint, as a partner would write one: verify, de-duplicate, record.

It verifies every request with the `standardwebhooks` library (independent of our signing code),
keeps each webhook-id once (with the exact bytes it got and the `X-Contract-Version` it was sent under,
so a test can compare them with the delivery audit), and can be told to fail (`fail_first` answers 500 that many times, then
recovers; `always_fail`) or to answer with a body that never ends (`stream_body`), as a hostile or
broken partner might. The demo runs it as a process that prints what it got; tests run it in a
thread and look at what it recorded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError

log = logging.getLogger(__name__)


@dataclass
class Request:
    at: float  # time.time()
    webhook_id: str | None
    status: int
    verified: bool
    contract_version: str | None = None  # the X-Contract-Version header


@dataclass
class PartnerReceiver:
    secret: str
    fail_first: int = 0
    always_fail: bool = False
    port: int = 0
    requests: list[Request] = field(default_factory=list)
    accepted: dict[str, dict] = field(default_factory=dict)  # webhook-id -> body: the side effect, once per event
    raw: dict[str, bytes] = field(default_factory=dict)  # webhook-id -> the exact bytes of the body it accepted
    duplicates: int = 0
    rejected_signatures: int = 0
    echo: bool = False
    stream_body: tuple[int, float] | None = (
        None  # (bytes, seconds): after the status, that many bytes per interval, until the caller hangs up
    )
    streamed_bytes: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._webhook = Webhook(self.secret)
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            webhook_id, contract = headers.get("webhook-id"), headers.get("x-contract-version")
            try:
                data = self._webhook.verify(body, headers)
            except WebhookVerificationError:
                self.rejected_signatures += 1
                self.requests.append(Request(time.time(), webhook_id, 401, False, contract))
                return 401
            if self.always_fail or self.fail_first > 0:
                self.fail_first -= 1
                self.requests.append(Request(time.time(), webhook_id, 500, True, contract))
                return 500
            if webhook_id in self.accepted:
                self.duplicates += 1
            else:
                self.accepted[webhook_id], self.raw[webhook_id] = data, bytes(body)
                if self.echo:
                    print(
                        f"partner received {webhook_id} (contract {contract}): {json.dumps(data, sort_keys=True)}",
                        flush=True,
                    )
            self.requests.append(Request(time.time(), webhook_id, 200, True, contract))
            return 200

    def _stream(self, out, give_up_after_s: float = 60.0) -> None:
        size, interval = self.stream_body
        chunk, deadline = b"x" * size, time.monotonic() + give_up_after_s
        try:
            while time.monotonic() < deadline and self._server is not None:
                out.write(chunk)
                out.flush()
                with self._lock:
                    self.streamed_bytes += size
                if interval:
                    time.sleep(interval)
        except OSError:
            pass  # the caller stopped reading and closed the connection

    def attempts_for(self, webhook_id: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.webhook_id == webhook_id]

    def start(self) -> PartnerReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status = receiver.handle({k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(status)
                if receiver.stream_body:
                    self.end_headers()
                    receiver._stream(self.wfile)
                    return
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            server, self._server = self._server, None
            server.shutdown()
            server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--secret-env", default="PARTNER_SECURITY_MONITORING_SECRET")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    secret = os.environ.get(args.secret_env)
    if not secret:
        raise SystemExit(f"{args.secret_env} is not set")
    receiver = PartnerReceiver(secret=secret, port=args.port, echo=True).start()
    print(f"partner receiver listening on {receiver.url}, verifying with ${args.secret_env}", flush=True)
    stop = threading.Event()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    receiver.stop()


if __name__ == "__main__":
    main()
