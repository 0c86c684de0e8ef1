"""`make demo`: the whole system on local stand-ins, in the foreground until Ctrl-C.

Starts Mosquitto, the local SQS + S3 endpoint (provisioned from config/stack.yaml), the edge service,
a traffic source, and the Dagster webserver + daemon. Every child runs in its own process group and
is recorded in .demo/pids.json, so Ctrl-C here or `make demo-stop` elsewhere leaves nothing behind.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import requests

from devstack.processes import (
    AwsEmulator,
    Mosquitto,
    MqttUser,
    Prometheus,
    Pushgateway,
    aws_env,
    free_port,
    stop_process,
    wait_for_port,
)
from devstack.traffic import SiteTraffic

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("DEMO_STATE_DIR", ROOT / ".demo"))
PIDS = STATE / "pids.json"
log = logging.getLogger("demo")
DEMO_SITES = ["site-001", "site-002", "site-003"]
# Every schedule and sensor of every code location, as the Dagster instance has them (on/off, next tick).
INSTIGATORS_QUERY = """{ repositoriesOrError { ... on RepositoryConnection { nodes {
  schedules { name executionTimezone scheduleState { status nextTick { timestamp } } }
  sensors { name sensorState { status } } } } } }"""


def _port(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _port_or_free(name: str, default: int) -> int:
    """The env var's port, else the usual one, else any free port: a second stack must not fail to start."""
    if name in os.environ:
        return int(os.environ[name])
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", default))
            return default
        except OSError:
            return free_port()


def _next_tick(schedule: dict) -> float:
    """Sort key: the soonest tick first, schedules that are off ahead of all (they need someone)."""
    tick = schedule["scheduleState"]["nextTick"] if schedule["scheduleState"]["status"] == "RUNNING" else None
    return tick["timestamp"] if tick else 0.0


