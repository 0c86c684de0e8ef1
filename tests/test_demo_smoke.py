"""`make demo`'s stack comes up, the UI shows the pipeline working, and stopping it leaves nothing behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from devstack.processes import free_port
from tests.conftest import PROJECT_ROOT, alive, wait_until


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


def test_demo_materializes_the_archive_and_stops_cleanly(tmp_path):
    names = ("DEMO_MQTT_PORT", "DEMO_AWS_PORT", "DEMO_DAGSTER_PORT", "DEMO_PROMETHEUS_PORT", "DEMO_PUSHGATEWAY_PORT", "DEMO_EDGE_ADMIN_PORT", "DEMO_CONSUMER_METRICS_PORT", "DEMO_PARTNER_PORT")
    ports = {name: free_port() for name in names}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "DEMO_STATE_DIR": str(tmp_path / "demo"), "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    demo = subprocess.Popen([sys.executable, "-m", "devstack.demo"], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    port = ports["DEMO_DAGSTER_PORT"]
    seen: set[int] = set()
    try:
        def location_loaded():
            seen.update(descendants(demo.pid))
            assert demo.poll() is None, demo.stdout.read()
            try:
                data = graphql(port, "{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError { __typename } } } } }")
            except requests.RequestException:
                return False
            entries = data["workspaceOrError"]["locationEntries"]
            return entries and entries[0]["locationOrLoadError"] and entries[0]["locationOrLoadError"]["__typename"]

        assert wait_until(location_loaded, 180, interval=1, message="the Dagster webserver") == "RepositoryLocation"
        nodes = graphql(port, "{ assetNodes { assetKey { path } } }")["assetNodes"]
        assert ["events_archive"] in [n["assetKey"]["path"] for n in nodes]

        def drained_and_archived():
            seen.update(descendants(demo.pid))
            runs = graphql(port, '{ runsOrError(filter: {pipelineName: "drain_events_job", statuses: [SUCCESS]}, limit: 1) { ... on Runs { results { runId } } } }')
            data = graphql(port, '{ assetOrError(assetKey: {path: ["events_archive"]}) { ... on Asset { assetMaterializations(limit: 1) { partition } } } }')
            asset = data["assetOrError"]
            materialized = asset and asset.get("assetMaterializations")
            return runs["runsOrError"]["results"] and materialized

        # The demo's promise: within two minutes of the UI answering, successful drain runs and a
        # materialized archive partition (a generous deadline here; the time taken is printed).
        up = time.monotonic()
        materialized = wait_until(drained_and_archived, 240, interval=2, message="a successful drain run and a materialized archive partition")
        print(f"drain run + archive partition {time.monotonic() - up:.0f} s after the UI answered")
        assert materialized[0]["partition"]
    finally:
        seen.update(descendants(demo.pid))
        demo.send_signal(signal.SIGINT)
        demo.wait(60)
    wait_until(lambda: not [p for p in seen if alive(p)], 20, message=f"no stray processes (left: {[p for p in seen if alive(p)]})")
    assert len(seen) >= 5, "the demo should have started mosquitto, the emulator, the edge, traffic and dagster"
