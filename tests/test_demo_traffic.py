"""The demo's traffic as `make demo` starts it: a forwarder per site behind the demo broker's users and ACL, and
the simulator speaking every family's protocol to them; every site's events of every family reach the broker."""

from __future__ import annotations

import os
import subprocess

from devstack.processes import Mosquitto, MqttUser, stop_process
from devstack.traffic import SiteTraffic
from tests.conftest import PROJECT_ROOT, wait_until
from tests.helpers.forwarder import SiteSubscriber

SITES = ["site-001", "site-002"]
FAMILIES = ("ajax", "zigbee", "nvr", "idp")


def test_each_demo_site_gets_every_family_through_its_own_forwarder(tmp_path, monkeypatch):
    traffic = SiteTraffic(SITES, tmp_path)
    passwords = {site: f"pw-{site}" for site in SITES}
    users = [MqttUser(site, passwords[site], write=[f"sites/{site}/#"]) for site in SITES]
    users += [MqttUser("edge", "edge-pw", read=["sites/+/events/#"]), *traffic.users()]
    broker = Mosquitto(tmp_path / "mosquitto", users=users).start()
    spawned: list[subprocess.Popen] = []

    def spawn(name: str, args: list[str], env: dict[str, str]) -> None:
        log = open(tmp_path / f"{name}.log", "ab")
        spawned.append(
            subprocess.Popen(
                args, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    subscriber = SiteSubscriber(broker.port, client_id="edge", username="edge", password="edge-pw")
    monkeypatch.setenv("DEMO_RATE", "40")
    try:
        traffic.start(spawn, {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, broker.port, passwords, {})
        every = {(site, family) for site in SITES for family in FAMILIES}
        wait_until(
            lambda: {(m["site_id"], m["source"]) for m in subscriber.snapshot()} >= every,
            90,
            interval=0.5,
            message="every family of every site at the broker",
        )
    finally:
        for proc in spawned:
            stop_process(proc)
        subscriber.close()
        broker.stop()
    for site in SITES:
        topics = {t for t in subscriber.topics if t.startswith(f"sites/{site}/")}
        assert topics and all(t.split("/")[3] in FAMILIES for t in topics)
        assert "Traceback" not in (tmp_path / f"forwarder-{site}.log").read_text()
