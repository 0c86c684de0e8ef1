"""The run launcher of the single-machine instance: Dagster's default one, plus a look at the run's worker.

The default launcher hands a run to the code server, which starts the run worker as its child and fails
the run if that child dies. When the code server dies too (the machine, or `kill -9` of the whole
process group), nobody is left to notice and the run stays STARTED for ever, holding its concurrency
slot (one compaction per archive hour). Run monitoring asks the launcher whether a STARTED run's worker
is alive; the default launcher cannot answer, this one looks the worker's pid up on this machine. The
launcher types come from `dagster._core.launcher`, the only place Dagster exports them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dagster import DagsterEventType, DagsterRun, DefaultRunLauncher
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

GRPC_INFO_TAG = ".dagster/grpc_info"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
# The run worker announces itself with this engine event, its pid in the metadata.
WORKER_STARTED = "Started process for"
# A process that started this long after the worker announced that pid is another one (the pid was reused,
# after a reboot or a wrap of the pid space). Generous, because the start time is derived from the boot
# time, which moves when the wall clock is stepped (NTP): a healthy run must not be failed for that.
START_TIME_SLACK_S = 60.0


def process_start_time(pid: int) -> float | None:
    """When `pid` started (epoch seconds), or None if no such process runs here (a zombie counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")
        )
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


class HealthCheckedRunLauncher(DefaultRunLauncher):
    """`DefaultRunLauncher` whose run workers run monitoring can check (configured in dagster.yaml)."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        grpc_info = json.loads(run.tags.get(GRPC_INFO_TAG, "{}"))
        if grpc_info.get("host") not in LOCAL_HOSTS and not grpc_info.get("socket"):
            return CheckRunHealthResult(
                WorkerStatus.RUNNING, "code server on another host: its worker is not visible here"
            )
        announced = [
            record
            for record in self._instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT)
            if record.message.startswith(WORKER_STARTED) and "pid" in record.dagster_event.engine_event_data.metadata
        ]
        if not announced:
            return CheckRunHealthResult(WorkerStatus.RUNNING, "the run worker has not announced its pid yet")
        record = announced[-1]
        pid = int(record.dagster_event.engine_event_data.metadata["pid"].value)
        started = process_start_time(pid)
        if started is None:
            return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker process {pid} is gone")
        if started > record.timestamp + START_TIME_SLACK_S:
            return CheckRunHealthResult(
                WorkerStatus.FAILED, f"run worker process {pid} is gone (the pid now belongs to a later process)"
            )
        return CheckRunHealthResult(WorkerStatus.RUNNING)
