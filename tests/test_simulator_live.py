"""The simulator drives a real forwarder service over every family's own protocol (zigbee2mqtt over MQTT,
ISAPI posts, signed webhooks, SIA DC-09 frames), with event times on the wall clock."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

from devstack.processes import free_port
from edge_bridge.simulator import LiveSite, Simulator, SiteFleet, read_targets
from tests.conftest import wait_until
from tests.helpers.forwarder import ForwarderProcess, SiteSubscriber, forwarder_env

SITE = "site-001"


def test_simulated_devices_reach_the_site_broker_through_every_ingress_on_the_wall_clock(
    mosquitto, tmp_path, monkeypatch
):
    sim = Simulator([SITE], devices_per_family=4, malformed=0.05)
    http_port, sia_port = free_port(), free_port()
    env = forwarder_env(
        SITE,
        mosquitto.port,
        tmp_path / "state",
        http_port,
        FORWARDER_INGRESSES="zigbee,nvr,idp,ajax",
        FORWARDER_ZIGBEE_BASE_TOPIC=f"zigbee2mqtt/{SITE}",
        FORWARDER_IDP_SECRET="door-secret",
        FORWARDER_SIA_ACCOUNTS=sim.fleets[SITE].ajax_hub,
        FORWARDER_SIA_HOST="127.0.0.1",
        FORWARDER_SIA_PORT=str(sia_port),
    )
    subscriber = SiteSubscriber(mosquitto.port)
    forwarder = ForwarderProcess(env, tmp_path / "forwarder.log").start()
    monkeypatch.setenv("IDP_SECRET_SITE_001", "door-secret")
    targets = read_targets(
        json.dumps(
            {
                SITE: {
                    "http": forwarder.url,
                    "sia": f"127.0.0.1:{sia_port}",
                    "zigbee": {"port": mosquitto.port, "base": f"zigbee2mqtt/{SITE}"},
                }
            }
        )
    )
    stop = threading.Event()
    live = {SITE: LiveSite(SITE, sim.fleets[SITE], targets[SITE], stop)}
    started = datetime.now(UTC)
    try:
        sent = sim.run_live(live, rate=100, duration=3, stop=stop)
        wait_until(
            lambda: all(link.inbox.empty() for link in live[SITE].links.values()), 30, message="every device link done"
        )
        stop.set()
        counts = live[SITE].close()
    finally:
        forwarder_status = forwarder.status()
        forwarder.stop()
    acked = sum(c.get("acked", 0) for c in counts.values())
    refused = sum(c.get("refused", 0) for c in counts.values())
    print(f"sent {sent}: {counts}")
    assert sent >= 200 and acked + refused >= sent - 4  # the last few may be in a link still
    wait_until(
        lambda: len(subscriber.snapshot()) >= acked - counts["zigbee"].get("acked", 0),
        20,
        message="the acknowledged envelopes at the site broker",
    )
    envelopes = subscriber.snapshot()
    subscriber.close()
    assert {m["source"] for m in envelopes} == {"ajax", "zigbee", "nvr", "idp"}
    for source in ("ajax", "zigbee", "nvr", "idp"):
        times = sorted(
            datetime.fromisoformat(m["timestamp"].replace("Z", "+00:00")) for m in envelopes if m["source"] == source
        )
        assert times[0] >= started - timedelta(seconds=2) and times[-1] <= datetime.now(UTC) + timedelta(seconds=1), (
            source
        )
        assert times[-1] - times[0] >= timedelta(seconds=2), (
            f"{source}: event times should span the run on the wall clock, not a fixed step"
        )
    assert refused >= 1 and sum(forwarder_status["quarantined_by_reason"].values()) >= refused
    assert forwarder_status["families"]["ajax"]["forwarded"] >= 1


def test_the_fixed_step_clock_stays_for_generated_data():
    start = datetime(2024, 1, 15, tzinfo=UTC)
    times = [m.received_at for m in Simulator(["site-001"]).messages(5, start=start)]
    assert times == [start + timedelta(milliseconds=i) for i in range(5)]
    wall = [m.received_at for m in Simulator(["site-001"]).messages(2, clock=lambda: datetime.now(UTC))]
    assert abs(wall[0] - datetime.now(UTC)) < timedelta(seconds=5)


def test_every_zigbee_kind_and_last_seen_format_the_simulator_plays_is_read_by_the_adapter():
    from edge_bridge.adapters import zigbee

    seen_types, formats = set(), set()
    for site in ("site-001", "site-002", "site-003", "site-004"):
        sim = Simulator([site], devices_per_family=4)
        formats.add(sim.fleets[site].last_seen_format)
        for msg in sim.messages(400, start=datetime(2024, 1, 15, tzinfo=UTC)):
            if msg.family == "zigbee":
                env = zigbee.adapt(site, msg.topic, msg.raw, msg.received_at)
                seen_types.add(env.event_type)
                assert env.timestamp == msg.received_at
    assert {"button_press", "switch_state", "siren", "device_offline", "device_online"} <= seen_types
    assert formats == set(SiteFleet.LAST_SEEN_FORMATS)