def _demo_running(pid: int) -> bool:
    """The recorded demo process still runs (and the pid was not reused by something else)."""
    try:
        return b"devstack.demo" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Demo:
    def __init__(self) -> None:
        self.mqtt_port = _port("DEMO_MQTT_PORT", 1883)
        self.aws_port = _port("DEMO_AWS_PORT", 4566)
        self.dagster_port = _port("DEMO_DAGSTER_PORT", 3000)
        self.prometheus_port = _port_or_free("DEMO_PROMETHEUS_PORT", 9090)
        self.pushgateway_port = _port_or_free("DEMO_PUSHGATEWAY_PORT", 9091)
        self.edge_admin_port = _port_or_free("DEMO_EDGE_ADMIN_PORT", 9108)
        self.consumer_metrics_port = _port_or_free("DEMO_CONSUMER_METRICS_PORT", 9102)
        self.dagster_home = Path(os.environ.get("DAGSTER_HOME", ROOT / ".dagster_home"))
        self.children: dict[str, subprocess.Popen] = {}
        self.mosquitto: Mosquitto | None = None
        self.aws: AwsEmulator | None = None
        self.pushgateway: Pushgateway | None = None
        self.prometheus: Prometheus | None = None
        self.stopping = threading.Event()

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(aws_env(self.aws.endpoint_url))
        env.update(
            DAGSTER_HOME=str(self.dagster_home),
            PIPELINE_EVENTS_QUEUE="events",
            PIPELINE_EXPRESS_QUEUE="events-express",  # the express lane: alarms to the consumer and partners within a second
            PIPELINE_ARCHIVE_BUCKET="events-archive",
            PIPELINE_PUSHGATEWAY_URL=self.pushgateway.url if self.pushgateway else "",
            PIPELINE_CONSUMER_METRICS_PORT=str(self.consumer_metrics_port),
            EDGE_MQTT_HOST="127.0.0.1",
            EDGE_MQTT_PORT=str(self.mqtt_port),
            PYTHONUNBUFFERED="1",
            # The venv's tools (dbt, which `dagster dev` runs to parse the dbt project) as if activated.
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        )
        return env

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        logfile = open(STATE / f"{name}.log", "ab")
        proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.children[name] = proc
        self._record()
        log.info("started %-14s pid %-7d log %s", name, proc.pid, STATE / f"{name}.log")
        return proc

    def _record(self) -> None:
        pids = {name: p.pid for name, p in self.children.items()}
        if self.mosquitto and self.mosquitto.proc:
            pids["mosquitto"] = self.mosquitto.proc.pid
        if self.aws and self.aws.proc:
            pids["aws-emulator"] = self.aws.proc.pid
        for name, part in (("pushgateway", self.pushgateway), ("prometheus", self.prometheus)):
            if part and part.proc:
                pids[name] = part.proc.pid
        PIDS.write_text(json.dumps({"demo": os.getpid(), "children": pids}, indent=2))

    def fresh_dagster_home(self) -> None:
        """Empty Dagster's storage, as the emulator's queues and buckets start empty at every demo.

        Run history, sensor cursors and partitions of an earlier demo would describe data that no longer
        exists, and a run caught in flight by the last stop would hold its concurrency slot. Only a home
        whose dagster.yaml is this project's (linked here) is emptied; any other is refused.
        """
        link = self.dagster_home / "dagster.yaml"
        ours = link.is_symlink() and link.resolve() == (ROOT / "dagster.yaml").resolve()
        if (link.exists() or link.is_symlink()) and not ours:
            raise SystemExit(
                f"{self.dagster_home} has a dagster.yaml of its own; the demo empties its Dagster home at every start, so give it a DAGSTER_HOME of its own"
            )
        self.dagster_home.mkdir(parents=True, exist_ok=True)
        for entry in self.dagster_home.iterdir():
            if entry == link:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        if not ours:
            link.symlink_to(ROOT / "dagster.yaml")

    def start(self) -> None:
        STATE.mkdir(parents=True, exist_ok=True)
        if PIDS.exists() and _demo_running(json.loads(PIDS.read_text())["demo"]):
            raise SystemExit("a demo is already running here; `make demo-stop` stops it")
        self.fresh_dagster_home()

        # Per-site MQTT credentials, generated for this run (or taken from MQTT_PASSWORD_<USER>) and
        # handed to the children by environment only; the ACL lets each site write only its own topics.
        self.mqtt_passwords = {
            user: os.environ.get("MQTT_PASSWORD_" + user.upper().replace("-", "_")) or secrets.token_urlsafe(18)
            for user in ["edge", *DEMO_SITES]
        }
        users = [MqttUser(site, self.mqtt_passwords[site], write=[f"sites/{site}/#"]) for site in DEMO_SITES]
        users.append(MqttUser("edge", self.mqtt_passwords["edge"], read=["sites/+/events/#"]))
        self.traffic = SiteTraffic(DEMO_SITES, STATE)  # each site's forwarder and the devices' simulator
        users += self.traffic.users()
        self.mosquitto = Mosquitto(STATE / "mosquitto", port=self.mqtt_port, users=users).start()
        self._record()
        log.info("started %-14s %s", "mosquitto", self.mosquitto.url)
        self.aws = AwsEmulator(port=self.aws_port).start()
        self._record()
        log.info("started %-14s %s", "aws-emulator", self.aws.endpoint_url)
        os.environ.update(aws_env(self.aws.endpoint_url))
        from pipeline.provisioning import provision

        provisioned = provision()
        log.info(
            "provisioned    queues %s, bucket(s) %s",
            ", ".join(sorted(provisioned.queues)),
            ", ".join(provisioned.buckets),
        )
        from pipeline.routing.express import provision_express_queue
        from pipeline.stack import aws_client

        self.express_queue_url = provision_express_queue(aws_client("sqs"), "events-express")

        self.pushgateway = Pushgateway(STATE / "pushgateway", port=self.pushgateway_port).start()
        self._record()
        log.info("started %-14s %s", "pushgateway", self.pushgateway.url)
        self.prometheus = Prometheus(
            STATE / "prometheus",
            port=self.prometheus_port,
            scrape_interval="5s",
            targets={
                "edge": [f"127.0.0.1:{self.edge_admin_port}"],
                "consumers": [f"127.0.0.1:{self.consumer_metrics_port}"],
                "pushgateway": [self.pushgateway.target],
            },
        ).start()
        self._record()
        log.info("started %-14s %s", "prometheus", self.prometheus.url)

        env = self.env
        # The admin API's token for mutating calls (replay, internal events): per run, by environment only.
        edge_admin_token = os.environ.get("EDGE_ADMIN_TOKEN") or secrets.token_urlsafe(32)
        edge_env = {
            "EDGE_CLIENT_ID": "edge-bridge-demo",
            "EDGE_STATE_DIR": str(STATE / "edge"),
            "EDGE_ADMIN_PORT": str(self.edge_admin_port),
            "EDGE_ADMIN_TOKEN": edge_admin_token,
        }
        edge_env.update(
            EDGE_MQTT_USERNAME="edge", EDGE_MQTT_PASSWORD=self.mqtt_passwords["edge"], EDGE_SITE_ID=DEMO_SITES[0]
        )
        edge_env["EDGE_EXPRESS_QUEUE_URL"] = self.express_queue_url  # high-priority events also take the express lane
        self._spawn("edge", [sys.executable, "-m", "edge_bridge"], {**env, **edge_env})
        env = {**env, "EDGE_ADMIN_URL": f"http://127.0.0.1:{self.edge_admin_port}"}
        # A forwarder per site, and the simulator speaking each device's protocol to it (zigbee2mqtt, ISAPI,
        # signed webhooks, SIA DC-09); it also sends the edge's own events (check-ins, jobs, robots) to the admin API.
        self.traffic.start(
            self._spawn,
            env,
            self.mqtt_port,
            {site: self.mqtt_passwords[site] for site in DEMO_SITES},
            {"EDGE_ADMIN_TOKEN": edge_admin_token},
        )
        # The partner's webhook secret, generated per run and shared by environment only.
        env["PARTNER_SECURITY_MONITORING_SECRET"] = (
            os.environ.get("PARTNER_SECURITY_MONITORING_SECRET")
            or "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        )
        partner_port = _port_or_free("DEMO_PARTNER_PORT", 8099)
        env["PARTNER_SECURITY_MONITORING_URL"] = f"http://127.0.0.1:{partner_port}/events"
        self._spawn("partner", [sys.executable, "-m", "devstack.partner_receiver", "--port", str(partner_port)], env)
        self._spawn(
            "consumer",
            [sys.executable, "-m", "pipeline.consumers"],
            {**env, "PIPELINE_CONSUMER_DB": str(STATE / "consumer.duckdb")},
        )
        self._spawn(
            "dagster",
            [
                sys.executable,
                "-m",
                "dagster",
                "dev",
                "-w",
                str(ROOT / "workspace.yaml"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.dagster_port),
            ],
            {**env, "EDGE_ADMIN_TOKEN": edge_admin_token},  # the edge location's 02:00 replay calls the admin API
        )
        wait_for_port(self.dagster_port, timeout=180)
        print(
            f"""
The demo is up.
  Dagster UI        http://127.0.0.1:{self.dagster_port}   (Runs: drain_events_job; Assets: events_archive)
  MQTT broker       {self.mosquitto.url}   (topic sites/<site>/events/<source>/<type>)
  SQS/S3 endpoint   {self.aws.endpoint_url}   (AWS_ENDPOINT_URL for the aws CLI or boto3)
  Prometheus        {self.prometheus.url}   (Alerts: /alerts; the nine series, e.g. /graph?g0.expr=jobs_pending_count)
  Pushgateway       {self.pushgateway.url}   (the last gauges each Dagster run pushed)
  Edge admin        http://127.0.0.1:{self.edge_admin_port}/status   (/metrics, /healthz, /dlq)
  Partner receiver  {env["PARTNER_SECURITY_MONITORING_URL"]}   (verifies signatures; what it got: {STATE}/partner.log)
  Priority consumer http://127.0.0.1:{self.consumer_metrics_port}/metrics   (queue-to-handled latency per priority)
  Logs              {STATE}/*.log

What to watch: drain runs start within seconds as events arrive; archive_hour_job materializes
events_archive partitions about 30 s later. Ctrl-C (or `make demo-stop`) stops everything.
""",
            flush=True,
        )

    def progress(self) -> str:
        """One line a person watching the demo wants: how many events went where, from Prometheus."""
        queries = {
            "received at edge": "sum(edge_mqtt_messages_received_total)",
            "sent to SQS": "sum(edge_events_delivered_total)",
            "edge pending": "sum(jobs_pending_count)",
            "edge DLQ": "sum(dlq_size)",
            "SQS depth": "max(sqs_queue_depth)",
            "partner success": "min(partner_delivery_success_rate)",
            "archive files": "sum(parquet_files_written)",
            "archival lag min": "max(archival_lag_minutes)",
        }
        parts = []
        for label, expr in queries.items():
            try:
                result = self.prometheus.query(expr) if self.prometheus else []
            except Exception as exc:  # a slow Prometheus must not stop the demo
                log.debug("progress query %s failed: %s", expr, exc)
                result = []
            value = f"{float(result[0]['value'][1]):g}" if result else "-"
            parts.append(f"{label} {value}")
        running = ", ".join(name for name, proc in self.children.items() if proc.poll() is None)
        return f"running: {running} | " + " | ".join(parts) + " | " + self.schedules()

    def schedules(self) -> str:
        """Each schedule's next tick, or OFF, and how many sensors are on: what runs by itself from here."""
        try:
            response = requests.post(
                f"http://127.0.0.1:{self.dagster_port}/graphql", json={"query": INSTIGATORS_QUERY}, timeout=5
            )
            nodes = response.json()["data"]["repositoriesOrError"]["nodes"]
        except Exception as exc:  # the webserver still loading, or busy: the next line will tell
            log.debug("schedules query failed: %s", exc)
            return "schedules -"
        ticks, sensors = [], [s for node in nodes for s in node["sensors"]]
        for schedule in sorted((s for node in nodes for s in node["schedules"]), key=_next_tick):
            state = schedule["scheduleState"]
            if state["status"] != "RUNNING" or not state["nextTick"]:
                ticks.append(f"{schedule['name']} OFF")
                continue
            zone = ZoneInfo(schedule["executionTimezone"] or "UTC")
            at = datetime.fromtimestamp(state["nextTick"]["timestamp"], zone)
            minutes = max(0, round((at.timestamp() - time.time()) / 60))
            wait = f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"
            ticks.append(f"{schedule['name']} {at:%H:%M} {zone.key} (in {wait})")
        off = [s["name"] for s in sensors if s["sensorState"]["status"] != "RUNNING"]
        on = f"sensors on {len(sensors) - len(off)}/{len(sensors)}" + (f" (OFF: {', '.join(off)})" if off else "")
        return "next: " + ", ".join(ticks) + " | " + on

    def wait(self) -> None:
        next_progress = time.monotonic() + 15
        while not self.stopping.is_set():
            for name, proc in self.children.items():
                if proc.poll() is not None:
                    log.error("%s exited with %s; see %s/%s.log", name, proc.returncode, STATE, name)
                    self.stopping.set()
            if time.monotonic() >= next_progress and not self.stopping.is_set():
                log.info("%s", self.progress())
                next_progress = time.monotonic() + 15
            self.stopping.wait(1)

    def stop(self) -> None:
        for name in reversed(list(self.children)):
            stop_process(self.children[name], timeout=15)
        for part in (self.prometheus, self.pushgateway):
            if part:
                part.stop()
        if self.aws:
            self.aws.stop()
        if self.mosquitto:
            self.mosquitto.stop()
        PIDS.unlink(missing_ok=True)
        log.info("demo stopped")


def stop_recorded() -> int:
    """`make demo-stop`: stop a demo started elsewhere, then anything it left."""
    if not PIDS.exists():
        print("no demo is running")
        return 0
    record = json.loads(PIDS.read_text())
    try:
        os.kill(record["demo"], signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 30
    while PIDS.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    for name, pid in record["children"].items():
        try:
            os.killpg(pid, signal.SIGKILL)
            print(f"killed leftover {name} (pid {pid})")
        except ProcessLookupError:
            pass
    PIDS.unlink(missing_ok=True)
    print("demo stopped")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stop", action="store_true", help="stop a running demo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if args.stop:
        return stop_recorded()
    demo = Demo()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: demo.stopping.set())
    try:
        demo.start()
        demo.wait()
    finally:
        demo.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
