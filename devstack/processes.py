"""Real local stand-ins for the production parts: a Mosquitto broker and the SQS + S3 emulator.

The demo and the tests both start them through these classes, each on its own free port and in its
own directory, so a test can kill, restart and cut them. Nothing here is used against AWS.
"""

from __future__ import annotations

import logging
import os
import pwd
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


def free_port() -> int:
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


@dataclass
class MqttUser:
    username: str
    password: str
    # Topic patterns this user may write and read; %u would be Mosquitto's own substitution.
    write: list[str] = field(default_factory=list)
    read: list[str] = field(default_factory=list)


@dataclass
class Mosquitto:
    """A private Mosquitto with persistence, sized so an offline bridge's backlog is kept, not dropped."""

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
            "log_dest stderr",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "log_type error",
            "log_type warning",
        ]
        if self.users is None:
            lines.append("allow_anonymous true")
        else:
            passwd = self.workdir / "passwd"
            acl = self.workdir / "acl"
            passwd.write_text("")
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
            lines += ["allow_anonymous false", f"password_file {passwd}", f"acl_file {acl}"]
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> "Mosquitto":
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

    def stop(self) -> None:
        stop_process(self.proc)

    def kill(self) -> None:
        kill9(self.proc)

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class AwsEmulator:
    """The local SQS + S3 endpoint (fauxqs under Node.js), reached with boto3's endpoint_url.

    It keeps no state across a restart, so callers provision after every start.
    """

    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "AwsEmulator":
        if not (FAUXQS_DIR / "node_modules" / "fauxqs").exists():
            raise RuntimeError("the AWS emulator is not installed: run `make setup` (npm ci in devstack/fauxqs)")
        port = self.port or free_port()
        self.proc = subprocess.Popen(
            ["node", str(FAUXQS_DIR / "server.mjs"), str(port)],
            cwd=FAUXQS_DIR,
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

    def stop(self) -> None:
        stop_process(self.proc)

    def kill(self) -> None:
        kill9(self.proc)


def aws_env(endpoint_url: str, region: str = "us-east-1") -> dict[str, str]:
    """Environment for a process that should talk to the local endpoint (dummy keys: it checks none)."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "local"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "local"),
    }
