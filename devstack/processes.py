"""Real local stand-ins for the production parts: Mosquitto, the SQS + S3 emulator, Prometheus + Pushgateway,
PostgreSQL.

The demo and the tests both start them through these classes, each on its own free port and in its
own directory, so a test can kill, restart and cut them. Nothing here is used against AWS.
"""

from __future__ import annotations

import logging
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DEVSTACK_DIR = Path(__file__).resolve().parent
FAUXQS_DIR = DEVSTACK_DIR / "fauxqs"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free port outside the kernel's ephemeral range.

    Ports handed out by binding port 0 come from the ephemeral range, where any outgoing connection
    may take them in the seconds before the service given the port binds it (or re-binds it after a
    restart); below that range only a deliberate listener can.
    """
    low, _ = _ephemeral_range()
    floor = 15000 if low > 20000 else 1024
    for _ in range(500):
        port = random.randint(floor, low - 1)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM the process group and wait for all of it; SIGKILL whatever is left after `timeout`."""
    if proc is None:
        return
    pgid = proc.pid
    if proc.poll() is not None and not _group_alive(pgid):
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()
        if proc.returncode is not None and not _group_alive(pgid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(5)


def kill9(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


class ManagedProcess:
    """A local stand-in in its own process group: `stop()` is SIGTERM then SIGKILL, `kill()` is kill -9."""

    proc: subprocess.Popen | None

    def stop(self) -> None:
        stop_process(self.proc)

    def kill(self) -> None:
        kill9(self.proc)


@dataclass
class MqttUser:
    username: str
    password: str
    # Topic patterns this user may write and read; %u would be Mosquitto's own substitution.
    write: list[str] = field(default_factory=list)
    read: list[str] = field(default_factory=list)


# The broker refuses a publish over this (the envelope's own bound, MAX_ENVELOPE_BYTES = 4 MiB, plus
# room for a forwarder's topic and framing): nothing bigger reaches the edge service's memory.
MESSAGE_SIZE_LIMIT = 5 * 1024 * 1024


@dataclass
class Mosquitto(ManagedProcess):
    """A private Mosquitto with persistence, sized so an offline bridge's backlog is kept, not dropped.

    With users, a client's id is its username (`use_username_as_clientid`): a session belongs to a
    credential, so no site's credential can connect under the edge service's client id and take its
    persistent session (and the events queued in it) over. Each user has one connection at a time.
    """

    workdir: Path
    port: int = field(default_factory=free_port)
    users: list[MqttUser] | None = None  # None: anonymous access (tests); a list: password file + ACL
    max_inflight: int = 1000
    proc: subprocess.Popen | None = None
    data_dir: Path | None = None  # kept across restarts, so persistence is really exercised

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.data_dir is None:
            # Started as root, Mosquitto drops to the `mosquitto` user, which must own its data dir
            # and reach it: a fresh directory under /tmp works wherever the workdir lives.
            root = os.geteuid() == 0
            self.data_dir = Path(tempfile.mkdtemp(prefix="mosquitto-data-")) if root else self.workdir / "data"
            self.data_dir.mkdir(exist_ok=True)
            if root:
                user = pwd.getpwnam("mosquitto")
                os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        data_dir = self.data_dir
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {data_dir}/",
            "autosave_interval 1",
            # An offline persistent session keeps everything queued for it (0 = no count limit).
            "max_queued_messages 0",
            # Messages in flight to one subscriber before its acks come back; the bridge acks only
            # after SQS or the retry log has the event, so this is its pipelining window.
            f"max_inflight_messages {self.max_inflight}",
            f"message_size_limit {MESSAGE_SIZE_LIMIT}",
            "log_dest stderr",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "log_type error",
            "log_type warning",
        ]
        if self.users is None:
            lines.append("allow_anonymous true")
        else:
            # In the data dir: Mosquitto reads them after dropping to its own user (see above).
            passwd = data_dir / "passwd"
            acl = data_dir / "acl"
            passwd.write_text("")
            passwd.chmod(0o600)
            for user in self.users:
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(passwd), user.username, user.password],
                    check=True,
                    capture_output=True,
                )
            acl_lines = []
            for user in self.users:
                acl_lines.append(f"user {user.username}")
                acl_lines += [f"topic write {t}" for t in user.write]
                acl_lines += [f"topic read {t}" for t in user.read]
                acl_lines.append("")
            acl.write_text("\n".join(acl_lines))
            if os.geteuid() == 0:
                user = pwd.getpwnam("mosquitto")
                for path in (passwd, acl):
                    os.chown(path, user.pw_uid, user.pw_gid)
            lines += [
                "allow_anonymous false",
                f"password_file {passwd}",
                f"acl_file {acl}",
                "use_username_as_clientid true",
            ]
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> Mosquitto:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        conf = self._write_config()
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "mosquitto.log", "ab"),
            start_new_session=True,
        )
        wait_for_port(self.port)
        return self

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class AwsEmulator(ManagedProcess):
    """The local SQS + S3 endpoint (fauxqs under Node.js), reached with boto3's endpoint_url.

    It keeps no state across a restart, so callers provision after every start.
    """

    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> AwsEmulator:
        if not (FAUXQS_DIR / "node_modules" / "fauxqs").exists():
            raise RuntimeError("the AWS emulator is not installed: run `make setup` (npm ci in devstack/fauxqs)")
        port = self.port or free_port()
        self.proc = subprocess.Popen(
            ["node", str(FAUXQS_DIR / "server.mjs"), str(port)],
            cwd=FAUXQS_DIR,
            stdin=subprocess.PIPE,  # closes when this process dies, and the emulator then exits
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            stop_process(self.proc)
            raise RuntimeError(f"AWS emulator failed to start: {line!r}")
        self.port = int(line.split()[1])
        wait_for_port(self.port, timeout)
        return self


def aws_env(endpoint_url: str, region: str = "us-east-1") -> dict[str, str]:
    """Environment for a process that should talk to the local endpoint (dummy keys: it checks none)."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "local"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "local"),
    }


PROMETHEUS_CONFIG = DEVSTACK_DIR.parent / "config" / "prometheus" / "prometheus.yml"


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if found:
            return found
    raise RuntimeError(f"{names[0]} is not installed: run `make setup` (Debian package {names[0]})")


@dataclass
class Pushgateway(ManagedProcess):
    """A private Prometheus Pushgateway (Debian package): where short-lived Dagster runs push gauges."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> Pushgateway:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                _binary("prometheus-pushgateway", "pushgateway"),
                f"--web.listen-address={self.target}",
                # Debian's build persists to one shared file under /var/lib by default: keep ours private.
                f"--persistence.file={self.workdir / 'pushgateway.data'}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "pushgateway.log", "ab"),
            start_new_session=True,
        )
        wait_for_port(self.port, timeout)
        return self


