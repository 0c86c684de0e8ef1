"""The retry log writer: a write that fails for a shared reason (a full disk) keeps every event unacked and
is retried; a row that fails for a reason of its own is quarantined alone and its group is committed.
Nothing is ever acked before it is committed."""

import base64
import json

import pytest

from edge_bridge.config import EdgeConfig
from edge_bridge.service import EdgeService
from tests.conftest import publish, sample_envelope, wait_until


@pytest.fixture
def spilling_service(tmp_path, mosquitto, aws, monkeypatch):
    """An in-process service whose queue does not exist, so its URL stays unknown: every event goes to the retry log.

    It records what the retry log committed and what was acked, and fails when an ack runs ahead of the commits.
    """
    config = EdgeConfig(
        mqtt_port=mosquitto.port,
        client_id="edge-spill",
        state_dir=tmp_path / "edge",
        admin_port=-1,
        probe_interval_s=60,
        queue_name="not-provisioned",
    )
    service = EdgeService(config)
    assert service.queue_url is None
    service.calls, service.committed, service.acked, service.early_acks = [], [], [], []
    real_add, real_ack_many = service.retry_log.add, service.client.ack_many

    def add(events, now=None):
        service.calls.append([event_id for event_id, *_ in events])
        service.fault(events)
        real_add(events, now)
        service.committed.extend(event_id for event_id, *_ in events)

    def ack_many(mids):
        mids = [m for m in mids if m]
        if len(service.acked) + len(mids) > len(service.committed) + len(quarantined(service)):
            service.early_acks.append(mids)  # an ack ran ahead of the retry log
        service.acked.extend(mids)
        return real_ack_many(mids)

    service.fault = lambda events: None
    monkeypatch.setattr(service.retry_log, "add", add)
    monkeypatch.setattr(service.client, "ack_many", ack_many)
    service.start()
    wait_until(service.connected.is_set, 20, message="the service to subscribe")
    yield service
    service.stop()
    assert service.early_acks == [], "acked before the retry log committed"


def quarantined(service: EdgeService) -> list[dict]:
    path = service.quarantine.path
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def publish_five(port: int) -> list:
    envelopes = [sample_envelope(device_id=f"d{i}") for i in range(5)]
    publish(port, envelopes[0].topic, [e.to_json() for e in envelopes])
    return envelopes


def test_retry_log_write_failure_keeps_events_unacked_and_is_retried(spilling_service, mosquitto):
    service = spilling_service
    failures = []

    def fail_once(events):
        if not failures:
            failures.append(len(events))
            raise OSError("No space left on device")

    service.fault = fail_once
    publish_five(mosquitto.port)
    wait_until(lambda: service.retry_log.pending == 5, 20, message="the events in the retry log after the failed write")
    wait_until(lambda: len(service.acked) == 5, 10, message="the acks, after the commit")
    assert failures and len(service.calls) >= 2
    assert quarantined(service) == []


def test_a_full_disk_keeps_every_event_unacked_until_the_retry_log_takes_writes_again(
    spilling_service, mosquitto, monkeypatch
):
    service = spilling_service
    disk = {"full": True}
    real_writable = service.retry_log.writable

    def refuse_while_full(events):
        if disk["full"]:
            raise OSError("No space left on device")

    service.fault = refuse_while_full
    monkeypatch.setattr(service.retry_log, "writable", lambda: not disk["full"] and real_writable())
    envelopes = publish_five(mosquitto.port)
    wait_until(lambda: len(service.calls) >= 3, 20, message="the writer to try again after failed writes")
    assert (service.acked, service.committed, quarantined(service)) == ([], [], [])
    disk["full"] = False
    wait_until(lambda: len(service.acked) == 5, 20, message="every event committed and acked once there is room")
    assert sorted(service.committed) == sorted(e.event_id for e in envelopes)
    assert quarantined(service) == []


def test_an_event_the_retry_log_cannot_write_is_quarantined_alone_and_its_group_is_committed(
    spilling_service, mosquitto
):
    service = spilling_service
    poison = sample_envelope(device_id="poison")
    good = [sample_envelope(device_id=f"d{i}") for i in range(9)]

    def refuse_the_poison(events):
        if any(event_id == poison.event_id for event_id, *_ in events):
            raise ValueError("this row cannot be stored")

    service.fault = refuse_the_poison
    publish(
        mosquitto.port,
        poison.topic,
        [e.to_json() for e in good[:4]] + [poison.to_json()] + [e.to_json() for e in good[4:]],
    )
    wait_until(
        lambda: len(service.acked) == 10, 20, message="the group committed and the poison quarantined, all acked"
    )
    assert sorted(service.committed) == sorted(e.event_id for e in good)
    assert service.retry_log.pending == 9
    [entry] = quarantined(service)
    assert entry["reason"] == "processing_error"
    assert entry["detail"].startswith("retry log: ValueError: this row cannot be stored")
    assert json.loads(base64.b64decode(entry["payload_b64"]))["event_id"] == poison.event_id
