"""Ingress benchmark (`make bench`): events/s into the site broker through the forwarder service's ZigBee, NVR
and door-access ingresses, each message answered only after the site broker's PUBACK, next to a bare baseline
for the same protocol in the same run:

- ZigBee: zigbee2mqtt's QoS 1 messages relayed to the site topics by the forwarder (manual acks, adapter,
  envelope) vs a bare paho relay (auto-ack, republish as is, no wait);
- NVR / door webhooks: HTTP clients each posting one request at a time (keep-alive) to the forwarder vs a
  bare HTTP server answering 200 at once.

The forwarder runs as `python -m edge_bridge.forwarder`, each baseline in a process of its own, all on one
private Mosquitto. A rate counts a message once it is at a subscriber of the site broker (ZigBee) or answered
200 and then found at the broker (HTTP). Figures are printed, not asserted.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from devstack.processes import Mosquitto, free_port, stop_process
from edge_bridge.adapters import nvr
from edge_bridge.ingress.http import IDP_PATH, NVR_PATH, sign
from tests.conftest import PROJECT_ROOT, wait_until
from tests.helpers.forwarder import ForwarderProcess, SiteSubscriber, forwarder_env

pytestmark = pytest.mark.benchmark

ZIGBEE_MESSAGES = int(os.environ.get("INGRESS_BENCH_ZIGBEE", "20000"))
HTTP_REQUESTS = int(os.environ.get("INGRESS_BENCH_HTTP", "3000"))  # per run, shared by its clients
CLIENTS = int(os.environ.get("INGRESS_BENCH_CLIENTS", "8"))
SITE = "site-bench"
SECRET = "bench-door-secret"

BARE_RELAY = textwrap.dedent(
    """
    import os, threading
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    out = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bare-relay-out")
    out.max_inflight_messages_set(1000); out.max_queued_messages_set(0)
    out.connect("127.0.0.1", int(os.environ["PORT"])); out.loop_start()
    inn = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bare-relay-in", clean_session=False)
    ready = threading.Event()
    inn.on_connect = lambda c, *a: c.subscribe("bare/#", qos=1)
    inn.on_subscribe = lambda *a: ready.set()
    inn.on_message = lambda c, u, m: out.publish("sites/bare/events/zigbee/relay", m.payload, qos=1)
    inn.connect("127.0.0.1", int(os.environ["PORT"])); inn.loop_start()
    ready.wait(10)
    print("READY", flush=True)
    threading.Event().wait()
    """
)

BARE_HTTP = textwrap.dedent(
    """
    import os, socket
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def setup(self):
            super().setup(); self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        def log_message(self, *a): pass
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"{}")

    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    server.daemon_threads = True
    print("READY", flush=True)
    server.serve_forever()
    """
)


def start_process(code: str, env: dict[str, str]) -> subprocess.Popen:
    env = {
        **os.environ,
        **env,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    assert proc.stdout.readline().strip() == "READY"
    return proc


def zigbee_run(broker_port: int, base: str, subscriber: SiteSubscriber, count: int, prefix: str) -> tuple[int, float]:
    """zigbee2mqtt publishes `count` states at QoS 1 as fast as its broker takes them (`mosquitto_pub -l`, a
    process of its own, so the figure is not a Python publisher's); the time until the site broker's
    subscriber has every one."""
    lines = "".join(
        json.dumps({"contact": n % 2 == 0, "battery": 90, "linkquality": 100, "seq": f"{prefix}-{n}"}) + "\n"
        for n in range(count)
    )
    before = len(subscriber.snapshot())
    started = time.perf_counter()
    pub = subprocess.run(
        ["mosquitto_pub", "-p", str(broker_port), "-q", "1", "-l", "-t", f"{base}/door_1", "-i", f"bench-pub-{prefix}"],
        input=lines.encode(),
        timeout=300,
    )
    assert pub.returncode == 0
    wait_until(
        lambda: len(subscriber.snapshot()) - before >= count,
        300,
        interval=0.02,
        message=f"{count} relayed messages at the site broker",
    )
    return count, time.perf_counter() - started


def http_run(port: int, path: str, bodies, clients: int, total: int) -> tuple[int, float]:
    """`clients` keep-alive connections, each posting one body at a time and waiting for its answer; (200s, seconds)."""
    each = max(1, total // clients)
    ok = [0] * clients
    gate = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        gate.wait()
        for n in range(each):
            body, headers = bodies(f"c{i}-{n}")
            conn.request("POST", path, body=body, headers=headers)
            answer = conn.getresponse()
            answer.read()
            ok[i] += answer.status == 200
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    gate.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return sum(ok), time.perf_counter() - started


def nvr_body(ident: str) -> tuple[bytes, dict]:
    alert = {
        "ipAddress": "10.0.3.21",
        "macAddress": "44:19:b6:0a:11:02",
        "channelID": 4,
        "dateTime": "2024-01-15T11:30:00+01:00",
        "activePostCount": 1,
        "eventType": "VMD",
        "eventState": "active",
        "eventDescription": ident,
    }
    return nvr.to_xml(alert), {"Content-Type": "application/xml"}


def idp_body(ident: str) -> tuple[bytes, dict]:
    body = json.dumps(
        {
            "eventId": ident,
            "occurredAt": "2024-01-15T10:30:00Z",
            "door": {"id": "door-1"},
            "credential": {"type": "card", "id": "card-1"},
            "decision": "granted",
        }
    ).encode()
    return body, {"Content-Type": "application/json", "X-Signature": sign(SECRET, body)}


def test_each_ingress_rate_into_the_site_broker_next_to_a_bare_baseline_for_its_protocol(tmp_path):
    broker = Mosquitto(tmp_path / "mosquitto").start()
    http_port, bare_port = free_port(), free_port()
    env = forwarder_env(
        SITE,
        broker.port,
        tmp_path / "state",
        http_port,
        FORWARDER_INGRESSES="zigbee,nvr,idp",
        FORWARDER_ZIGBEE_BASE_TOPIC="zigbee2mqtt",
        FORWARDER_IDP_SECRET=SECRET,
    )
    forwarder = ForwarderProcess(env, tmp_path / "forwarder.log").start()
    relay = start_process(BARE_RELAY, {"PORT": str(broker.port)})
    bare_http = start_process(BARE_HTTP, {"PORT": str(bare_port)})
    subscriber = SiteSubscriber(broker.port, client_id="ingress-bench-subscriber")
    rows = []
    try:
        rows.append(
            ("ZigBee", "bare paho relay", *zigbee_run(broker.port, "bare", subscriber, ZIGBEE_MESSAGES, "bare"), "")
        )
        rows.append(
            (
                "ZigBee",
                "forwarder (manual ack)",
                *zigbee_run(broker.port, "zigbee2mqtt", subscriber, ZIGBEE_MESSAGES, "fwd"),
                "",
            )
        )
        for family, path, bodies in (("NVR", NVR_PATH, nvr_body), ("IDP", IDP_PATH, idp_body)):
            for clients in (1, CLIENTS):
                total = HTTP_REQUESTS if clients > 1 else HTTP_REQUESTS // 3
                rows.append(
                    (
                        family,
                        f"bare 200 server, {clients} client(s)",
                        *http_run(bare_port, path, bodies, clients, total),
                        "",
                    )
                )
                before = len(subscriber.snapshot())
                ok, seconds = http_run(http_port, path, bodies, clients, total)
                wait_until(
                    lambda before=before, ok=ok: len(subscriber.snapshot()) - before >= ok,
                    60,
                    message="every answered request at the broker",
                )
                rows.append(
                    (
                        family,
                        f"forwarder, {clients} client(s)",
                        ok,
                        seconds,
                        f"{len(subscriber.snapshot()) - before} at the broker",
                    )
                )
    finally:
        subscriber.close()
        forwarder.stop()
        stop_process(relay)
        stop_process(bare_http)
        broker.stop()
    print(
        "\nIngresses: events/s into the site broker, each answered only after its PUBACK, next to a bare baseline (same run)"
    )
    baseline = None
    for family, label, count, seconds, note in rows:
        rate = count / seconds
        if label.startswith("bare"):
            baseline = rate
            share = ""
        else:
            share = f"({rate / baseline:.0%} of bare)"
        print(f"  {family:<6} {label:<34} {count:>6} in {seconds:6.2f} s = {rate:7.0f}/s {share:<15} {note}")
