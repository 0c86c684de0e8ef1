"""The forwarder: device messages in, envelopes out to the site's Mosquitto under `sites/<site>/events/…`.

It normalises and forwards; it does not decide or filter. Each ingress (`edge_bridge.ingress`) hands it
a device message and answers the device by what it says: `FORWARDED` once the site broker acknowledged
the envelope (PUBACK), `QUARANTINED` once the message is durably in the forwarder's quarantine with its
reason, `FAILED` when the broker did not acknowledge in time, so the device is not told it was received
and sends again. The forwarder keeps nothing on disk but its quarantine: what a device was told was
received is at the broker, so a `kill -9` at any instant loses none of it.

A message no adapter can read is quarantined alone and counted; it never stops the next message. That
holds for whatever an adapter raises (`adapter_error`, with the exception type in the detail) and for an
envelope over the contract's size bound (`too_large`), which no later stage would take.

`python -m edge_bridge.forwarder` runs one forwarder per site with its ingresses (`edge_bridge.forwarder.service`).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import Counter, deque
from datetime import datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_bridge.adapters import ADAPTERS, AdapterRejected
from edge_bridge.envelope import MAX_ENVELOPE_BYTES, Envelope, EnvelopeRejected, utc_now
from edge_bridge.quarantine import Quarantine, error_detail

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    FORWARDED = "forwarded"  # the site broker acknowledged the envelope (PUBACK received)
    QUARANTINED = "quarantined"  # refused with a reason, durably in the forwarder's quarantine: the device may be acked
    FAILED = "failed"  # not acknowledged in time (broker down or slow): the device must not be acked, so it retries

    @property
    def received(self) -> bool:
        """Whether the device may be told its message was received."""
        return self is not Outcome.FAILED


def mqtt_publisher(
    client_id: str,
    host: str,
    port: int,
    username: str | None = None,
    password: str | None = None,
    wait_connected: float = 10.0,
) -> mqtt.Client:
    """A QoS 1 publisher with its network loop running; it reconnects on its own.

    It starts even while the broker is down (publishes are then FAILED until it is back); it waits up to
    `wait_connected` seconds for the first connection so a forwarder started beside its broker is ready.
    """
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    if username:
        client.username_pw_set(username, password)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(min_delay=1, max_delay=5)
    connected = threading.Event()
    client.on_connect = lambda c, u, flags, reason, props: (
        connected.set() if not reason.is_failure else log.warning("site broker refused the forwarder: %s", reason)
    )
    client.on_disconnect = lambda c, u, flags, reason, props: log.warning("site broker connection lost: %s", reason)
    client.connect_async(host, port, keepalive=30)
    client.loop_start()
    if wait_connected and not connected.wait(wait_connected):
        log.warning("site broker %s:%d not reachable yet; the forwarder answers FAILED until it is", host, port)
    return client


class Delivery:
    """One envelope on its way to the site broker; `wait` says what the device may be told."""

    __slots__ = ("info", "outcome")

    def __init__(self, info: mqtt.MQTTMessageInfo | None = None, outcome: Outcome | None = None) -> None:
        self.info = info
        self.outcome = outcome

    def wait(self, timeout: float) -> Outcome:
        if self.outcome is not None:
            return self.outcome
        try:
            self.info.wait_for_publish(max(0.0, timeout))
            return Outcome.FORWARDED if self.info.is_published() else Outcome.FAILED
        except (RuntimeError, ValueError):  # paho could not send it (connection lost on the way): not acknowledged
            return Outcome.FAILED


class Forwarder:
    """Thread-safe: every ingress calls it from its own threads."""

    def __init__(
        self, site_id: str, client: mqtt.Client, quarantine: Quarantine, known_devices: set[str] | None = None
    ) -> None:
        self.site_id = site_id
        self.client = client
        self.quarantine = quarantine
        self.known_devices = known_devices
        self.counts: Counter[tuple[str, str]] = Counter()  # (family, outcome) -> messages
        self.rejected: Counter[str] = Counter()  # quarantine reason -> messages
        self.last_received: dict[str, float] = {}  # family -> wall-clock time of its last message
        self._lock = threading.Lock()
        self._unconfirmed: deque[mqtt.MQTTMessageInfo] = deque()  # `forward`'s publishes, for `close`

    @classmethod
    def connect(
        cls, site_id: str, host: str, port: int, state_dir: Path, password: str | None = None, **kwargs
    ) -> Forwarder:
        """One forwarder per site, logged in as the site (the broker's ACL lets it write only its own topics;
        with users the broker takes the username as client id, so the session is the site's)."""
        client = mqtt_publisher(
            f"forwarder-{site_id}", host, port, username=site_id if password else None, password=password
        )
        return cls(site_id, client, Quarantine(Path(state_dir) / f"forwarder-{site_id}-quarantine.jsonl"), **kwargs)

    @property
    def forwarded(self) -> int:
        return sum(n for (_, outcome), n in self.counts.items() if outcome == Outcome.FORWARDED.value)

    # --- what ingresses call ----------------------------------------------------------------------------

    def handle(
        self, family: str, topic: str, raw: bytes, received_at: datetime | None = None, timeout: float = 10.0
    ) -> Outcome:
        """Adapt one device message and hand it on; returns once the device may be answered (or must not be)."""
        return self.submit(family, topic, raw, received_at).wait(timeout)

    def publish(self, envelope: Envelope, timeout: float = 10.0) -> Outcome:
        """Publish an envelope an ingress adapted itself; FORWARDED only once the broker acknowledged it."""
        self._seen(envelope.source)
        return self.send(envelope, envelope.source).wait(timeout)

    def reject(self, source: str, raw: bytes, reason: str, detail: str = "", family: str | None = None) -> Outcome:
        """Quarantine a message an ingress refused; QUARANTINED once the entry is on disk, FAILED if it could not be written.

        `source` is the entry's topic (`sia/<account>`, `nvr/isapi`, ...); the family it is counted under is
        `family`, else the source's first segment."""
        family = family or _FAMILY_OF_SOURCE.get(source.split("/", 1)[0], source.split("/", 1)[0])
        self._seen(family)
        try:
            self.quarantine.put(source, raw, reason, detail)
        except Exception as exc:  # noqa: BLE001 - a quarantine that cannot write must not let the device be acked
            log.error("could not quarantine a %s message (%s): %s", family, reason, exc)
            self._count(family, Outcome.FAILED)
            return Outcome.FAILED
        with self._lock:
            self.rejected[reason] += 1
        self._count(family, Outcome.QUARANTINED)
        log.warning("quarantined a message from %s: %s: %s", source, reason, detail[:200])
        return Outcome.QUARANTINED

    # --- the pipelined path (an ingress that waits for many at once) --------------------------------------

    def submit(self, family: str, topic: str, raw: bytes, received_at: datetime | None = None) -> Delivery:
        """Adapt and publish without waiting: the ZigBee ingress keeps many messages in flight and acks each
        in order as its Delivery completes."""
        self._seen(family)
        try:
            envelope = self._adapt(family, topic, raw, received_at)
        except EnvelopeRejected as exc:  # AdapterRejected included
            return Delivery(outcome=self.reject(_source(family, topic), raw, exc.reason, exc.detail, family=family))
        except Exception as exc:  # noqa: BLE001 - an adapter's unforeseen failure is this message's, never the forwarder's
            return Delivery(
                outcome=self.reject(
                    _source(family, topic), raw, "adapter_error", error_detail(f"adapter {family}", exc), family=family
                )
            )
        return self.send(envelope, family)

    def send(self, envelope: Envelope, family: str | None = None) -> Delivery:
        family = family or envelope.source
        body = envelope.to_json().encode("utf-8")
        if len(body) > MAX_ENVELOPE_BYTES:
            detail = f"the envelope is {len(body)} bytes (limit {MAX_ENVELOPE_BYTES})"
            return Delivery(
                outcome=self.reject(_source(family, envelope.device_id), body, "too_large", detail, family=family)
            )
        if not self.client.is_connected():
            # Nothing is queued in memory while the broker is away: the device keeps its message and resends.
            self._count(family, Outcome.FAILED)
            return Delivery(outcome=Outcome.FAILED)
        info = self.client.publish(envelope.topic, body, qos=1)
        return _Counted(self, family, info)

    def _adapt(self, family: str, topic: str, raw: bytes, received_at: datetime | None) -> Envelope:
        adapter = ADAPTERS.get(family)
        if adapter is None:
            raise AdapterRejected("unknown_source", f"no adapter for device family {family!r}")
        envelope = adapter(self.site_id, topic, raw, received_at or utc_now())
        if self.known_devices is not None and envelope.device_id not in self.known_devices:
            raise AdapterRejected("unknown_device", envelope.device_id)
        return envelope

    def _seen(self, family: str) -> None:
        with self._lock:
            self.last_received[family] = time.time()

    def _count(self, family: str, outcome: Outcome) -> None:
        with self._lock:
            self.counts[(family, outcome.value)] += 1

    # --- generated data ---------------------------------------------------------------------------------

    def forward(self, family: str, topic: str, raw: bytes, received_at: datetime | None = None) -> Envelope | None:
        """Adapt and publish without waiting for the broker (generated test data, bulk loads): the envelope,
        or None when it was quarantined. No device is answered on this path; `close` waits for the acks."""
        try:
            envelope = self._adapt(family, topic, raw, received_at)
        except EnvelopeRejected as exc:
            self.reject(_source(family, topic), raw, exc.reason, exc.detail, family=family)
            return None
        except Exception as exc:  # noqa: BLE001 - an adapter's unforeseen failure is this message's, never the forwarder's
            self.reject(
                _source(family, topic), raw, "adapter_error", error_detail(f"adapter {family}", exc), family=family
            )
            return None
        body = envelope.to_json().encode("utf-8")
        if len(body) > MAX_ENVELOPE_BYTES:
            self.reject(
                _source(family, topic),
                raw,
                "too_large",
                f"the envelope is {len(body)} bytes (limit {MAX_ENVELOPE_BYTES})",
                family=family,
            )
            return None
        info = self.client.publish(envelope.topic, body, qos=1)
        with self._lock:
            self._unconfirmed.append(info)
            while self._unconfirmed and _published(self._unconfirmed[0]):
                self._unconfirmed.popleft()
        self._count(family, Outcome.FORWARDED)
        return envelope

    def close(self, timeout: float = 30.0) -> None:
        """Wait (up to `timeout`) until the broker acknowledged what `forward` published, then disconnect."""
        deadline = time.monotonic() + timeout
        with self._lock:
            unconfirmed, self._unconfirmed = list(self._unconfirmed), deque()
        for info in unconfirmed:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        self.quarantine.close()


class _Counted(Delivery):
    """A publish in flight; its outcome is counted once, when first waited for."""

    __slots__ = ("forwarder", "family", "counted")

    def __init__(self, forwarder: Forwarder, family: str, info: mqtt.MQTTMessageInfo) -> None:
        super().__init__(info)
        self.forwarder, self.family, self.counted = forwarder, family, False

    def wait(self, timeout: float) -> Outcome:
        outcome = super().wait(timeout)
        if not self.counted:
            self.counted = True
            self.forwarder._count(self.family, outcome)
        return outcome


def _published(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):  # sent while disconnected: paho still holds it for the reconnection
        return False


# Sources whose first segment is not the family's name (the SIA receiver's `sia/<account>`).
_FAMILY_OF_SOURCE = {"sia": "ajax"}


def _source(family: str, topic: str) -> str:
    """The quarantine entry's topic: the device's own topic when it names the family, else `<family>/<topic>`."""
    return topic if topic.startswith(family) else f"{family}/{topic}"
