"""Edge benchmark (`make bench`): the bridge against a naive baseline and the two ceilings, on one broker and endpoint.

Prints: bridge events/s; naive baseline (one send_message per MQTT message, ack on receipt); ceiling 1,
a bare paho subscriber draining the same broker; ceiling 2, a bare loop sending pre-built 10-message
batches to the same SQS endpoint; events/s into the retry log during an outage (the service, and the
retry log alone); replay events/s; the service's peak RSS while 1,000,000 events pile up in its
retry log (and the retry log's alone), with the CPU each process used while the bridge ran. Targets (bridge ≥ 10×
naive and ≥ 0.7× the lower ceiling; ≥ 20,000/s into the retry log; RSS within +100 MB of idle) are
printed next to the figures, not asserted: speed is measured here, never in the default run.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devstack.processes import AwsEmulator, Mosquitto, aws_env, free_port
from devstack.tcp_proxy import TcpProxy
from tests.conftest import PROJECT_ROOT, EdgeProcess, wait_until
from tests.test_edge_faults import make_events

pytestmark = pytest.mark.benchmark

N = int(os.environ.get("EDGE_BENCH_EVENTS", "50000"))
N_NAIVE = int(os.environ.get("EDGE_BENCH_NAIVE_EVENTS", "3000"))
RSS_EVENTS = int(os.environ.get("EDGE_BENCH_RSS_EVENTS", "1000000"))
TOPIC = "sites/site-123/events/ajax/door_access"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("edge-bench")
    broker = Mosquitto(workdir / "mosquitto").start()
    emulator = AwsEmulator().start()
    saved = dict(os.environ)
    os.environ.update(aws_env(emulator.endpoint_url))
    from pipeline.provisioning import provision
    from pipeline.stack import aws_client

    provision()
    sqs = aws_client("sqs")
    lines = workdir / "events.jsonl"
    lines.write_text("\n".join(e.to_json() for e in make_events(N, payload_bytes=200)) + "\n")
    yield {"broker": broker, "aws": emulator, "sqs": sqs, "workdir": workdir, "lines": lines}
    os.environ.clear()
    os.environ.update(saved)
    emulator.stop()
    broker.stop()


def fresh_queue(stack, name: str) -> str:
    return stack["sqs"].create_queue(QueueName=name, Attributes={"MaximumMessageSize": "262144"})["QueueUrl"]


def depth(stack, url: str) -> int:
    attrs = stack["sqs"].get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def drop_session(port: int, client_id: str) -> None:
    """Discard a finished phase's persistent session: the broker would otherwise keep queueing a copy of
    every later phase's events for it (4 idle sessions x 1,000,000 events stalled Mosquitto)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.connect("127.0.0.1", port)
    client.disconnect()


def register_session(port: int, client_id: str) -> None:
    """Subscribe once with a persistent session, so the broker queues the backlog for `client_id`."""
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.on_connect = lambda c, *a: c.subscribe("sites/+/events/#", qos=1)
    client.on_subscribe = lambda *a: done.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert done.wait(10)
    client.disconnect()
    client.loop_stop()


PUBLISH_CHUNK = 10_000


def publish_lines(port: int, lines: Iterable[bytes]) -> None:
    """QoS 1 publishes through `mosquitto_pub -l`, 10,000 lines per run: Mosquitto 2.0.11's client
    exits at end of input with what it still queues unsent (200,000 lines in one run delivered 68,943)."""
    chunk: list[bytes] = []
    for line in itertools.chain(lines, [None]):
        if line is not None:
            chunk.append(line)
        if chunk and (line is None or len(chunk) == PUBLISH_CHUNK):
            subprocess.run(
                ["mosquitto_pub", "-p", str(port), "-t", TOPIC, "-q", "1", "-l"],
                input=b"\n".join(chunk) + b"\n",
                check=True,
                timeout=300,
            )
            chunk = []


def preload(stack, client_id: str, count: int | None = None, register: bool = True) -> None:
    if register:  # (never while the service is connected: the same client id would take its session over)
        register_session(stack["broker"].port, client_id)
    publish_lines(stack["broker"].port, stack["lines"].read_bytes().splitlines()[:count])


