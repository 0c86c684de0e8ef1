"""ZigBee through zigbee2mqtt: a persistent MQTT session on `<base>/#`, each message acked by hand.

zigbee2mqtt publishes device states, `<name>/availability` and its own `bridge/…` topics on the broker it
is configured with. This ingress holds a persistent session there (`clean_session=False`,
`manual_ack=True`) and sends the PUBACK for a message only once its envelope was acknowledged by the
site broker (FORWARDED) or is durably quarantined: until then the message stays the broker's, which
hands it over again after a crash or reconnection (dup=True). Messages are adapted and published in
arrival order without waiting for each other; the acks follow in the same order. A message the site
broker did not take (FAILED) is published again after a pause, and nothing is acked for it meanwhile.

`bridge/…` topics are the bridge's own health (`bridge/state` online/offline) and its request/response
API, and `…/set`, `…/get` are commands to devices: none is a device event, so each is acked without
being forwarded or quarantined (the bridge state is kept for `/status`). QoS 0 messages (zigbee2mqtt's
default) have nothing to ack and are not redelivered: set `qos: 1` in zigbee2mqtt's device options.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from datetime import datetime

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_bridge.adapters import zigbee as adapter
from edge_bridge.envelope import format_ts, utc_now
from edge_bridge.forwarder import Delivery, Outcome

log = logging.getLogger(__name__)

FAMILY = "zigbee"
RETRY_MIN_S, RETRY_MAX_S = 0.5, 5.0


class _Received:
    __slots__ = ("mid", "qos", "topic", "payload", "received_at", "delivery")

    def __init__(self, msg: mqtt.MQTTMessage, received_at: datetime) -> None:
        self.mid, self.qos, self.topic, self.payload, self.received_at = (
            msg.mid,
            msg.qos,
            msg.topic,
            msg.payload,
            received_at,
        )
        self.delivery: Delivery | None = None


class ZigbeeIngress:
    def __init__(
        self,
        forwarder,
        host: str,
        port: int,
        base_topic: str = adapter.BASE_TOPIC,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
        publish_timeout: float = 10.0,
    ) -> None:
        self.forwarder = forwarder
        self.host, self.port = host, port
        self.base_topic = base_topic.strip("/")
        self.username, self.password = username, password
        self.client_id = client_id or f"forwarder-{forwarder.site_id}-zigbee"
        self.publish_timeout = publish_timeout
        self.counts: Counter[str] = Counter()
        self.bridge_state: str | None = None
        self.bridge_seen_at: str | None = None
        self.connected = threading.Event()
        self._inbox: queue.SimpleQueue[_Received | None] = queue.SimpleQueue()
        self._inflight: queue.SimpleQueue[_Received | None] = queue.SimpleQueue()
        self._pending: set[int] = set()  # mids handed to the pipeline and not yet acked
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.client: mqtt.Client | None = None

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self, wait_connected: float = 10.0) -> ZigbeeIngress:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False, manual_ack=True
        )
        if self.username:
            client.username_pw_set(self.username, self.password)
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self.client = client
        for target, name in ((self._adapt_loop, "zigbee-adapt"), (self._ack_loop, "zigbee-ack")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        client.connect_async(self.host, self.port, keepalive=30)
        client.loop_start()
        if wait_connected and not self.connected.wait(wait_connected):
            log.warning("zigbee2mqtt's broker %s:%d not reachable yet; retrying", self.host, self.port)
        return self

    def stop(self) -> None:
        """Stop taking messages; what is not acked yet stays the broker's and comes again next time."""
        self._stop.set()
        self._inbox.put(None)
        self._inflight.put(None)
        for thread in self._threads:
            thread.join(timeout=self.publish_timeout + 5)
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

    # --- paho's thread: take the message, nothing else ---------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            log.warning("zigbee2mqtt's broker refused the forwarder: %s", reason)
            return
        client.subscribe(f"{self.base_topic}/#", qos=1)
        self.counts["connections"] += 1
        log.info("connected to %s:%d (session present: %s)", self.host, self.port, flags.session_present)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if any(code.is_failure for code in reason_codes):
            log.error("zigbee2mqtt's broker refused the subscription to %s/#: %s", self.base_topic, reason_codes)
            return
        self.connected.set()  # from here on the broker keeps this session's messages, even while it is away

    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("zigbee2mqtt's broker connection lost: %s", reason)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0:
            with self._lock:
                if msg.mid in self._pending:  # a redelivery of one already on its way: that one acks it
                    self.counts["redelivered_in_flight"] += 1
                    return
                self._pending.add(msg.mid)
        self._inbox.put(_Received(msg, utc_now()))

    # --- adapt and publish, in arrival order ---------------------------------------------------------------

    def _adapt_loop(self) -> None:
        while (item := self._inbox.get()) is not None:
            kind, rest = adapter.topic_kind(item.topic, self.base_topic)
            if kind not in ("state", "availability"):  # not a device event: acked as it is, in its turn
                if kind == "bridge":
                    self._bridge(rest, item.payload, item.received_at)
                self.counts[f"ignored_{kind}"] += 1
                self._inflight.put(item)
                continue
            self.counts["received"] += 1
            item.topic = f"{adapter.BASE_TOPIC}/{rest}"  # the adapter's spelling, whatever the base topic here
            try:
                item.delivery = self._submit(item)
            except Exception:  # noqa: BLE001 - the forwarder quarantines per message; this is the last guard
                log.exception("a zigbee2mqtt message could not be handed on; it stays unacked")
                item.delivery = Delivery(outcome=Outcome.FAILED)
            self._inflight.put(item)

    def _submit(self, item: _Received) -> Delivery:
        return self.forwarder.submit(FAMILY, item.topic, item.payload, item.received_at)

    def _bridge(self, rest: str, payload: bytes, received_at: datetime) -> None:
        self.bridge_seen_at = format_ts(received_at)
        if rest != "bridge/state":
            return
        try:
            state = adapter.availability_state(payload)
        except Exception:  # noqa: BLE001 - a bridge state we cannot read is not a device event either
            state = None
        if state != self.bridge_state:
            (log.warning if state != "online" else log.info)("zigbee2mqtt bridge is %s", state)
        self.bridge_state = state if isinstance(state, str) else "unknown"

    # --- ack, in arrival order, once the site broker has each -------------------------------------------

    def _ack_loop(self) -> None:
        while (item := self._inflight.get()) is not None:
            if item.delivery is None:  # passed by (bridge, command)
                self._ack(item)
                continue
            outcome = item.delivery.wait(self.publish_timeout)
            pause = RETRY_MIN_S
            while outcome is Outcome.FAILED:
                self.counts["failed"] += 1
                if self._stop.wait(pause):
                    return  # unacked: the broker hands it over again
                pause = min(pause * 2, RETRY_MAX_S)
                try:
                    outcome = self._submit(item).wait(self.publish_timeout)
                except Exception:  # noqa: BLE001
                    log.exception("a zigbee2mqtt message could not be handed on; it stays unacked")
                    outcome = Outcome.FAILED
            self.counts[outcome.value] += 1
            self._ack(item)

    def _ack(self, item: _Received) -> None:
        if item.qos > 0:  # QoS 0 has nothing to ack (a PUBACK for mid 0 is a protocol error)
            self.client.ack(item.mid, item.qos)
            with self._lock:
                self._pending.discard(item.mid)

    def status(self) -> dict:
        return {
            "connected": self.connected.is_set(),
            "broker": f"{self.host}:{self.port}",
            "base_topic": self.base_topic,
            "bridge_state": self.bridge_state,
            "bridge_seen_at": self.bridge_seen_at,
            "counts": dict(self.counts),
        }
