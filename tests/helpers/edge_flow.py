"""Driving an edge service under faults: traffic that never pauses, and kills timed by the service's own counters.

A fault test proves something only if the fault lands while events are inside the service (received,
not yet in SQS or the retry log): a kill while it is idle finds nothing to lose, so a service that
acknowledged on receipt would pass too. `ContinuousPublisher` keeps the service busy for as long as
the test needs, however slow the machine; `fault_with_events_inside` picks a seeded random instant
and then strikes only once the service's counters show events in flight, and returns those counters.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import sample_envelope, wait_until

T0 = datetime(2024, 1, 15, 10, 30, tzinfo=UTC)


@dataclass(frozen=True)
class Flow:
    """An edge service's counters since it started: what it took from MQTT and what became of it."""

    received: int
    delivered: int  # taken by SQS on the first attempt (acknowledged)
    spilled: int  # committed to the retry log (acknowledged)
    quarantined: int  # kept as bad input (acknowledged)

    @property
    def inside(self) -> int:
        """Received and not yet in SQS, the retry log or the quarantine: what an early ack would lose."""
        return self.received - self.delivered - self.spilled - self.quarantined


def read_flow(admin_url: str) -> Flow:
    """One scrape of the service's /metrics (all four counters from the same scrape)."""
    text = requests.get(admin_url + "/metrics", timeout=5).text
    values = {"received": 0.0, "delivered": 0.0, "spilled": 0.0, "quarantined": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "edge_mqtt_messages_received_total":
                values["received"] += sample.value
            elif sample.name == "edge_events_delivered_total" and sample.labels.get("path") == "realtime":
                values["delivered"] += sample.value
            elif sample.name == "edge_events_spilled_total":
                values["spilled"] += sample.value
            elif sample.name == "edge_events_quarantined_total":
                values["quarantined"] += sample.value
    return Flow(**{k: int(v) for k, v in values.items()})


def fault_with_events_inside(admin_url: str, fault, rng: random.Random, minimum: int, timeout: float = 60) -> Flow:
    """Wait a random moment (from `rng`), then call `fault` (a kill, a restart) as soon as at least `minimum`
    events are inside the service; returns the counters read just before it. Fails if the service never
    holds that many."""
    threading.Event().wait(rng.uniform(0.2, 1.5))  # the random instant itself, not a wait for anything

    def busy() -> Flow | None:
        try:
            flow = read_flow(admin_url)
        except requests.RequestException:
            return None
        return flow if flow.inside >= minimum else None

    flow = wait_until(busy, timeout, interval=0.01, message=f"at least {minimum} events inside the service")
    fault()
    return flow


class ContinuousPublisher:
    """Publishes fresh envelopes at QoS 1 from a thread until stopped, reconnecting whenever the broker
    goes away. `acked` holds the id of every event the broker acknowledged: those are the events the
    system has promised to deliver, whatever happens after."""

    def __init__(self, port: int, rate: float = 1000.0, chunk: int = 100, site_id: str = "site-123") -> None:
        self.port = port
        self.rate = rate
        self.chunk = chunk
        self.site_id = site_id
        self.acked: set[str] = set()
        self.published = 0
        self.reconnects = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="continuous-publisher", daemon=True)
        self._errors: list[BaseException] = []

    def start(self) -> ContinuousPublisher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> set[str]:
        """Stop publishing; returns the acknowledged ids."""
        self.close(timeout)
        assert not self._thread.is_alive(), "the publisher did not stop"
        assert not self._errors, self._errors
        return set(self.acked)

    def close(self, timeout: float = 60) -> None:
        """Stop publishing, whatever state it is in (for a test's clean-up)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def wait_for(self, count: int, timeout: float = 60) -> None:
        try:
            wait_until(lambda: len(self.acked) >= count, timeout, message=f"{count} events acknowledged by the broker")
        except AssertionError as exc:
            raise AssertionError(f"{exc} ({self})") from None

    def __str__(self) -> str:
        state = "running" if self._thread.is_alive() else "stopped"
        return f"publisher {state}: {len(self.acked)} acknowledged of {self.published} published, {self.reconnects} reconnects, errors {self._errors}"

    def _connect(self):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"continuous-publisher-{self.reconnects}")
        client.max_inflight_messages_set(1000)
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        return client

    @staticmethod
    def _close(client) -> None:
        try:
            client.disconnect()
        finally:
            client.loop_stop()

    def _events(self, start: int) -> list:
        return [
            sample_envelope(
                site_id=self.site_id,
                device_id=f"door-{n % 50}",
                timestamp=T0 + timedelta(milliseconds=n),
                payload={"n": n},
            )
            for n in range(start, start + self.chunk)
        ]

    def _run(self) -> None:
        client, n, due = None, 0, time.monotonic()
        try:
            while not self._stop.is_set():
                if client is None:
                    try:
                        client = self._connect()
                    except OSError:  # the broker is restarting
                        self._stop.wait(0.2)
                        continue
                events = self._events(n)
                n += len(events)
                infos = [client.publish(e.topic, e.to_json(), qos=1) for e in events]
                deadline = time.monotonic() + 10
                confirmed = 0
                for event, info in zip(events, infos):
                    try:
                        info.wait_for_publish(timeout=max(0.0, deadline - time.monotonic()))
                        published = info.is_published()
                    except (RuntimeError, ValueError):  # not sent: the connection is gone
                        published = False
                    if published:
                        self.acked.add(event.event_id)
                        confirmed += 1
                self.published += len(events)
                if confirmed < len(events):  # the broker went away: what it did not acknowledge is not promised
                    self._close(client)
                    client = None
                    self.reconnects += 1
                due = max(due + len(events) / self.rate, time.monotonic() - 1)
                self._stop.wait(max(0.0, due - time.monotonic()))  # pacing to `rate`
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self._errors.append(exc)
        finally:
            if client is not None:
                self._close(client)
