"""Operations that notice, through a real `dagster-daemon` on the project's dagster.yaml and workspace.

Schedules and sensors must be on the moment the code locations load (nobody has to find and flip them),
and a compaction run whose worker dies must not hold its hour's slot: the run is failed and the next
compaction of that hour completes. Runs are launched as in production: a landing materialization (what a
drain run reports) makes `archive_hours_sensor` request the hour's compaction. The last tests check the
launcher's look at a run's worker (pipeline/run_launcher.py) on its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from dagster import AssetMaterialization, DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter, job, op
from dagster._core.events import EngineEventData  # how a run worker announces its pid
from dagster._core.launcher import WorkerStatus

from devstack.processes import AwsEmulator, aws_env, stop_process
from pipeline import run_launcher
from pipeline.run_launcher import GRPC_INFO_TAG, WORKER_STARTED, HealthCheckedRunLauncher
from tests.conftest import PROJECT_ROOT, alive, wait_until
from tests.helpers import datagen

# What the seed and the README promise runs by itself: the 02:00 replays (edge and cloud), partner
# redelivery, the dbt daily build, and the sensors that drain, deliver and archive.
PROMISED = {
    "edge_dlq_replay_0200",
    "events_dlq_replay_job_schedule",
    "partner_redelivery_job_schedule",
    "dbt_daily_build",
    "events_queue_sensor",
    "partner_queues_sensor",
    "archive_hours_sensor",
    "archive_freshness_sensor",
}
EVENTS_PER_HOUR = 50_000  # a compaction that takes a few seconds, so the test can stop it mid-step
MONITOR = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())["run_monitoring"]


def defined_instigators() -> set[str]:
    from edge_bridge.orchestration import defs as edge_defs
    from pipeline.definitions import defs as pipeline_defs

    names = set()
    for defs in (pipeline_defs, edge_defs()):
        repo = defs.get_repository_def()
        names |= {s.name for s in repo.schedule_defs} | {s.name for s in repo.sensor_defs}
    return names


class Daemon:
    """`dagster-daemon run` on the project's workspace, in its own process group (with its code servers and runs)."""

    def __init__(self, home: Path, log: Path) -> None:
        self.home, self.log = home, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> Daemon:
        env = {
            **os.environ,
            "DAGSTER_HOME": str(self.home),
            "PYTHONUNBUFFERED": "1",
            "PATH": os.pathsep.join([str(PROJECT_ROOT / ".venv" / "bin"), os.environ.get("PATH", "")]),
        }
        self.proc = subprocess.Popen(
            [str(PROJECT_ROOT / ".venv" / "bin" / "dagster-daemon"), "run", "-w", str(PROJECT_ROOT / "workspace.yaml")],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def kill_everything(self) -> None:
        """The machine dies: the daemon, its code servers and their run workers, all at once."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)


def dagster_home(path: Path) -> Path:
    path.mkdir()
    shutil.copy(PROJECT_ROOT / "dagster.yaml", path / "dagster.yaml")
    return path


def land(instance: DagsterInstance, hour: str, rows: int, batch: str) -> None:
    """What a drain run does for an hour: landing files in S3, then a landing materialization."""
    if rows:
        start = datetime.strptime(hour, "%Y-%m-%d-%H:%M").replace(tzinfo=UTC)
        from pipeline.stack import s3_filesystem

        datagen.write_landing_batches(
            s3_filesystem(),
            "events-archive",
            "landing",
            datagen.events_table(rows, start=start, hours=1),
            batches_per_hour=4,
        )
    instance.report_runless_asset_event(
        AssetMaterialization("events_landing", partition=hour, metadata={"rows": rows, "batch": batch})
    )


def compactions(instance: DagsterInstance, hour: str, *statuses: DagsterRunStatus) -> list:
    return list(
        instance.get_runs(
            RunsFilter(job_name="archive_hour_job", tags={"pipeline/archive_hour": hour}, statuses=list(statuses))
        )
    )


def compaction_in_its_step(instance: DagsterInstance, hour: str):
    for run in compactions(instance, hour, DagsterRunStatus.STARTED):
        if instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_START):
            return run
    return None


def worker_pid(instance: DagsterInstance, run_id: str) -> int:
    [record] = [
        r
        for r in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT)
        if r.message.startswith(WORKER_STARTED)
    ]
    return int(record.dagster_event.engine_event_data.metadata["pid"].value)


def freeze_mid_run(instance: DagsterInstance, hour: str) -> tuple[str, int]:
    """The hour's compaction, stopped (SIGSTOP) inside its step: STARTED, nothing materialized yet."""
    run = wait_until(
        lambda: compaction_in_its_step(instance, hour),
        240,
        interval=0.1,
        message=f"the compaction of {hour} in its step",
    )
    pid = worker_pid(instance, run.run_id)
    os.kill(pid, signal.SIGSTOP)
    assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED
    assert not instance.all_logs(run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION), (
        "the compaction finished before it could be stopped"
    )
    return run.run_id, pid


def monitor_heartbeat_since(instance: DagsterInstance, since: float) -> bool:
    heartbeat = instance.get_daemon_heartbeats().get("MONITORING")
    return bool(heartbeat and heartbeat.timestamp >= since)


def failed(instance: DagsterInstance, run_id: str) -> bool:
    return instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE


@pytest.fixture(scope="module")
def emulator():
    """One SQS + S3 endpoint for the module (each test compacts its own hour), this process pointed at it."""
    with pytest.MonkeyPatch.context() as patch:
        endpoint = AwsEmulator().start()
        for key, value in {
            **aws_env(endpoint.endpoint_url),
            "PIPELINE_EVENTS_QUEUE": "events",
            "PIPELINE_ARCHIVE_BUCKET": "events-archive",
        }.items():
            patch.setenv(key, value)
        from pipeline.provisioning import provision

        provision()
        yield endpoint
        endpoint.stop()


@pytest.fixture(scope="module")
def running_daemon(emulator, tmp_path_factory):
    """A daemon on a fresh instance, and that instance as the test sees it."""
    home = dagster_home(tmp_path_factory.mktemp("ops") / "dagster_home")
    daemon = Daemon(home, home.parent / "daemon.log").start()
    instance = DagsterInstance.from_config(str(home))
    yield daemon, instance
    daemon.stop()
    instance.dispose()


@pytest.mark.timeout(600)  # real daemons, code servers and run workers: slow on a busy machine
def test_every_promised_schedule_and_sensor_is_running_as_soon_as_the_daemon_loads_the_code_locations(running_daemon):
    _, instance = running_daemon
    defined = defined_instigators()
    assert PROMISED <= defined, f"promised but not defined: {PROMISED - defined}"

    def not_running():
        running = {state.name for state in instance.all_instigator_state() if state.is_running}
        return defined - running

    # The daemon records a schedule or sensor that is on by default the first time it looks at it;
    # one that is off by default is never recorded.
    try:
        wait_until(lambda: not not_running(), 240, interval=1, message="every schedule and sensor running")
    except AssertionError:
        pytest.fail(f"not running 240 s after the daemon started: {sorted(not_running())}")


@pytest.mark.timeout(600)  # real daemons, code servers and run workers: slow on a busy machine
def test_a_compaction_whose_worker_is_killed_mid_run_is_failed_at_once_and_the_next_compaction_of_its_hour_completes(
    running_daemon,
):
    _, instance = running_daemon
    hour = "2024-03-04-10:00"
    land(instance, hour, EVENTS_PER_HOUR, "window-1")
    run_id, pid = freeze_mid_run(instance, hour)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()

    # The code server that started the worker sees its child gone and fails the run.
    wait_until(
        lambda: failed(instance, run_id),
        MONITOR["poll_interval_seconds"],
        interval=0.1,
        message="the killed compaction marked FAILURE",
    )
    noticed = time.monotonic() - killed
    land(instance, hour, 0, "window-2")
    wait_until(
        lambda: compactions(instance, hour, DagsterRunStatus.SUCCESS),
        180,
        interval=0.5,
        message=f"the next compaction of {hour} to succeed",
    )
    print(
        f"worker killed: run failed after {noticed:.1f} s, the next compaction of the hour done {time.monotonic() - killed:.0f} s after the kill"
    )


@pytest.mark.timeout(600)  # real daemons, code servers and run workers: slow on a busy machine
def test_a_compaction_left_started_by_a_dead_daemon_and_code_server_is_failed_by_the_run_monitor_and_its_hour_compacts_again(
    emulator, tmp_path
):
    home = dagster_home(tmp_path / "dagster_home")
    instance = DagsterInstance.from_config(str(home))
    hour = "2024-03-04-11:00"
    first = Daemon(home, tmp_path / "daemon-1.log").start()
    try:
        land(instance, hour, EVENTS_PER_HOUR, "window-1")
        run_id, pid = freeze_mid_run(instance, hour)
        first.kill_everything()
        wait_until(lambda: not alive(pid), 10, message="the run worker gone with its daemon")
    finally:
        stop_process(first.proc)
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.STARTED  # nobody left to say otherwise

    land(instance, hour, 0, "window-2")  # the next window for the hour, waiting behind the dead run's slot
    restarted = time.time()
    second = Daemon(home, tmp_path / "daemon-2.log").start()
    try:
        # The bound holds from the moment a run monitor runs again: it looks at once, then every poll interval.
        wait_until(
            lambda: monitor_heartbeat_since(instance, restarted),
            240,
            interval=0.5,
            message="the new daemon's run monitor",
        )
        up = time.time()
        wait_until(
            lambda: failed(instance, run_id),
            MONITOR["poll_interval_seconds"],
            interval=0.5,
            message="the run monitor to fail the dead compaction",
        )
        noticed = time.time() - up
        wait_until(
            lambda: compactions(instance, hour, DagsterRunStatus.SUCCESS),
            180,
            interval=0.5,
            message=f"the next compaction of {hour} to succeed",
        )
        print(
            f"daemon, code server and worker killed: monitor up {up - restarted:.0f} s after the restart, "
            f"run failed {noticed:.1f} s later, the hour compacted {time.time() - restarted:.0f} s after the restart"
        )
        [failure] = instance.all_logs(run_id, of_type=DagsterEventType.RUN_FAILURE)
        assert f"run worker process {pid} is gone" in failure.message  # the monitor's words, not the code server's
    finally:
        second.stop()
        instance.dispose()


@op
def nothing() -> None:
    pass


@job
def announced_job():
    nothing()


@pytest.fixture
def launcher():
    """The launcher on an instance of its own, and a way to make a STARTED run whose worker announced `pid`."""
    with DagsterInstance.ephemeral() as instance:
        checker = HealthCheckedRunLauncher()
        checker.register_instance(instance)

        def started_run(pid: int | None, host: str = "localhost"):
            run = instance.create_run_for_job(
                announced_job,
                status=DagsterRunStatus.STARTED,
                tags={GRPC_INFO_TAG: json.dumps({"host": host, "port": 4000})},
            )
            if pid is not None:
                instance.report_engine_event(
                    f"{WORKER_STARTED} run (pid: {pid}).", run, EngineEventData.in_process(pid)
                )
            return run

        yield checker, started_run


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_whose_worker_process_lives_is_running(launcher):
    checker, started_run = launcher
    assert checker.check_run_worker_health(started_run(os.getpid())).status == WorkerStatus.RUNNING


def test_a_run_whose_worker_process_is_gone_has_failed(launcher, dead_pid):
    checker, started_run = launcher
    health = checker.check_run_worker_health(started_run(dead_pid))
    assert health.status == WorkerStatus.FAILED and f"process {dead_pid} is gone" in health.msg


def test_a_process_started_after_the_worker_announced_its_pid_is_not_taken_for_the_worker(launcher, monkeypatch):
    """Pids are reused (after a reboot, or a long time): the process holding it now must be at least as old as the run's worker."""
    checker, started_run = launcher
    run = started_run(os.getpid())
    monkeypatch.setattr(run_launcher, "process_start_time", lambda pid: time.time() + 600)
    health = checker.check_run_worker_health(run)
    assert health.status == WorkerStatus.FAILED and "later process" in health.msg


def test_a_wall_clock_stepped_forward_a_little_does_not_fail_a_healthy_run(launcher, monkeypatch):
    """The start time is derived from the boot time, which moves with a clock step (NTP): seconds of it are not a new process."""
    checker, started_run = launcher
    run = started_run(os.getpid())
    monkeypatch.setattr(run_launcher, "process_start_time", lambda pid: time.time() + 10)
    assert checker.check_run_worker_health(run).status == WorkerStatus.RUNNING


def test_a_worker_on_another_host_or_not_yet_announced_is_not_judged_from_here(launcher, dead_pid):
    checker, started_run = launcher
    assert checker.check_run_worker_health(started_run(dead_pid, host="10.1.2.3")).status == WorkerStatus.RUNNING
    assert checker.check_run_worker_health(started_run(None)).status == WorkerStatus.RUNNING
