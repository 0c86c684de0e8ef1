"""Device adapters: one module per device family, each `adapt(site_id, topic, raw, received_at) -> Envelope`."""

from edge_bridge.adapters import ajax, idp, nvr, zigbee
from edge_bridge.adapters.base import AdapterRejected

ADAPTERS = {"ajax": ajax.adapt, "zigbee": zigbee.adapt, "nvr": nvr.adapt, "idp": idp.adapt}

__all__ = ["ADAPTERS", "AdapterRejected"]
