"""Demo traffic: a steady trickle of envelopes from three sites, published at QoS 1."""

from __future__ import annotations

import argparse
import itertools
import random
import signal
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_bridge.envelope import Envelope, make_idempotency_key, utc_now

EVENT_TYPES = [("ajax", "door_access"), ("ajax", "intrusion_alert"), ("zigbee", "contact"), ("nvr", "motion")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--rate", type=float, default=3.0, help="events per second")
    parser.add_argument("--sites", type=int, default=3)
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-traffic")
    client.connect("127.0.0.1", args.port)
    client.loop_start()
    for n in itertools.count():
        if stop.wait(1 / args.rate):
            break
        site = f"site-{n % args.sites + 1:03d}"
        source, event_type = random.choice(EVENT_TYPES)
        device = f"{source}-{random.randint(1, 5)}"
        ts = utc_now()
        env = Envelope(
            idempotency_key=make_idempotency_key(site, device, event_type, ts),
            event_type=event_type, source=source, site_id=site, device_id=device, timestamp=ts,
            payload={"n": n},
        )
        client.publish(env.topic, env.to_json(), qos=1)
    client.disconnect()
    client.loop_stop()


if __name__ == "__main__":
    main()
