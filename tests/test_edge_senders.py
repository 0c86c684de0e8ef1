"""When a chunk cannot be handed to the senders (no new sender process could start), the service keeps
it unacked and tries again; it never drops it and never stops taking in the stream."""

from edge_bridge.config import EdgeConfig
from edge_bridge.service import EdgeService
from tests.conftest import publish, sample_envelope, wait_until
from tests.test_edge_faults import Collector


def test_a_chunk_the_senders_refuse_is_kept_and_handed_over_again(tmp_path, mosquitto, aws, monkeypatch):
    url = aws.provisioned.queues["events"]
    config = EdgeConfig(
        mqtt_port=mosquitto.port,
        client_id="edge-senders",
        state_dir=tmp_path / "edge",
        admin_port=-1,
        queue_url_override=url,
    )
    service = EdgeService(config).start()
    refusals = []
    real_submit = service.senders.submit

    def flaky_submit(fn, *args):
        if len(refusals) < 2:
            refusals.append(fn.__name__)
            raise RuntimeError("cannot start a sender process")
        return real_submit(fn, *args)

    monkeypatch.setattr(service.senders, "submit", flaky_submit)
    try:
        wait_until(service.connected.is_set, 20, message="the service to subscribe")
        envelopes = [sample_envelope(device_id=f"d{i}") for i in range(5)]
        publish(mosquitto.port, envelopes[0].topic, [e.to_json() for e in envelopes])
        collector = Collector(url)
        wait_until(
            lambda: collector.has_all({e.event_id for e in envelopes}), 30, interval=0.3, message="every event in SQS"
        )
        assert refusals == ["prepare_and_send", "prepare_and_send"]
        assert service.retry_log.pending == 0
    finally:
        service.stop()