@dataclass
class Prometheus(ManagedProcess):
    """A private Prometheus (Debian package) scraping the given targets, with the project's alert rules.

    The scrape jobs, rule files and `honor_labels` come from config/prometheus/prometheus.yml; only the
    targets (job name -> ["host:port", ...]) and the intervals are filled in here, so the demo and the
    tests run the same configuration a deployment would.
    """

    workdir: Path
    targets: dict[str, list[str]] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    scrape_interval: str = "1s"
    template: Path = PROMETHEUS_CONFIG
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        import yaml

        config = yaml.safe_load(self.template.read_text())
        config.setdefault("global", {}).update(
            scrape_interval=self.scrape_interval, evaluation_interval=self.scrape_interval
        )
        config["rule_files"] = [str((self.template.parent / name).resolve()) for name in config.get("rule_files", [])]
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        unknown = set(self.targets) - set(jobs)
        if unknown:
            raise ValueError(f"no scrape job named {sorted(unknown)} in {self.template} (jobs: {sorted(jobs)})")
        config["scrape_configs"] = []
        for name, job in jobs.items():
            if self.targets.get(name):
                job["static_configs"] = [{"targets": list(self.targets[name])}]
                config["scrape_configs"].append(job)
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self, timeout: float = 30.0) -> Prometheus:
        import requests

        config = self.write_config()
        self.proc = subprocess.Popen(
            [
                _binary("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "prometheus.log", "ab"),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {self.proc.returncode}; see {self.workdir / 'prometheus.log'}"
                )
            try:
                if requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready after {timeout:.0f}s; see {self.workdir / 'prometheus.log'}")
            time.sleep(0.1)

    def _get(self, path: str, params: dict) -> object:
        import requests

        response = requests.get(f"{self.url}{path}", params=params, timeout=5)
        response.raise_for_status()
        body = response.json()
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query: the result vector (each item has `metric` labels and `value`)."""
        return self._get("/api/v1/query", {"query": expr})["result"]

    def series(self, name: str) -> list[dict]:
        """Every series Prometheus has stored under this metric name (label sets)."""
        return self._get("/api/v1/series", {"match[]": f'{{__name__="{name}"}}'})

    def target_health(self) -> list[dict]:
        """Per scrape target: job, url, health and last error, to explain a missing series."""
        active = self._get("/api/v1/targets", {"state": "active"})["activeTargets"]
        return [
            {
                "job": t["labels"].get("job"),
                "url": t["scrapeUrl"],
                "health": t["health"],
                "error": t.get("lastError", ""),
            }
            for t in active
        ]

    def wait_for_series(self, names: list[str], timeout: float = 30.0) -> dict[str, list[dict]]:
        """Poll until every name has at least one series; at the deadline, say which are missing and why."""
        found: dict[str, list[dict]] = {}
        deadline = time.monotonic() + timeout
        while True:
            for name in names:
                if name not in found:
                    series = self.series(name)
                    if series:
                        found[name] = series
            if len(found) == len(names):
                return found
            if time.monotonic() > deadline:
                missing = [n for n in names if n not in found]
                raise AssertionError(
                    f"prometheus has no series for {missing} after {timeout:.0f}s; targets: {self.target_health()}"
                )
            time.sleep(0.25)

    def reload(self) -> None:
        """Re-read the configuration after `targets` changed (the lifecycle API)."""
        import requests

        self.write_config()
        requests.post(f"{self.url}/-/reload", timeout=10).raise_for_status()


def _postgres_bin_dir() -> Path:
    """The newest Debian PostgreSQL server's bin directory (initdb and postgres are not on PATH there)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise RuntimeError("postgresql is not installed: run `make setup` (Debian package postgresql)")
    return found[-1].parent


@dataclass
class Postgres(ManagedProcess):
    """A private PostgreSQL server (Debian package) in a data directory of its own, on a free port.

    PostgreSQL refuses to run as root, so when started by root the server runs as the `postgres` user
    from a fresh directory under /tmp that it owns (as Mosquitto's data does). Local trust
    authentication for `user`, on 127.0.0.1 only: it stands in for a managed server in tests and the
    demo, never for a deployment. `stop()` is a fast shutdown (SIGINT: open sessions are ended).
    """

    workdir: Path
    port: int = field(default_factory=free_port)
    user: str = "pipeline"
    proc: subprocess.Popen | None = None
    data_dir: Path | None = None  # kept across restarts; `discard()` removes it

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def _run_as(self) -> dict:
        if os.geteuid() != 0:
            return {}
        user = pwd.getpwnam("postgres")
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def _init(self) -> None:
        as_postgres = self._run_as()
        self.data_dir = Path(tempfile.mkdtemp(prefix="postgres-data-")) if as_postgres else self.workdir / "data"
        if as_postgres:
            os.chown(self.data_dir, as_postgres["user"], as_postgres["group"])
        subprocess.run(
            [
                str(_postgres_bin_dir() / "initdb"),
                f"--pgdata={self.data_dir}",
                f"--username={self.user}",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            cwd="/",
            **as_postgres,
        )

    def start(self, timeout: float = 30.0) -> Postgres:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.data_dir is None:
            self._init()
        self.proc = subprocess.Popen(
            [
                str(_postgres_bin_dir() / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.data_dir}",
                "-c",
                "max_connections=200",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "postgres.log", "ab"),
            start_new_session=True,
            cwd="/",
            **self._run_as(),
        )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}; see {self.workdir / 'postgres.log'}")
            ready = subprocess.run(
                [str(_postgres_bin_dir() / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres not ready after {timeout:.0f}s; see {self.workdir / 'postgres.log'}")
            time.sleep(0.1)

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.kill(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill9(self.proc)
        except ProcessLookupError:
            pass

    def discard(self) -> None:
        """Stop the server and remove its data."""
        self.stop()
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None
