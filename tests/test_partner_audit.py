"""What did a partner get? The delivery audit re-creates every body it was sent, byte for byte, under the
contract the body was made under, from the archive and the contract history, and checks it against the
attempt log. Real parts: the drain job routes and archives, compaction writes the archive, the partner's
delivery run posts to a verifying receiver, and the audit runs as the operator's CLI.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from devstack.partner_receiver import PartnerReceiver
from edge_bridge.envelope import Envelope
from pipeline.archive import archive_hour, compact_hour
from pipeline.audit import audit_partner
from pipeline.jobs import drain_events_job
from pipeline.resources import ArchiveStore, DrainSettings, RoutingSettings, SQSResource
from pipeline.routing.config import PartnerContract, contract_version, load_routing_config
from pipeline.routing.contracts import ContractHistory, ContractHistoryError, contract_key
from pipeline.routing.delivery import PartnerDelivery, PartnerQueues
from pipeline.routing.logs import AttemptLog, read_log
from pipeline.routing.provisioning import provision_routing
from pipeline.stack import aws_client, s3_filesystem
from tests.test_drain_and_archive import send_bodies
from tests.test_routing_config import routing_file

BUCKET = "events-archive"
PARTNER = {
    "name": "acme",
    "secret_env": "PARTNER_ACME_SECRET",
    "subscriptions": ["door_access", "intrusion_alert"],
    "allowed_fields": ["event_id", "event_type", "site_id", "payload.door", "payload.zone.*"],
    "transform": {"strip_fields": ["credential"], "rename": {"site_id": "location_id"}},
    "timeout_s": 5,
}


def event(site: str, event_id: str, n: int) -> Envelope:
    now = datetime.now(UTC)
    return Envelope(
        event_id=event_id,
        idempotency_key=f"{site}-{event_id}",
        event_type="door_access" if n % 2 else "intrusion_alert",
        source="ajax",
        site_id=site,
        device_id=f"door-{n}",
        timestamp=now - timedelta(seconds=30 + n),
        payload={
            "door": f"d-{n}",
            "result": "granted",
            "credential": "card-77",
            "zone": {"name": "hall", "pin": 1234, "credential": {"raw": "x"}},
        },
    )


class Pipeline:
    """The cloud side for one partner: drain (routing + archive), compaction, delivery, and a config to change."""

    def __init__(self, tmp_path, aws, receiver) -> None:
        self.tmp_path, self.aws, self.receiver, self.n = tmp_path, aws, receiver, 0
        self.configure(PARTNER)

    def configure(self, partner: dict) -> None:
        self.n += 1
        (self.tmp_path / f"v{self.n}").mkdir()
        self.path = routing_file(self.tmp_path / f"v{self.n}", [{**partner, "webhook": self.receiver.url}])
        self.routing = load_routing_config(self.path)
        urls = provision_routing(aws_client("sqs"), self.routing)
        self.queues = PartnerQueues(urls["partner-acme"], urls["partner-acme-dlq"])

    @property
    def version(self) -> str:
        return self.routing.partner("acme").contract_version

    def drain(self, events: list[Envelope]):
        send_bodies(self.aws.provisioned.queues["events"], [e.to_json() for e in events])
        resources = {
            "sqs": SQSResource(events_queue="events"),
            "archive": ArchiveStore(bucket=BUCKET),
            "drain_settings": DrainSettings(window_seconds=10),
            "routing": RoutingSettings(config_path=str(self.path)),
        }
        result = drain_events_job.execute_in_process(resources=resources)
        assert result.success
        for hour in {archive_hour(e.timestamp, e.received_at) for e in events}:
            compact_hour(s3_filesystem(), BUCKET, "landing", hour)
        return result

    def deliver(self) -> None:
        log = AttemptLog(s3_filesystem(), BUCKET, tag="test-")
        PartnerDelivery(
            self.routing.partner("acme"), aws_client("sqs"), self.queues, self.routing.retry_delays_s, log
        ).run(max_seconds=30)


@pytest.fixture
def pipeline(tmp_path, aws, monkeypatch):
    receiver = PartnerReceiver("whsec_" + base64.b64encode(os.urandom(24)).decode()).start()
    monkeypatch.setenv("PARTNER_ACME_SECRET", receiver.secret)
    yield Pipeline(tmp_path, aws, receiver)
    receiver.stop()


def audit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.audit", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
    )


def window() -> tuple[str, str]:
    now = datetime.now(UTC)
    return (now - timedelta(hours=1)).isoformat(), (now + timedelta(hours=1)).isoformat()


def test_the_audit_re_creates_every_body_the_partner_got_under_the_contract_it_was_made_under(pipeline):
    first = [
        event("site-a", "evt-1", 1),
        event("site-b", "evt-1", 2),
        event("site-a", "evt-2", 3),
    ]  # two sites share an id
    pipeline.drain(first)
    pipeline.deliver()
    old = pipeline.version
    pipeline.configure({**PARTNER, "allowed_fields": PARTNER["allowed_fields"] + ["payload.result"]})  # a new contract
    second = [event("site-a", "evt-3", 4), event("site-c", "evt-1", 5)]
    pipeline.drain(second)
    pipeline.deliver()

    start, end = window()
    out = audit_cli("acme", "--from", start, "--to", end, "--json")

    assert out.returncode == 0, out.stderr
    attempts = json.loads(out.stdout)["attempts"]
    got = pipeline.receiver.raw
    assert sorted(a["webhook_id"] for a in attempts) == sorted(e.dedupe_id for e in first + second) == sorted(got)
    for attempt in attempts:
        assert attempt["recreated"] == "match", attempt
        assert attempt["body"].encode() == got[attempt["webhook_id"]], (
            "the re-created body is the very bytes the partner verified"
        )
        assert attempt["body_sha256"] == hashlib.sha256(got[attempt["webhook_id"]]).hexdigest()
    versions = {a["webhook_id"]: a["contract_version"] for a in attempts}
    assert (
        versions == {**{e.dedupe_id: old for e in first}, **{e.dedupe_id: pipeline.version for e in second}}
        and old != pipeline.version
    )
    assert all("credential" not in body.decode() and "pin" in body.decode() for body in got.values())


def test_a_logged_body_the_archive_and_contract_do_not_give_is_reported_and_fails_the_audit(pipeline):
    pipeline.drain([event("site-a", "evt-1", 1)])
    pipeline.deliver()
    [row] = read_log(s3_filesystem(), BUCKET, "delivery_attempts").to_pylist()
    forged = AttemptLog(s3_filesystem(), BUCKET, tag="forged-")
    forged.record(
        **{**row, "attempt": 2, "body_sha256": hashlib.sha256(b'{"event_id":"evt-1","secret":"x"}').hexdigest()}
    )
    forged.flush()

    start, end = window()
    out = audit_cli("acme", "--from", start, "--to", end)

    assert out.returncode == 1
    assert "match" in out.stdout and "mismatch" in out.stdout


def test_the_drain_records_each_contract_once_before_routing_under_it_and_names_it_in_its_metadata(pipeline):
    result = pipeline.drain([event("site-a", "evt-1", 1)])
    pipeline.drain([event("site-a", "evt-2", 2)])

    [metadata] = [
        e.event_specific_data.metadata
        for e in result.all_events
        if e.event_type_value == "STEP_OUTPUT" and e.step_key == "route_to_partner_queues"
    ]
    assert metadata["contract_versions"].value == {"acme": pipeline.version}
    s3 = aws_client("s3")
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="partner_contracts/")["Contents"]
    assert [o["Key"] for o in listed] == [contract_key("acme", pipeline.version)]
    text = s3.get_object(Bucket=BUCKET, Key=listed[0]["Key"])["Body"].read().decode()
    assert (
        contract_version(text) == pipeline.version
        and PartnerContract.model_validate_json(text).canonical_json()
        == text
        == pipeline.routing.partner("acme").contract.canonical_json()
    )


def test_an_altered_contract_in_the_history_is_refused_and_the_audit_says_it_cannot_re_create(pipeline):
    pipeline.drain([event("site-a", "evt-1", 1)])
    pipeline.deliver()
    key = contract_key("acme", pipeline.version)
    s3 = aws_client("s3")
    s3.put_object(
        Bucket=BUCKET,
        Key=key,
        Body=s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().replace(b"credential", b"nothing"),
    )

    with pytest.raises(ContractHistoryError, match="altered"):
        ContractHistory(s3, BUCKET).load("acme", pipeline.version)
    now = datetime.now(UTC)
    [attempt] = audit_partner(
        s3_filesystem(), s3, BUCKET, "acme", now - timedelta(hours=1), now + timedelta(hours=1)
    ).attempts
    assert attempt.recreated == "unavailable" and "altered" in attempt.detail
