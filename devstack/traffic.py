"""Demo traffic: one forwarder service per site, and the device simulator speaking to their ingresses.

Each demo site runs `python -m edge_bridge.forwarder` with all four ingresses: zigbee2mqtt's topics under
`zigbee2mqtt/<site>` on the demo broker (read by `<site>-zigbee`, written by `zigbee2mqtt-<site>`), an HTTP
port for its NVR and door system, a SIA port for its Ajax hub. The simulator plays every site's devices
against them (`edge_bridge.simulator --targets`). Passwords and the webhook secret are made per run and
handed over by environment only. `python -m devstack.traffic` still runs the bare simulator.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

from devstack.processes import MqttUser, free_port
from edge_bridge.simulator import Simulator, main


def _suffix(site: str) -> str:
    return site.upper().replace("-", "_")


class SiteTraffic:
    """The forwarders and the simulator of the demo's sites; `users()` goes into the demo broker's ACL."""

    def __init__(self, sites: list[str], state: Path, devices: int = 4) -> None:
        self.sites = sites
        self.state = state
        self.devices = devices
        self.zigbee_passwords = {site: secrets.token_urlsafe(18) for site in sites}  # the forwarder's, reading
        self.z2m_passwords = {site: secrets.token_urlsafe(18) for site in sites}  # zigbee2mqtt's, writing
        self.idp_secrets = {site: secrets.token_urlsafe(32) for site in sites}
        self.http_ports = {site: free_port() for site in sites}
        self.sia_ports = {site: free_port() for site in sites}
        self.hubs = {site: fleet.ajax_hub for site, fleet in Simulator(sites, devices).fleets.items()}

    def users(self) -> list[MqttUser]:
        users = []
        for site in self.sites:
            users.append(MqttUser(f"{site}-zigbee", self.zigbee_passwords[site], read=[f"zigbee2mqtt/{site}/#"]))
            users.append(MqttUser(f"zigbee2mqtt-{site}", self.z2m_passwords[site], write=[f"zigbee2mqtt/{site}/#"]))
        return users

    def forwarder_env(self, site: str, mqtt_port: int, site_password: str) -> dict[str, str]:
        return {
            "EDGE_SITE_ID": site,
            "FORWARDER_MQTT_HOST": "127.0.0.1",
            "FORWARDER_MQTT_PORT": str(mqtt_port),
            "FORWARDER_MQTT_PASSWORD": site_password,
            "FORWARDER_STATE_DIR": str(self.state / f"forwarder-{site}"),
            "FORWARDER_INGRESSES": "zigbee,nvr,idp,ajax",
            "FORWARDER_ZIGBEE_USERNAME": f"{site}-zigbee",
            "FORWARDER_ZIGBEE_PASSWORD": self.zigbee_passwords[site],
            "FORWARDER_ZIGBEE_BASE_TOPIC": f"zigbee2mqtt/{site}",
            "FORWARDER_HTTP_HOST": "127.0.0.1",
            "FORWARDER_HTTP_PORT": str(self.http_ports[site]),
            "FORWARDER_IDP_SECRET": self.idp_secrets[site],
            "FORWARDER_SIA_ACCOUNTS": self.hubs[site],
            "FORWARDER_SIA_HOST": "127.0.0.1",
            "FORWARDER_SIA_PORT": str(self.sia_ports[site]),
        }

    def simulator(
        self, mqtt_port: int, rate: str, malformed: str = "0.02", internal: str = "0.05"
    ) -> tuple[list[str], dict[str, str]]:
        """The simulator's command line and the secrets it needs (environment only)."""
        targets = {
            site: {
                "http": f"http://127.0.0.1:{self.http_ports[site]}",
                "sia": f"127.0.0.1:{self.sia_ports[site]}",
                "zigbee": {
                    "host": "127.0.0.1",
                    "port": mqtt_port,
                    "base": f"zigbee2mqtt/{site}",
                    "username": f"zigbee2mqtt-{site}",
                },
            }
            for site in self.sites
        }
        args = [
            sys.executable,
            "-m",
            "edge_bridge.simulator",
            "--targets",
            json.dumps(targets),
            "--devices",
            str(self.devices),
        ]
        args += ["--rate", rate, "--malformed", malformed, "--internal", internal]
        env = {}
        for site in self.sites:
            env["IDP_SECRET_" + _suffix(site)] = self.idp_secrets[site]
            env["ZIGBEE2MQTT_PASSWORD_" + _suffix(site)] = self.z2m_passwords[site]
        return args, env

    def start(
        self, spawn, env: dict[str, str], mqtt_port: int, site_passwords: dict[str, str], simulator_env: dict[str, str]
    ) -> None:
        """Spawn each site's forwarder, then the simulator (`spawn(name, args, env)` is the demo's);
        `simulator_env` is for the simulator alone (the edge admin API's URL and token)."""
        for site in self.sites:
            spawn(
                f"forwarder-{site}",
                [sys.executable, "-m", "edge_bridge.forwarder"],
                {**env, **self.forwarder_env(site, mqtt_port, site_passwords[site])},
            )
        args, secrets_env = self.simulator(mqtt_port, os.environ.get("DEMO_RATE", "3"))
        spawn("traffic", args, {**env, **simulator_env, **secrets_env})


if __name__ == "__main__":
    main()
