"""A routing config with one partner behind a live, signature-verifying receiver, provisioned on the test endpoint."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from contextlib import contextmanager

from devstack.partner_receiver import PartnerReceiver
from pipeline.routing.config import load_routing_config
from pipeline.routing.provisioning import provision_routing
from pipeline.stack import aws_client
from tests.test_routing_config import routing_file

RENAME = {"timestamp": "event_time", "site_id": "location_id"}


@contextmanager
def partner_routing(
    tmp_path, monkeypatch, subscriptions: list[str], allowed_fields: list[str], **routing
) -> Iterator[tuple]:
    """Yields (routing config, its path, queue URLs by name, the receiver); partner `acme` strips `credential`."""
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    receiver = PartnerReceiver(secret).start()
    monkeypatch.setenv("PARTNER_ACME_SECRET", secret)
    partner = {
        "name": "acme",
        "webhook": receiver.url,
        "secret_env": "PARTNER_ACME_SECRET",
        "subscriptions": subscriptions,
        "allowed_fields": allowed_fields,
        "transform": {"strip_fields": ["credential"], "rename": RENAME},
    }
    path = routing_file(tmp_path, [partner], **routing)
    monkeypatch.setenv("PIPELINE_ROUTING_CONFIG", str(path))
    config = load_routing_config(path)
    try:
        yield config, path, provision_routing(aws_client("sqs"), config), receiver
    finally:
        receiver.stop()