def synthetic_lines(count: int, tag: str = "rss") -> Iterator[bytes]:
    """`count` distinct envelopes (fresh event ids) without building a million models."""
    template = json.loads(make_events(1, payload_bytes=200)[0].to_json())
    for i in range(count):
        template["event_id"] = f"bench-{tag}-{i:012d}"
        yield json.dumps(template, separators=(",", ":")).encode()


def bare_subscriber_rate(stack) -> float:
    preload(stack, "bench-bare")
    got = 0
    done = threading.Event()
    started = time.perf_counter()

    def on_message(client, userdata, message):
        nonlocal got
        got += 1
        if got >= N:
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", clean_session=False)
    client.max_inflight_messages_set(1000)
    client.on_message = on_message
    client.connect("127.0.0.1", stack["broker"].port)
    client.loop_start()
    assert done.wait(300)
    elapsed = time.perf_counter() - started
    client.disconnect()
    client.loop_stop()
    drop_session(stack["broker"].port, "bench-bare")
    return N / elapsed


def bare_batch_sender_rate(stack) -> float:
    from edge_bridge.sqs_sender import sqs_client

    url = fresh_queue(stack, "bench-ceiling")
    sqs = sqs_client()
    bodies = stack["lines"].read_text().splitlines()
    batches = [[{"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies[s : s + 10])] for s in range(0, N, 10)]
    started = time.perf_counter()
    for entries in batches:
        sqs.send_message_batch(QueueUrl=url, Entries=entries)
    return N / (time.perf_counter() - started)


def naive_rate(stack) -> float:
    from edge_bridge.sqs_sender import sqs_client

    preload(stack, "bench-naive", N_NAIVE)
    url = fresh_queue(stack, "bench-naive")
    sqs = sqs_client()
    inbox: queue.Queue[bytes] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-naive", clean_session=False)
    client.on_message = lambda c, u, m: inbox.put(m.payload)  # acked on receipt by paho
    started = time.perf_counter()
    client.connect("127.0.0.1", stack["broker"].port)
    client.loop_start()
    for _ in range(N_NAIVE):
        sqs.send_message(QueueUrl=url, MessageBody=inbox.get(timeout=60).decode())
    elapsed = time.perf_counter() - started
    client.disconnect()
    client.loop_stop()
    drop_session(stack["broker"].port, "bench-naive")
    return N_NAIVE / elapsed


def start_edge(stack, client_id: str, queue_url: str, endpoint: str, **extra) -> EdgeProcess:
    env = {**os.environ, **aws_env(endpoint)}
    env.update(
        EDGE_MQTT_PORT=str(stack["broker"].port),
        EDGE_CLIENT_ID=client_id,
        EDGE_STATE_DIR=str(stack["workdir"] / client_id),
        EDGE_EVENTS_QUEUE_URL=queue_url,
        EDGE_ADMIN_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return EdgeProcess(stack["workdir"] / f"{client_id}-proc", env).start()


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def child_pids(pid: int) -> list[int]:
    return [
        int(p)
        for task in os.listdir(f"/proc/{pid}/task")
        for p in open(f"/proc/{pid}/task/{task}/children").read().split()
    ]


def bridge_rate(stack) -> tuple[float, dict[str, float], float]:
    """Events/s, and the CPU seconds each process on the box used while the bridge ran."""
    url = fresh_queue(stack, "bench-bridge")
    preload(stack, "bench-bridge")
    edge = start_edge(stack, "bench-bridge", url, stack["aws"].endpoint_url)
    try:
        # The clock starts when the service connects: a persistent session's backlog flows from the
        # CONNACK on, before the SUBACK, so waiting for "subscribed" would miss the first window.
        wait_until(lambda: "connected to MQTT" in edge.log(), 120, interval=0.005, message="the bridge to connect")
        pids = {
            "service": [edge.proc.pid],
            "sender processes": child_pids(edge.proc.pid),
            "SQS emulator": [stack["aws"].proc.pid],
            "broker": [stack["broker"].proc.pid],
            "benchmark": [os.getpid()],
        }
        before = {name: sum(map(cpu_seconds, group)) for name, group in pids.items()}
        started = time.perf_counter()
        wait_until(lambda: depth(stack, url) >= N, 600, interval=0.05, message="the bridge to deliver the backlog")
        elapsed = time.perf_counter() - started
        cpu = {name: sum(map(cpu_seconds, group)) - before[name] for name, group in pids.items()}
        return N / elapsed, cpu, elapsed
    finally:
        edge.stop()
        drop_session(stack["broker"].port, "bench-bridge")


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def outage_and_replay_rates(stack) -> tuple[float, float]:
    from edge_bridge.cli import AdminClient

    url = fresh_queue(stack, "bench-outage")
    proxy = TcpProxy(stack["aws"].port)  # closed: SQS is cut from the start
    preload(stack, "bench-outage")
    edge = start_edge(stack, "bench-outage", url, proxy.url)
    admin = AdminClient(edge.admin_url)
    try:
        # As for the bridge, the clock starts at the CONNACK: the backlog flows into the retry log from there.
        wait_until(lambda: "connected to MQTT" in edge.log(), 120, interval=0.005, message="the service to connect")
        started = time.perf_counter()
        wait_until(
            lambda: admin.status()["jobs_pending"] >= N, 600, interval=0.05, message="the backlog in the retry log"
        )
        into_log = N / (time.perf_counter() - started)
        proxy.open()
        started = time.perf_counter()
        wait_until(
            lambda: admin.status()["jobs_pending"] == 0, 600, interval=0.05, message="the replay to drain the retry log"
        )
        replay = N / (time.perf_counter() - started)
        assert depth(stack, url) >= N
    finally:
        edge.stop()
        proxy.cut()
        drop_session(stack["broker"].port, "bench-outage")
    return into_log, replay


def service_rss_with_buffered(stack, count: int) -> dict:
    """The service's RSS, idle and at its peak, while SQS is cut and `count` events pile up in its retry log."""
    from edge_bridge.cli import AdminClient

    proxy = TcpProxy(stack["aws"].port).open()
    url = fresh_queue(stack, "bench-rss")
    edge = start_edge(stack, "bench-rss", url, proxy.url).wait_subscribed()
    admin = AdminClient(edge.admin_url)
    try:
        # "Idle" is a service that has been at work and is idle again: 2,000 events delivered, none pending.
        publish_lines(stack["broker"].port, synthetic_lines(2000, tag="warm-up"))
        wait_until(lambda: depth(stack, url) >= 2000, 120, interval=0.1, message="the warm-up events in SQS")
        idle = rss_kb(edge.proc.pid)
        proxy.cut()
        started = time.perf_counter()
        publish_lines(stack["broker"].port, synthetic_lines(count))
        wait_until(
            lambda: admin.status()["jobs_pending"] >= count,
            1200,
            interval=0.5,
            message=f"{count} events in the retry log",
        )
        status = admin.status()
        return {
            "idle_kb": idle,
            "peak_kb": rss_kb(edge.proc.pid, "VmHWM"),
            "rate": count / (time.perf_counter() - started),
            "pending": status["jobs_pending"],
            "bytes": status["retry_log_bytes"],
        }
    finally:
        edge.stop()
        proxy.cut()
        drop_session(stack["broker"].port, "bench-rss")


RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, pathlib, tempfile
    import edge_bridge.service  # the service's libraries loaded, as in the real process
    from edge_bridge.retry_log import RetryLog
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    n, body = int(sys.argv[1]), sys.argv[2]
    log = RetryLog(pathlib.Path(tempfile.mkdtemp()) / "retry_log.duckdb")
    idle = rss("VmRSS")
    started = time.perf_counter()
    for start in range(0, n, 1000):
        log.add([(f"e-{i}", body, "SQS unreachable") for i in range(start, min(n, start + 1000))])
    elapsed = time.perf_counter() - started
    print(json.dumps({"idle_kb": idle, "peak_kb": rss("VmHWM"), "rate": n / elapsed, "pending": log.pending, "bytes": log.size_bytes()}))
    """
)


def retry_log_alone(stack) -> dict:
    body = stack["lines"].read_text().splitlines()[0]
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(RSS_EVENTS), body],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(1800)
def test_edge_throughput_and_memory_figures(stack):
    subscriber = bare_subscriber_rate(stack)
    batches = bare_batch_sender_rate(stack)
    naive = naive_rate(stack)
    bridge, cpu, bridge_s = bridge_rate(stack)
    into_log, replay = outage_and_replay_rates(stack)
    alone = retry_log_alone(stack)
    buffered = service_rss_with_buffered(stack, RSS_EVENTS)
    lower = min(subscriber, batches)
    print(
        f"""
edge benchmark ({N} events of ~{len(stack["lines"].read_text().splitlines()[0])} bytes; naive on {N_NAIVE}; one broker, one endpoint)
  ceiling: bare paho subscriber drain      {subscriber:10.0f} events/s
  ceiling: bare 10-message batch sender    {batches:10.0f} events/s
  naive baseline (send_message, ack first) {naive:10.0f} events/s
  bridge (edge service, MQTT -> SQS)       {bridge:10.0f} events/s   = {bridge / naive:5.1f}x naive (target >= 10x), {bridge / lower:4.2f}x lower ceiling (target >= 0.7x)
  CPU while the bridge ran ({bridge_s:.1f} s x {os.cpu_count()} cores): {", ".join(f"{k} {v:.2f} s" for k, v in cpu.items())} = {sum(cpu.values()) / (bridge_s * os.cpu_count()):.0%} busy
  into the retry log, SQS cut (service)    {into_log:10.0f} events/s   (target >= 20000)
  into the retry log while publishing 1M   {buffered["rate"]:10.0f} events/s
  into the retry log alone (1000/commit)   {alone["rate"]:10.0f} events/s
  replay from the retry log to SQS         {replay:10.0f} events/s
  service RSS with {buffered["pending"]} buffered: idle (after 2,000 delivered) {buffered["idle_kb"] / 1024:.0f} MB, peak {buffered["peak_kb"] / 1024:.0f} MB (+{(buffered["peak_kb"] - buffered["idle_kb"]) / 1024:.0f} MB, target <= +100 MB), retry log {buffered["bytes"] / 1e6:.0f} MB
  retry log alone with {alone["pending"]} buffered: RSS idle {alone["idle_kb"] / 1024:.0f} MB, peak {alone["peak_kb"] / 1024:.0f} MB (+{(alone["peak_kb"] - alone["idle_kb"]) / 1024:.0f} MB)
"""
    )
    assert alone["pending"] == RSS_EVENTS
    assert buffered["pending"] == RSS_EVENTS


# --- alarms first after an outage ---------------------------------------------------------------------

RECOVERY_EVENTS = int(os.environ.get("EDGE_BENCH_RECOVERY_EVENTS", "1000000"))
RECOVERY_ALARMS = int(os.environ.get("EDGE_BENCH_RECOVERY_ALARMS", "100"))


def outage_lines(count: int, alarms: int, tag: str) -> Iterator[bytes]:
    """`count` envelopes of one site, every (count / alarms)-th an intrusion alarm, the last one included."""
    template = json.loads(make_events(1, payload_bytes=200)[0].to_json())
    every = count // alarms
    for i in range(count):
        template["event_id"] = f"bench-{tag}-{i:012d}"
        template["event_type"] = "intrusion_alert" if i % every == every - 1 else "door_access"
        yield json.dumps(template, separators=(",", ":")).encode()


def consumer_handled_high(port: int) -> float:
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except requests.RequestException:
        return -1
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "priority_events_handled"
        for s in f.samples
        if s.name.endswith("_total") and s.labels.get("priority") == "high"
    )


def alarm_recovery(stack, order: str) -> dict:
    """Buffer RECOVERY_EVENTS (alarms among them) with SQS cut, bring SQS back, and time each alarm from
    the recovery to its commit by the priority consumer (edge express lane -> cloud express lane -> high queue)."""
    import duckdb
    import yaml

    from devstack.processes import stop_process
    from edge_bridge.cli import AdminClient
    from pipeline.routing.config import load_routing_config
    from pipeline.routing.express import ExpressLane, provision_express_queue
    from pipeline.routing.provisioning import provision_routing

    tag, sqs = f"rec-{order}", stack["sqs"]
    workdir = stack["workdir"] / tag
    workdir.mkdir()
    events_url, express_url = fresh_queue(stack, f"{tag}-events"), provision_express_queue(sqs, f"{tag}-express")
    routing_path = workdir / "routing.yaml"
    routing_path.write_text(
        yaml.safe_dump({"partners": [], "priority": {"queues": {p: f"{tag}-{p}" for p in ("high", "medium", "low")}}})
    )
    routing = load_routing_config(routing_path)
    provision_routing(sqs, routing)
    port, db = free_port(), workdir / "consumer.duckdb"
    consumer_env = {
        **os.environ,
        "PIPELINE_ROUTING_CONFIG": str(routing_path),
        "PIPELINE_CONSUMER_DB": str(db),
        "PIPELINE_CONSUMER_METRICS_PORT": str(port),
        "PIPELINE_ARCHIVE_BUCKET": "",
    }
    consumer = subprocess.Popen(
        [sys.executable, "-m", "pipeline.consumers"],
        cwd=PROJECT_ROOT,
        env=consumer_env,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "consumer.log", "wb"),
        start_new_session=True,
    )
    lane = ExpressLane(sqs, lambda: routing, express_url, lambda name: sqs.get_queue_url(QueueName=name)["QueueUrl"])
    stop = threading.Event()
    lane_thread = threading.Thread(target=lane.run, args=(3600, stop), kwargs={"wait_time_s": 1}, daemon=True)
    lane_thread.start()
    proxy = TcpProxy(stack["aws"].port)  # closed: SQS is cut from the start
    edge = start_edge(
        stack, f"bench-{tag}", events_url, proxy.url, EDGE_EXPRESS_QUEUE_URL=express_url, EDGE_RETRY_ORDER=order
    ).wait_subscribed()
    admin = AdminClient(edge.admin_url)
    try:
        publish_lines(stack["broker"].port, outage_lines(RECOVERY_EVENTS, RECOVERY_ALARMS, tag))
        wait_until(
            lambda: admin.status()["jobs_pending"] >= RECOVERY_EVENTS,
            1200,
            interval=0.5,
            message=f"{RECOVERY_EVENTS} events in the retry log",
        )
        wait_until(lambda: consumer_handled_high(port) == 0, 60, message="the priority consumer up")
        recovered = time.time()
        proxy.open()
        wait_until(
            lambda: consumer_handled_high(port) >= RECOVERY_ALARMS,
            1200,
            interval=0.1,
            message="every buffered alarm handled",
        )
        alarms_done = time.time() - recovered
        still_pending = admin.status()["jobs_pending"]
    finally:
        edge.stop()
        proxy.cut()
        stop.set()
        lane_thread.join(30)
        stop_process(consumer, timeout=60)
        drop_session(stack["broker"].port, f"bench-{tag}")
    with duckdb.connect(str(db), read_only=True) as con:
        handled_at = [
            epoch_ms / 1000
            for (epoch_ms,) in con.sql(
                "SELECT epoch_ms(handled_at) FROM events WHERE event_type = 'intrusion_alert'"
            ).fetchall()
        ]
    return {
        "latency_s": [at - recovered for at in handled_at],
        "alarms_done_s": alarms_done,
        "still_pending": still_pending,
    }


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


@pytest.mark.timeout(2400)
def test_alarms_buffered_in_an_outage_are_replayed_before_the_backlog(stack):
    fifo = alarm_recovery(stack, "fifo")
    first = alarm_recovery(stack, "priority")
    print(
        f"""
alarms first after an outage ({RECOVERY_EVENTS:,} events buffered with SQS cut, {RECOVERY_ALARMS} intrusion alarms among them, the newest one last;
recovery = the SQS link back; handled = committed by the priority consumer, through the edge's and the cloud's express lanes)
                                      recovery -> handled, s:  p50      p99      newest   (all alarms handled after; events still in the retry log then)
  FIFO replay (the landed order)                          {percentile(fifo["latency_s"], 50):8.2f} {percentile(fifo["latency_s"], 99):8.2f} {max(fifo["latency_s"]):8.2f}   ({fifo["alarms_done_s"]:.1f} s; {fifo["still_pending"]:,} pending)
  priority replay (high first, EDGE_RETRY_ORDER=priority) {percentile(first["latency_s"], 50):8.2f} {percentile(first["latency_s"], 99):8.2f} {max(first["latency_s"]):8.2f}   ({first["alarms_done_s"]:.1f} s; {first["still_pending"]:,} pending)   target: within seconds
"""
    )
    assert len(fifo["latency_s"]) == len(first["latency_s"]) == RECOVERY_ALARMS
