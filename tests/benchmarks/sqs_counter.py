"""An HTTP proxy in front of the local SQS + S3 endpoint that counts every SQS call it forwards.

SQS bills per call, and the processes whose calls a benchmark wants to count (an edge service, the Dagster
daemon's runs) are not the benchmark's own, so a botocore hook cannot see them. Pointed at this proxy
(`AWS_ENDPOINT_URL`), their calls are counted by operation (the `X-Amz-Target` of SQS's JSON protocol),
queue (`QueueUrl` or `QueueName` in the body) and the caller's app id (`app/<id>` in the User-Agent, as
botocore's `user_agent_appid` sets it). S3 requests pass through uncounted.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
REPLACED = HOP_BY_HOP | {"content-length"}  # set again from the body as forwarded
APP_ID = re.compile(r"\bapp/(\S+)")


class SqsCallCounter:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.counts: Counter[tuple[str, str, str]] = Counter()  # (operation, queue, app id) -> calls
        self._lock = threading.Lock()
        self._local = threading.local()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> SqsCallCounter:
        counter = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_any(self) -> None:
                counter._forward(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_any

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # a caller that hung up (a stopped process mid long poll): nothing to forward to

        self._server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="sqs-call-counter", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def reset(self) -> Counter:
        with self._lock:
            counts, self.counts = self.counts, Counter()
        return counts

    def _connection(self) -> http.client.HTTPConnection:
        if getattr(self._local, "conn", None) is None:
            self._local.conn = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=60)
        return self._local.conn

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        body = _read_body(handler)
        target = handler.headers.get("X-Amz-Target", "")
        if target.startswith("AmazonSQS."):
            self._count(target.split(".", 1)[1], body, handler.headers.get("User-Agent", ""))
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in REPLACED}
        headers["Content-Length"] = str(len(body))
        for attempt in range(2):
            conn = self._connection()
            try:
                conn.request(handler.command, handler.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        handler.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP and (key.lower() != "content-length" or handler.command == "HEAD"):
                handler.send_header(key, value)
        if handler.command != "HEAD":
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    def _count(self, operation: str, body: bytes, user_agent: str) -> None:
        try:
            params = json.loads(body or b"{}")
            queue = (params.get("QueueUrl") or params.get("QueueName") or "").rsplit("/", 1)[-1]
        except ValueError:
            queue = "?"
        app = APP_ID.search(user_agent)
        with self._lock:
            self.counts[(operation, queue, app.group(1) if app else "")] += 1


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                handler.rfile.readline()
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""
