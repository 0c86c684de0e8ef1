"""The forwarder service of one site: the forwarder and the ingresses its devices speak, from the environment.

`python -m edge_bridge.forwarder` runs it until SIGTERM. Settings (environment only; secrets never in files):

    EDGE_SITE_ID                    the site (its MQTT username on the site broker when a password is set)
    FORWARDER_MQTT_HOST / _PORT     the site broker (default EDGE_MQTT_HOST / EDGE_MQTT_PORT, else 127.0.0.1:1883)
    FORWARDER_MQTT_PASSWORD         the site's broker password (none: anonymous)
    FORWARDER_STATE_DIR             where the quarantine lives (default .forwarder_state)
    FORWARDER_PUBLISH_TIMEOUT_S     how long a device waits for the broker's ack before it is told to resend (5)
    FORWARDER_INGRESSES             which families this site has: any of zigbee, nvr, idp, ajax (default zigbee,nvr)

    FORWARDER_ZIGBEE_HOST / _PORT   zigbee2mqtt's broker (default: the site broker)
    FORWARDER_ZIGBEE_USERNAME / _PASSWORD, FORWARDER_ZIGBEE_CLIENT_ID, FORWARDER_ZIGBEE_BASE_TOPIC (zigbee2mqtt)
    FORWARDER_HTTP_HOST / _PORT     the NVR and door-access server (0.0.0.0:9110), also /status and /metrics
    FORWARDER_HTTP_MAX_BODY_BYTES   the largest body read (4 MiB)
    FORWARDER_IDP_SECRET            the door-access webhook's HMAC-SHA256 secret (required with idp)
    FORWARDER_SIA_ACCOUNTS, FORWARDER_SIA_HOST / _PORT   the Ajax receiver (`edge_bridge.ingress.sia`)

A family that is listed but cannot run (idp without its secret, ajax without accounts) stops the start
with a message naming the setting: a site never runs believing a family is connected when it is not.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from edge_bridge.forwarder import Forwarder, Outcome

log = logging.getLogger(__name__)

FAMILIES = ("zigbee", "nvr", "idp", "ajax")


class ForwarderConfigError(ValueError):
    """A setting the forwarder cannot run with; the message names it."""


@dataclass(frozen=True)
class ForwarderConfig:
    site_id: str = "site-local"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_password: str | None = None
    state_dir: Path = Path(".forwarder_state")
    publish_timeout_s: float = 5.0
    ingresses: tuple[str, ...] = ("zigbee", "nvr")
    zigbee_host: str | None = None
    zigbee_port: int | None = None
    zigbee_username: str | None = None
    zigbee_password: str | None = None
    zigbee_client_id: str | None = None
    zigbee_base_topic: str = "zigbee2mqtt"
    http_host: str = "0.0.0.0"
    http_port: int = 9110
    http_max_body_bytes: int = 4 * 1024 * 1024
    idp_secret: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ForwarderConfig:
        env = os.environ if environ is None else environ

        def get(name: str, default: str | None = None) -> str | None:
            value = env.get(name)
            return value if value not in (None, "") else default

        def number(name: str, default: str, kind=int):
            try:
                return kind(get(name, default))
            except ValueError:
                raise ForwarderConfigError(f"{name}={get(name)!r} is not a number") from None

        ingresses = tuple(f.strip().lower() for f in get("FORWARDER_INGRESSES", "zigbee,nvr").split(",") if f.strip())
        unknown = sorted(set(ingresses) - set(FAMILIES))
        if unknown:
            raise ForwarderConfigError(
                f"FORWARDER_INGRESSES: unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)} (known: {', '.join(FAMILIES)})"
            )
        config = cls(
            site_id=get("EDGE_SITE_ID", "site-local"),
            mqtt_host=get("FORWARDER_MQTT_HOST", get("EDGE_MQTT_HOST", "127.0.0.1")),
            mqtt_port=number("FORWARDER_MQTT_PORT", get("EDGE_MQTT_PORT", "1883")),
            mqtt_password=get("FORWARDER_MQTT_PASSWORD"),
            state_dir=Path(get("FORWARDER_STATE_DIR", ".forwarder_state")),
            publish_timeout_s=number("FORWARDER_PUBLISH_TIMEOUT_S", "5", float),
            ingresses=ingresses,
            zigbee_host=get("FORWARDER_ZIGBEE_HOST"),
            zigbee_port=number("FORWARDER_ZIGBEE_PORT", "0") or None,
            zigbee_username=get("FORWARDER_ZIGBEE_USERNAME"),
            zigbee_password=get("FORWARDER_ZIGBEE_PASSWORD"),
            zigbee_client_id=get("FORWARDER_ZIGBEE_CLIENT_ID"),
            zigbee_base_topic=get("FORWARDER_ZIGBEE_BASE_TOPIC", "zigbee2mqtt"),
            http_host=get("FORWARDER_HTTP_HOST", "0.0.0.0"),
            http_port=number("FORWARDER_HTTP_PORT", "9110"),
            http_max_body_bytes=number("FORWARDER_HTTP_MAX_BODY_BYTES", str(4 * 1024 * 1024)),
            idp_secret=get("FORWARDER_IDP_SECRET"),
        )
        if "idp" in ingresses and not config.idp_secret:
            raise ForwarderConfigError(
                "FORWARDER_IDP_SECRET is required with the idp ingress (webhooks are never taken unsigned)"
            )
        return config


class ForwarderService:
    """Wires one site's forwarder to its ingresses; each ingress is its own small part with its own test."""

    def __init__(self, config: ForwarderConfig, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.environ = os.environ if environ is None else environ
        self.forwarder: Forwarder | None = None
        self.zigbee = None
        self.http = None
        self.sia = None
        self.started_at = time.time()

    def start(self) -> ForwarderService:
        c = self.config
        self.forwarder = Forwarder.connect(c.site_id, c.mqtt_host, c.mqtt_port, c.state_dir, password=c.mqtt_password)
        try:
            if "ajax" in c.ingresses:
                self.sia = self._sia()
            if "zigbee" in c.ingresses:
                from edge_bridge.ingress.zigbee import ZigbeeIngress

                self.zigbee = ZigbeeIngress(
                    self.forwarder,
                    c.zigbee_host or c.mqtt_host,
                    c.zigbee_port or c.mqtt_port,
                    c.zigbee_base_topic,
                    c.zigbee_username,
                    c.zigbee_password,
                    c.zigbee_client_id,
                    publish_timeout=c.publish_timeout_s,
                ).start()
            from edge_bridge.ingress.http import HttpIngress

            self.http = HttpIngress(
                self.forwarder,
                c.http_host,
                c.http_port,
                nvr="nvr" in c.ingresses,
                idp_secret=c.idp_secret if "idp" in c.ingresses else None,
                max_body_bytes=c.http_max_body_bytes,
                publish_timeout=c.publish_timeout_s,
                status=self.status,
                metrics=self.metrics,
            ).start()
        except Exception:
            self.stop()
            raise
        log.info("forwarder for %s: %s", c.site_id, ", ".join(c.ingresses))
        return self

    def _sia(self):
        """The Ajax receiver (SIA DC-09), configured by its own module's settings."""
        from edge_bridge.ingress.sia import sia_ingress_from_env

        ingress = sia_ingress_from_env(self.forwarder, self.environ)
        if ingress is None:
            raise ForwarderConfigError("FORWARDER_SIA_ACCOUNTS is required with the ajax ingress")
        if hasattr(ingress, "publish_timeout"):
            ingress.publish_timeout = self.config.publish_timeout_s
        return ingress.start()

    def stop(self) -> None:
        for ingress in (self.http, self.zigbee, self.sia):
            if ingress is not None:
                try:
                    ingress.stop()
                except Exception:  # noqa: BLE001 - stop the others whatever one does
                    log.exception("stopping an ingress failed")
        if self.forwarder is not None:
            self.forwarder.close(timeout=5)

    def status(self) -> dict:
        """What `/status` shows: per family, messages and answers, and when the last one came."""
        f = self.forwarder
        now = time.time()
        families = {}
        for family in self.config.ingresses:
            counts = {o.value: f.counts.get((family, o.value), 0) for o in Outcome}
            last = f.last_received.get(family)
            families[family] = {**counts, "seconds_since_last_message": round(now - last, 1) if last else None}
        status = {
            "site_id": self.config.site_id,
            "site_broker_connected": f.client.is_connected(),
            "uptime_s": round(now - self.started_at, 1),
            "families": families,
            "quarantined_by_reason": dict(f.rejected),
        }
        if self.zigbee is not None:
            status["zigbee"] = self.zigbee.status()
        if self.http is not None:
            status["http"] = self.http.status()
        if self.sia is not None:
            status["ajax"] = {"counts": dict(getattr(self.sia, "counts", {}))}
        return status

    def metrics(self) -> bytes:
        registry = CollectorRegistry()
        registry.register(_ForwarderCollector(self))
        return generate_latest(registry)


class _ForwarderCollector:
    """Read at scrape time from the forwarder's own counts, so they are declared once, here."""

    def __init__(self, service: ForwarderService) -> None:
        self.service = service

    def collect(self):
        f = self.service.forwarder
        messages = CounterMetricFamily(
            "forwarder_messages",
            "Device messages by family and outcome (forwarded, quarantined, failed: not acked, resent)",
            labels=["site", "family", "outcome"],
        )
        last = GaugeMetricFamily(
            "forwarder_last_message_timestamp_seconds",
            "When each family's last device message arrived (unix time)",
            labels=["site", "family"],
        )
        site = self.service.config.site_id
        for family in self.service.config.ingresses:
            for outcome in Outcome:
                messages.add_metric([site, family, outcome.value], f.counts.get((family, outcome.value), 0))
            if family in f.last_received:
                last.add_metric([site, family], f.last_received[family])
        yield messages
        yield last
        connected = GaugeMetricFamily(
            "forwarder_site_broker_connected", "1 while the forwarder is connected to the site broker", labels=["site"]
        )
        connected.add_metric([site], 1.0 if f.client.is_connected() else 0.0)
        yield connected
        if self.service.zigbee is not None:
            bridge = GaugeMetricFamily(
                "forwarder_zigbee_bridge_online", "1 while zigbee2mqtt's bridge/state says online", labels=["site"]
            )
            bridge.add_metric([site], 1.0 if self.service.zigbee.bridge_state == "online" else 0.0)
            yield bridge
            subscribed = GaugeMetricFamily(
                "forwarder_zigbee_connected",
                "1 while the forwarder holds its session on zigbee2mqtt's broker",
                labels=["site"],
            )
            subscribed.add_metric([site], 1.0 if self.service.zigbee.connected.is_set() else 0.0)
            yield subscribed
        if self.service.http is not None:
            signatures = CounterMetricFamily(
                "forwarder_idp_bad_signatures",
                "Door-access webhooks refused for a missing or wrong signature",
                labels=["site"],
            )
            signatures.add_metric([site], self.service.http.counts.get("idp:bad_signature", 0))
            yield signatures


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s forwarder %(levelname)s %(message)s")
    try:
        config = ForwarderConfig.from_env()
        service = ForwarderService(config).start()
    except ForwarderConfigError as exc:
        raise SystemExit(f"forwarder: {exc}") from None
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    log.info("ready: site %s, HTTP on port %d", config.site_id, service.http.port)
    done.wait()
    service.stop()
