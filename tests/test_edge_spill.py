"""A failed write to the retry log (e.g. a full disk) keeps the events unacked and is retried; it never
stops the writer, and nothing is acked before it is committed."""

from edge_bridge.config import EdgeConfig
from edge_bridge.service import EdgeService
from tests.conftest import publish, sample_envelope, wait_until


def test_retry_log_write_failure_keeps_events_unacked_and_is_retried(tmp_path, mosquitto, aws, monkeypatch):
    # The queue does not exist, so its URL stays unknown: every event goes to the retry log.
    config = EdgeConfig(
        mqtt_port=mosquitto.port, client_id="edge-spill", state_dir=tmp_path / "edge", admin_port=-1, probe_interval_s=60, queue_name="not-provisioned"
    )
    service = EdgeService(config)
    assert service.queue_url is None
    real_add, calls, acked = service.retry_log.add, [], []

    def flaky_add(events, now=None):
        calls.append(len(events))
        if len(calls) == 1:
            raise OSError("No space left on device")
        assert not acked, "nothing may be acked before the retry log has it"
        real_add(events, now)

    monkeypatch.setattr(service.retry_log, "add", flaky_add)
    real_ack_many = service.client.ack_many
    monkeypatch.setattr(service.client, "ack_many", lambda mids: (acked.extend(mids), real_ack_many(mids))[1])
    service.start()
    try:
        wait_until(service.connected.is_set, 20, message="the service to subscribe")
        envelopes = [sample_envelope(device_id=f"d{i}") for i in range(5)]
        publish(mosquitto.port, envelopes[0].topic, [e.to_json() for e in envelopes])
        wait_until(lambda: service.retry_log.pending == 5, 20, message="the events in the retry log after the failed write")
        wait_until(lambda: len(acked) == 5, 10, message="the acks, after the commit")
        assert len(calls) >= 2 and calls[0] >= 1
    finally:
        service.stop()
