"""`make demo`'s stack comes up, the UI shows the pipeline working, stopping it leaves nothing behind, and
a second `make demo` after a stop that caught runs in flight archives as the first one did."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from devstack import demo as demo_module
from devstack.demo import INSTIGATORS_QUERY, Demo
from devstack.processes import free_port
from tests.conftest import PROJECT_ROOT, alive, wait_until

PORTS = (
    "DEMO_MQTT_PORT",
    "DEMO_AWS_PORT",
    "DEMO_DAGSTER_PORT",
    "DEMO_PROMETHEUS_PORT",
    "DEMO_PUSHGATEWAY_PORT",
    "DEMO_EDGE_ADMIN_PORT",
    "DEMO_CONSUMER_METRICS_PORT",
    "DEMO_PARTNER_PORT",
)
IN_FLIGHT = "{ runsOrError(filter: {statuses: [STARTING, STARTED]}) { ... on Runs { results { runId jobName } } } }"


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def graphql(port: int, query: str) -> dict:
    response = requests.post(f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=10)
    response.raise_for_status()
    return response.json()["data"]


class RunningDemo:
    """One `python -m devstack.demo`, with every process it started remembered (to find strays after it stops)."""

    def __init__(self, env: dict[str, str], output: Path) -> None:
        self.port, self.output = int(env["DEMO_DAGSTER_PORT"]), output
        with open(output, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "devstack.demo"],
                cwd=PROJECT_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.seen: set[int] = set()

    def lines(self) -> list[str]:
        return self.output.read_text(errors="replace").splitlines()

    def look(self) -> None:
        self.seen.update(descendants(self.proc.pid))
        assert self.proc.poll() is None, "\n".join(self.lines()[-40:])

    def wait_for_the_code_location(self) -> None:
        def loaded():
            self.look()
            try:
                data = graphql(
                    self.port,
                    "{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError { __typename } } } } }",
                )
            except requests.RequestException:
                return False
            entries = data["workspaceOrError"]["locationEntries"]
            return entries and entries[0]["locationOrLoadError"] and entries[0]["locationOrLoadError"]["__typename"]

        assert wait_until(loaded, 180, interval=1, message="the Dagster webserver") == "RepositoryLocation"

    def archived_partition(self):
        self.look()
        data = graphql(
            self.port,
            '{ assetOrError(assetKey: {path: ["events_archive"]}) { ... on Asset { assetMaterializations(limit: 1) { partition } } } }',
        )
        asset = data["assetOrError"]
        return asset and asset.get("assetMaterializations")

    def drained_and_archived(self):
        runs = graphql(
            self.port,
            '{ runsOrError(filter: {pipelineName: "drain_events_job", statuses: [SUCCESS]}, limit: 1) { ... on Runs { results { runId } } } }',
        )
        return runs["runsOrError"]["results"] and self.archived_partition()

    def runs_in_flight(self) -> list[dict]:
        self.look()
        return graphql(self.port, IN_FLIGHT)["runsOrError"]["results"]

    def finish(self, stop) -> None:
        """Stop it (`stop` does), wait for it to exit, and check that nothing it started is left."""
        self.seen.update(descendants(self.proc.pid))
        stop()
        self.proc.wait(60)
        wait_until(
            lambda: not [p for p in self.seen if alive(p)],
            20,
            message=f"no stray processes (left: {[p for p in self.seen if alive(p)]})",
        )
        assert len(self.seen) >= 5, (
            "the demo should have started mosquitto, the emulator, the edge, traffic and dagster"
        )
        assert any(line.endswith("demo stopped") for line in self.lines()), "the demo did not stop its children itself"


@pytest.mark.timeout(900)  # two demos, one after the other, each under the deadlines the first one always had
def test_demo_stopped_with_runs_in_flight_starts_again_fresh_and_archives_as_the_first_time(tmp_path):
    env = {
        **os.environ,
        **{name: str(free_port()) for name in PORTS},
        "DEMO_STATE_DIR": str(tmp_path / "demo"),
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
    }

    first = RunningDemo(env, tmp_path / "first.out")
    try:
        first.wait_for_the_code_location()
        nodes = graphql(first.port, "{ assetNodes { assetKey { path } } }")["assetNodes"]
        assert ["events_archive"] in [n["assetKey"]["path"] for n in nodes]
        # The demo's promise: soon after the UI answers, successful drain runs and a materialized archive
        # partition (a generous deadline here; the time taken is printed).
        up = time.monotonic()
        materialized = wait_until(
            first.drained_and_archived,
            240,
            interval=2,
            message="a successful drain run and a materialized archive partition",
        )
        print(f"first demo: drain run + archive partition {time.monotonic() - up:.0f} s after the UI answered")
        assert materialized[0]["partition"]
        in_flight = wait_until(
            first.runs_in_flight, 120, interval=0.5, message="a run in flight to stop the demo under"
        )
    finally:
        # `make demo-stop`, while runs are starting or running.
        first.finish(
            lambda: subprocess.run(
                [sys.executable, "-m", "devstack.demo", "--stop"], cwd=PROJECT_ROOT, env=env, timeout=90, check=True
            )
        )

    second = RunningDemo(env, tmp_path / "second.out")
    try:
        second.wait_for_the_code_location()
        # Dagster starts as empty as the emulator: no run of the first demo, in flight or not, is left to hold a slot.
        for run in in_flight:
            found = graphql(second.port, f'{{ runOrError(runId: "{run["runId"]}") {{ __typename }} }}')["runOrError"][
                "__typename"
            ]
            assert found == "RunNotFoundError", (
                f"{run['jobName']} {run['runId']} of the first demo is still in the instance"
            )
        up = time.monotonic()
        materialized = wait_until(
            second.archived_partition, 240, interval=2, message="an archive partition materialized by the second demo"
        )
        print(f"second demo: archive partition {time.monotonic() - up:.0f} s after the UI answered")
        assert materialized[0]["partition"]

        # Everything that runs by itself is on, and the status line says when each schedule ticks next.
        repositories = graphql(second.port, INSTIGATORS_QUERY)["repositoriesOrError"]["nodes"]
        states = {s["name"]: s["scheduleState"]["status"] for r in repositories for s in r["schedules"]}
        states |= {s["name"]: s["sensorState"]["status"] for r in repositories for s in r["sensors"]}
        assert set(states.values()) == {"RUNNING"}, states
        schedules = [s["name"] for r in repositories for s in r["schedules"]]
        progress = wait_until(
            lambda: [line for line in second.lines() if " | next: " in line],
            60,
            interval=1,
            message="a progress line with the schedules' next ticks",
        )
        assert all(f"{name} " in progress[-1] for name in schedules) and " OFF" not in progress[-1], progress[-1]
    finally:
        second.finish(lambda: second.proc.send_signal(signal.SIGINT))  # Ctrl-C


def test_a_demo_start_empties_its_dagster_home_and_keeps_the_link_to_the_projects_dagster_yaml(tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    (home / "history" / "runs").mkdir(parents=True)
    (home / "history" / "runs.db").write_text("runs of the last demo")
    (home / "schedules").mkdir()
    (home / "dagster.yaml").symlink_to(PROJECT_ROOT / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    Demo().fresh_dagster_home()
    assert [p.name for p in home.iterdir()] == ["dagster.yaml"] and (home / "dagster.yaml").resolve() == (
        PROJECT_ROOT / "dagster.yaml"
    ).resolve()


def test_a_demo_refuses_to_empty_a_dagster_home_with_a_dagster_yaml_of_its_own(tmp_path, monkeypatch):
    (tmp_path / "dagster.yaml").write_text("telemetry: {enabled: false}\n")
    (tmp_path / "history").mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with pytest.raises(SystemExit, match="dagster.yaml of its own"):
        Demo().fresh_dagster_home()
    assert (tmp_path / "history").exists()


def test_the_status_line_gives_each_schedules_next_tick_soonest_first_and_names_what_is_off(monkeypatch):
    now = time.time()

    def schedule(name: str, status: str, tick: float | None = None, zone: str = "UTC") -> dict:
        return {
            "name": name,
            "executionTimezone": zone,
            "scheduleState": {"status": status, "nextTick": {"timestamp": tick} if tick else None},
        }

    nodes = [
        {
            "schedules": [schedule("dbt_daily_build", "RUNNING", now + 5 * 3600 + 60)],
            "sensors": [{"name": "events_queue_sensor", "sensorState": {"status": "RUNNING"}}],
        },
        {
            "schedules": [
                schedule("edge_dlq_replay_0200", "STOPPED"),
                schedule("partner_redelivery_job_schedule", "RUNNING", now + 7 * 60, zone="Europe/Berlin"),
            ],
            "sensors": [{"name": "archive_hours_sensor", "sensorState": {"status": "STOPPED"}}],
        },
    ]

    class Answer:
        def json(self):
            return {"data": {"repositoriesOrError": {"nodes": nodes}}}

    monkeypatch.setattr(demo_module.requests, "post", lambda *args, **kwargs: Answer())
    line = Demo().schedules()
    assert line.startswith("next: edge_dlq_replay_0200 OFF, partner_redelivery_job_schedule ")
    assert "Europe/Berlin (in 7 min), dbt_daily_build " in line and "UTC (in 5 h 1 min)" in line
    assert line.endswith("| sensors on 1/2 (OFF: archive_hours_sensor)")
