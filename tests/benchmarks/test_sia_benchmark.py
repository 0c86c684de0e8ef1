"""SIA ingress benchmark (`make bench`): frames/s from Ajax-like hubs into the site broker, each one ACKed only
after the broker acknowledged it, next to a bare baseline (the same hub clients against a server that ACKs
every frame at once) in the same run.

Each hub is a TCP connection that sends a frame and waits for its answer before the next one, as a hub
does; the figures are for one hub and for several side by side (plain and AES-encrypted frames). The
ingress runs in its own process with the real forwarder, publishing to a private Mosquitto; the rate
counts a frame once it was ACKed, and the run ends when the broker has delivered every one to a
subscriber. Figures are printed, not asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from devstack.processes import Mosquitto, free_port, stop_process
from edge_bridge.ingress.sia import HubConnection, build_frame, response_kind
from tests.conftest import PROJECT_ROOT, wait_until
from tests.helpers.forwarder import SiteSubscriber
from tests.helpers.sia import FORWARDER_PROCESS, KEY

pytestmark = pytest.mark.benchmark

FRAMES = int(os.environ.get("SIA_BENCH_FRAMES", "3000"))  # per run, shared by its hubs
HUBS = int(os.environ.get("SIA_BENCH_HUBS", "8"))
SITE = "site-bench"

BARE_SERVER = textwrap.dedent(
    """
    import os, socket, threading
    ACK = b'\\n5A3D0011"ACK"0001L0#AAA[]\\r'

    def serve(conn):
        buffer = b""
        while True:
            chunk = conn.recv(4096)
            if not chunk:
                return
            buffer += chunk
            frames = buffer.count(b"\\r")
            buffer = buffer[buffer.rfind(b"\\r") + 1 :] if frames else buffer
            if frames:
                conn.sendall(ACK * frames)

    listener = socket.create_server(("127.0.0.1", int(os.environ["PORT"])), reuse_port=False)
    print("READY", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
    """
)


def run_hubs(port: int, accounts: list[str], frames_each: int, key: str | None, seq_base: int) -> tuple[int, float]:
    """Every hub sends `frames_each` frames, one at a time, each waiting for its ACK; (acked, seconds)."""
    acked = [0] * len(accounts)
    start_gate = threading.Barrier(len(accounts) + 1)

    def hub(i: int, account: str) -> None:
        with HubConnection("127.0.0.1", port, timeout=30) as conn:
            start_gate.wait()
            for n in range(frames_each):
                answer = conn.send(build_frame(account, "BA", zone=n % 50 + 1, seq=seq_base + n, key=key))
                acked[i] += response_kind(answer or b"") == "ACK"

    threads = [threading.Thread(target=hub, args=(i, a)) for i, a in enumerate(accounts)]
    for t in threads:
        t.start()
    start_gate.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return sum(acked), time.perf_counter() - started


def start_process(code: str, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env={
            **os.environ,
            **env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        },
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    assert proc.stdout.readline().strip() == "READY"
    return proc


def test_sia_ingress_rate_into_the_site_broker_next_to_a_bare_acking_server(tmp_path):
    broker = Mosquitto(tmp_path / "mosquitto").start()
    plain, encrypted = [f"B{i:03X}" for i in range(HUBS)], [f"C{i:03X}" for i in range(HUBS)]
    sia_port, bare_port = free_port(), free_port()
    ingress = start_process(
        FORWARDER_PROCESS,
        {
            "SITE": SITE,
            "MQTT_PORT": str(broker.port),
            "STATE_DIR": str(tmp_path / "state"),
            "FORWARDER_SIA_PORT": str(sia_port),
            "FORWARDER_SIA_ACCOUNTS": ",".join(plain + [f"{a}={KEY}" for a in encrypted]),
        },
    )
    bare = start_process(BARE_SERVER, {"PORT": str(bare_port)})
    subscriber = SiteSubscriber(broker.port, client_id="sia-bench-subscriber")
    rows, seq_base = [], 1
    try:
        for label, port, hubs, key in [
            ("bare server, 1 hub", bare_port, plain[:1], None),
            ("SIA ingress, 1 hub", sia_port, plain[:1], None),
            (f"bare server, {HUBS} hubs", bare_port, plain, None),
            (f"SIA ingress, {HUBS} hubs", sia_port, plain, None),
            (f"SIA ingress, {HUBS} hubs, AES", sia_port, encrypted, KEY),
        ]:
            each = max(1, min(FRAMES // len(hubs), 9000))
            before = len(subscriber.messages)
            acked, seconds = run_hubs(port, hubs, each, key, seq_base)
            seq_base += each
            arrived = ""
            if port == sia_port:
                wait_until(
                    lambda before=before, acked=acked: len(subscriber.messages) - before >= acked,
                    60,
                    message="every ACKed frame at the broker",
                )
                arrived = f"{len(subscriber.messages) - before} at the broker"
            rows.append((label, acked, seconds, arrived))
    finally:
        subscriber.close()
        stop_process(ingress)
        stop_process(bare)
        broker.stop()
    print(
        "\nSIA DC-09 ingress (each frame ACKed only after the site broker's PUBACK) vs a bare server that ACKs at once"
    )
    bare_rate = {}
    for label, acked, seconds, arrived in rows:
        rate, hubs = acked / seconds, label.split(", ")[1]
        if label.startswith("bare"):
            bare_rate[hubs] = rate
        share = f"({rate / bare_rate[hubs]:.0%} of bare)" if not label.startswith("bare") and hubs in bare_rate else ""
        print(f"  {label:<28} {acked:>6} frames ACKed in {seconds:6.2f} s = {rate:7.0f} frames/s {share:<15} {arrived}")
