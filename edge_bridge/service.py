"""The edge service: MQTT (QoS 1, persistent session) to SQS, acknowledging only what is safe.

Persist before acknowledging: a message's PUBACK goes to the broker only once its event is in SQS (or,
for bad input, once it is quarantined). Until then the broker keeps the message and redelivers it
when the service reconnects, and the service itself keeps retrying what it holds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_bridge.config import EdgeConfig
from edge_bridge.envelope import EnvelopeRejected, parse_envelope
from edge_bridge.quarantine import Quarantine
from edge_bridge.sqs_sender import SQS_BATCH_MAX, Outgoing, SqsBatchSender, sqs_client

log = logging.getLogger(__name__)

EVENTS_TOPIC = "sites/+/events/#"


@dataclass
class Received:
    mid: int
    topic: str
    payload: bytes


@dataclass
class Counters:
    received: int = 0
    sent: int = 0
    send_failures: int = 0
    quarantined: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


class EdgeService:
    def __init__(self, config: EdgeConfig, sender: SqsBatchSender | None = None) -> None:
        self.config = config
        self.sender = sender or SqsBatchSender(sqs_client(), config.queue_url(), fifo=config.fifo)
        self.quarantine = Quarantine(config.state_dir / "quarantine.jsonl")
        self.counters = Counters()
        self.inbox: queue.Queue[Received] = queue.Queue()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self.connected = threading.Event()
        self.client = self._make_client()

    # --- MQTT -----------------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            clean_session=False,  # persistent session: the broker queues for us while we are away
            manual_ack=True,
        )
        if self.config.mqtt_username:
            client.username_pw_set(self.config.mqtt_username, self.config.mqtt_password)
        client.max_inflight_messages_set(self.config.max_inflight)
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("MQTT connect refused: %s", reason_code)
            return
        client.subscribe(EVENTS_TOPIC, qos=1)
        log.info("connected to MQTT %s:%s (session present: %s)", self.config.mqtt_host, self.config.mqtt_port, flags.session_present)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.connected.set()
        log.info("subscribed to %s", EVENTS_TOPIC)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("MQTT disconnected (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        self.counters.add(received=1)
        self.inbox.put(Received(message.mid, message.topic, message.payload))

    def _ack(self, mid: int) -> None:
        self.client.ack(mid, 1)

    # --- delivery -------------------------------------------------------------------------------
    def _next_batch(self) -> list[Received]:
        try:
            first = self.inbox.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.config.linger_s
        while len(batch) < SQS_BATCH_MAX:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self.inbox.get(timeout=remaining) if remaining > 0 else self.inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _to_outgoing(self, batch: list[Received]) -> list[Outgoing]:
        out = []
        for item in batch:
            try:
                envelope = parse_envelope(item.payload)
            except EnvelopeRejected as exc:
                self.quarantine.put(item.topic, item.payload, exc.reason, exc.detail)
                self.counters.add(quarantined=1)
                self._ack(item.mid)  # quarantined durably: acking loses nothing and unblocks the stream
                continue
            body = item.payload.decode("utf-8")
            out.append(Outgoing(key=item.mid, event_id=envelope.event_id, site_id=envelope.site_id, body=body))
        return out

    def _deliver(self, events: list[Outgoing]) -> None:
        """Send until SQS has every event; ack each one as soon as it is in."""
        backoff = 0.2
        while events and not self._stop.is_set():
            outcome = self.sender.send(events)
            for event in outcome.sent:
                self._ack(event.key)
            self.counters.add(sent=len(outcome.sent), send_failures=len(outcome.failed))
            events = [event for event, _ in outcome.failed]
            if events:
                log.warning("SQS refused %d events (%s); retrying in %.1fs", len(events), outcome.failed[0][1], backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _worker(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if batch:
                self._deliver(self._to_outgoing(batch))

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "EdgeService":
        for i in range(self.config.sender_threads):
            worker = threading.Thread(target=self._worker, name=f"sqs-sender-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self.client.connect_async(self.config.mqtt_host, self.config.mqtt_port, keepalive=30)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        """Stop without acking what is not in SQS: the broker keeps it for the next start."""
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=15)
        self.client.disconnect()
        self.client.loop_stop()
        self.quarantine.close()
