"""The forwarder: device messages in, envelopes out to the site's Mosquitto under `sites/<site>/events/…`.

It normalises and forwards; it does not decide or filter. A message no adapter can read is kept in
the forwarder's quarantine with its reason and counted; it never stops the next message. That holds
for whatever an adapter raises (`adapter_error`, with the exception type in the detail) and for an
envelope over the contract's size bound (`too_large`), which no later stage would take.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_bridge.adapters import ADAPTERS, AdapterRejected
from edge_bridge.envelope import MAX_ENVELOPE_BYTES, Envelope, EnvelopeRejected
from edge_bridge.quarantine import Quarantine, error_detail

log = logging.getLogger(__name__)


def mqtt_publisher(client_id: str, host: str, port: int, username: str | None = None, password: str | None = None) -> mqtt.Client:
    """A connected QoS 1 publisher with its network loop running; it reconnects on its own."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    if username:
        client.username_pw_set(username, password)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(min_delay=1, max_delay=5)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    return client


class Forwarder:
    def __init__(self, site_id: str, client: mqtt.Client, quarantine: Quarantine, known_devices: set[str] | None = None) -> None:
        self.site_id = site_id
        self.client = client
        self.quarantine = quarantine
        self.known_devices = known_devices
        self.forwarded = 0
        self.rejected: Counter[str] = Counter()

    @classmethod
    def connect(cls, site_id: str, host: str, port: int, state_dir: Path, password: str | None = None, **kwargs) -> "Forwarder":
        """One forwarder per site, logged in as the site (the broker's ACL lets it write only its own topics)."""
        client = mqtt_publisher(f"forwarder-{site_id}", host, port, username=site_id if password else None, password=password)
        return cls(site_id, client, Quarantine(state_dir / f"forwarder-{site_id}-quarantine.jsonl"), **kwargs)

    def forward(self, family: str, topic: str, raw: bytes, received_at: datetime | None = None) -> Envelope | None:
        """Adapt one device message and publish it (QoS 1); None when it was quarantined instead."""
        try:
            adapter = ADAPTERS.get(family)
            if adapter is None:
                raise AdapterRejected("unknown_source", f"no adapter for device family {family!r}")
            envelope = adapter(self.site_id, topic, raw, received_at)
            if self.known_devices is not None and envelope.device_id not in self.known_devices:
                raise AdapterRejected("unknown_device", envelope.device_id)
            body = envelope.to_json().encode("utf-8")
            if len(body) > MAX_ENVELOPE_BYTES:
                raise AdapterRejected("too_large", f"the envelope is {len(body)} bytes (limit {MAX_ENVELOPE_BYTES})")
        except EnvelopeRejected as exc:  # AdapterRejected included
            return self._refuse(family, topic, raw, exc.reason, exc.detail)
        except Exception as exc:  # noqa: BLE001 - an adapter's unforeseen failure is this message's, never the forwarder's
            return self._refuse(family, topic, raw, "adapter_error", error_detail(f"adapter {family}", exc))
        self.client.publish(envelope.topic, body, qos=1)
        self.forwarded += 1
        return envelope

    def _refuse(self, family: str, topic: str, raw: bytes, reason: str, detail: str) -> None:
        self.quarantine.put(topic, raw, reason, detail)
        self.rejected[reason] += 1
        log.warning("quarantined a %s message from %s: %s: %s", family, topic, reason, detail[:200])
        return None

    def close(self, timeout: float = 30.0) -> None:
        """Wait until the broker acknowledged what was published, then disconnect."""
        self.client.disconnect()
        self.client.loop_stop()
        self.quarantine.close()
