"""One bad message never holds up another: a message that raises at any stage of the edge service is
quarantined alone (`processing_error`, with the stage and exception type), and the events beside it,
from other sites too, reach SQS and are acked; the service never loses its MQTT connection over it.

The in-process tests make one marked message raise an exception nobody foresaw (monkeypatched into a
stage); the real-process tests send a poison envelope and a QoS 0 publish through Mosquitto.
"""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_bridge import send_workers
from edge_bridge import service as service_module
from edge_bridge.cli import AdminClient
from edge_bridge.config import EdgeConfig
from edge_bridge.service import EdgeService
from edge_bridge.sqs_sender import SqsBatchSender
from tests.conftest import sample_envelope, wait_until
from tests.test_edge_faults import T0, Collector
from tests.test_edge_service import metric_samples

SITES = ("site-a", "site-b", "site-c")
POISON_DEVICE = "poison-device"


def burst(per_site: int = 100) -> tuple[list, object]:
    """Good events from three sites, interleaved, with one marked event in the middle."""
    good = [
        sample_envelope(site_id=site, device_id=f"door-{i}", timestamp=T0 + timedelta(milliseconds=i), payload={"n": i})
        for i in range(per_site)
        for site in SITES
    ]
    poison = sample_envelope(site_id="site-b", device_id=POISON_DEVICE)
    return good, poison


def is_poison(payload) -> bool:
    text = payload if isinstance(payload, str) else bytes(payload).decode("utf-8", "replace")
    return POISON_DEVICE in text


def publish_mixed(port: int, messages: list[tuple[str, bytes | str, int]], client_id: str = "mixed-publisher") -> None:
    """Publish (topic, payload, qos) in order on one connection; wait until the broker has each QoS 1 one."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [(client.publish(topic, payload, qos=qos), qos) for topic, payload, qos in messages]
        for info, qos in infos:
            info.wait_for_publish(timeout=30)
            assert info.is_published(), "broker did not acknowledge a publish"
    finally:
        client.disconnect()
        client.loop_stop()


def publish_burst(port: int, good: list, poison_body: str, poison_topic: str) -> None:
    middle = len(good) // 2
    messages = [(e.topic, e.to_json(), 1) for e in good]
    messages.insert(middle, (poison_topic, poison_body, 1))
    publish_mixed(port, messages)


def quarantine_entries(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def poison_entries(path) -> list[dict]:
    return [e for e in quarantine_entries(path) if is_poison(base64.b64decode(e["payload_b64"]))]


# --- in-process service, thread senders: an unforeseen exception at each stage -----------------------


@pytest.fixture
def edge_service(tmp_path, mosquitto, aws):
    """Start an in-process service (thread senders) once the test has put its fault in place."""
    started: list[EdgeService] = []

    def start(**overrides) -> EdgeService:
        settings = dict(
            mqtt_port=mosquitto.port,
            client_id="edge-poison",
            state_dir=tmp_path / "edge",
            admin_port=-1,
            queue_url_override=aws.provisioned.queues["events"],
            sender_processes=0,
        )
        config = EdgeConfig(**{**settings, **overrides})
        service = EdgeService(config)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


def run(service: EdgeService) -> EdgeService:
    service.start()
    wait_until(service.connected.is_set, 20, message="the service to subscribe")
    return service


def assert_isolated(service: EdgeService, aws, good: list, poison, stage: str, exception: str) -> None:
    """Every good event in SQS, the poison alone in quarantine with its stage and type, all acked, one connection."""
    collector = Collector(aws.provisioned.queues["events"])
    wait_until(
        lambda: collector.has_all({e.event_id for e in good}), 60, interval=0.3, message="every good event in SQS"
    )
    assert poison.event_id not in collector.seen
    [entry] = wait_until(lambda: poison_entries(service.quarantine.path), 30, message="the poison in quarantine")
    assert entry["reason"] == "processing_error"
    assert entry["detail"].startswith(f"{stage}: {exception}: "), entry["detail"]
    assert quarantine_entries(service.quarantine.path) == [entry]
    assert (
        service.metrics.registry.get_sample_value("edge_events_quarantined_total", {"reason": "processing_error"}) == 1
    )
    assert service._session == 1, "the service reconnected"


def test_a_message_whose_parsing_raises_is_quarantined_alone_and_the_burst_reaches_sqs(
    edge_service, mosquitto, aws, monkeypatch
):
    good, poison = burst()
    real_parse, parsed_poison = send_workers.parse_envelope, []

    def parse(raw):
        if is_poison(raw):
            parsed_poison.append(1)
            raise KeyError("unforeseen")
        return real_parse(raw)

    monkeypatch.setattr(send_workers, "parse_envelope", parse)
    service = run(edge_service())
    publish_burst(mosquitto.port, good, poison.to_json(), poison.topic)
    assert_isolated(service, aws, good, poison, "validate", "KeyError")
    assert len(parsed_poison) == 1, "the poison was handled again"


def test_a_message_whose_sqs_send_raises_is_quarantined_alone(edge_service, mosquitto, aws, monkeypatch):
    good, poison = burst()
    real_send = SqsBatchSender.send

    def send(self, events):
        if any(is_poison(e.body) for e in events):
            raise RuntimeError("unforeseen")
        return real_send(self, events)

    monkeypatch.setattr(SqsBatchSender, "send", send)
    service = run(edge_service())
    publish_burst(mosquitto.port, good, poison.to_json(), poison.topic)
    assert_isolated(service, aws, good, poison, "send", "RuntimeError")


def test_a_chunk_whose_sender_raises_is_split_until_the_message_at_fault_is_quarantined(
    edge_service, mosquitto, aws, monkeypatch
):
    """Whatever escapes a sender: the chunk goes again in halves, never unchanged."""
    good, poison = burst()
    real_prepare_and_send, poisoned_chunks = service_module.prepare_and_send, []

    def prepare_and_send(messages, queue_url):
        if any(is_poison(payload) for _, _, payload in messages):
            poisoned_chunks.append(tuple(payload for _, _, payload in messages))
            raise MemoryError("unforeseen")
        return real_prepare_and_send(messages, queue_url)

    monkeypatch.setattr(service_module, "prepare_and_send", prepare_and_send)
    service = run(edge_service())
    publish_burst(mosquitto.port, good, poison.to_json(), poison.topic)
    assert_isolated(service, aws, good, poison, "sender", "MemoryError")
    assert len(set(poisoned_chunks)) == len(poisoned_chunks), "a failing chunk was sent again unchanged"
    assert [len(chunk) for chunk in poisoned_chunks][-1] == 1


def test_with_sqs_down_a_message_whose_validation_raises_is_quarantined_and_the_rest_go_to_the_retry_log(
    edge_service, mosquitto, aws, monkeypatch
):
    good, poison = burst()
    real_parse = send_workers.parse_envelope

    def parse(raw):
        if is_poison(raw):
            raise ZeroDivisionError("unforeseen")
        return real_parse(raw)

    monkeypatch.setattr(send_workers, "parse_envelope", parse)
    service = run(edge_service(queue_url_override=None, queue_name="not-provisioned", probe_interval_s=60))
    assert service.queue_url is None
    publish_burst(mosquitto.port, good, poison.to_json(), poison.topic)
    wait_until(lambda: service.retry_log.pending == len(good), 30, message="every good event in the retry log")
    [entry] = wait_until(lambda: poison_entries(service.quarantine.path), 30, message="the poison in quarantine")
    assert (entry["reason"], entry["detail"].split(":")[:2]) == ("processing_error", ["validate", " ZeroDivisionError"])
    assert service._session == 1


def test_a_replayed_dlq_job_whose_retry_raises_is_quarantined_and_the_others_are_delivered(
    edge_service, mosquitto, aws, monkeypatch
):
    good, poison = burst(per_site=20)
    service = edge_service(retry_max_attempts=1, retry_backoff_s=0.1)
    # What an outage left behind: every job failed its one attempt and waits in the DLQ.
    envelopes = good[:30] + [poison] + good[30:]
    service.retry_log.add([(e.event_id, e.to_json(), "SQS unreachable") for e in envelopes])
    service.retry_log.record([], [(job.job_id, "SQS unreachable") for job in service.retry_log.due(1000)])
    assert (service.retry_log.pending, service.retry_log.dlq_size) == (0, len(envelopes))
    real_send_jobs, poisoned_chunks = service_module.send_jobs, []

    def send_jobs(jobs, queue_url):
        if any(is_poison(job[2]) for job in jobs):  # (job_id, event_id, body, priority)
            poisoned_chunks.append(len(jobs))
            raise RecursionError("unforeseen")
        return real_send_jobs(jobs, queue_url)

    monkeypatch.setattr(service_module, "send_jobs", send_jobs)
    run(service)
    assert service.replay_dlq() == len(envelopes)
    collector = Collector(aws.provisioned.queues["events"])
    wait_until(
        lambda: collector.has_all({e.event_id for e in good}),
        60,
        interval=0.3,
        message="every good replayed job in SQS",
    )
    wait_until(
        lambda: (service.retry_log.pending, service.retry_log.dlq_size) == (0, 0), 30, message="the retry log empty"
    )
    [entry] = quarantine_entries(service.quarantine.path)
    assert entry["reason"] == "processing_error" and entry["detail"].startswith(
        f"event {poison.event_id}: retry: RecursionError"
    )
    assert json.loads(base64.b64decode(entry["payload_b64"]))["event_id"] == poison.event_id
    assert poison.event_id not in collector.seen
    assert poisoned_chunks[-1] == 1 and len(poisoned_chunks) < 10


def test_a_message_the_intake_cannot_take_is_quarantined_and_the_network_loop_goes_on(
    edge_service, mosquitto, aws, monkeypatch
):
    good, poison = burst(per_site=20)
    service = edge_service()
    real_put = service.inbox.put

    def put(item):
        if is_poison(item.payload):
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "unforeseen")
        real_put(item)

    monkeypatch.setattr(service.inbox, "put", put)
    run(service)
    publish_burst(mosquitto.port, good, poison.to_json(), poison.topic)
    assert_isolated(service, aws, good, poison, "intake", "UnicodeDecodeError")


# --- the real edge service process ----------------------------------------------------------------


def deeply_nested(envelope, depth: int = 2000) -> str:
    """The envelope with a payload nested `depth` levels: a recursive parser overflows its stack on it."""
    body = envelope.to_json()
    payload = json.dumps(envelope.payload, separators=(",", ":"))
    assert body.count(payload) == 1
    return body.replace(payload, '{"a":' * depth + "1" + "}" * depth)


def assert_never_reconnected(edge) -> None:
    status = AdminClient(edge.admin_url).status()
    assert status["mqtt_connections"] == 1, status
    assert "MQTT disconnected" not in edge.log()
    assert metric_samples(edge.admin_url)["edge_mqtt_connections_total"] == 1


def test_a_poison_envelope_in_a_burst_from_three_sites_is_quarantined_and_every_good_event_reaches_sqs(
    edge_factory, mosquitto, aws, tmp_path
):
    edge = edge_factory(EDGE_SENDER_PROCESSES="2")
    good, poison = burst(per_site=200)
    publish_burst(mosquitto.port, good, deeply_nested(poison), poison.topic)
    collector = Collector(aws.provisioned.queues["events"])
    wait_until(
        lambda: collector.has_all({e.event_id for e in good}), 60, interval=0.3, message="every good event in SQS"
    )
    assert poison.event_id not in collector.seen
    quarantine = tmp_path / "edge_state" / "quarantine.jsonl"
    [entry] = wait_until(lambda: quarantine_entries(quarantine), 30, message="the poison in quarantine")
    assert entry["reason"] == "too_deep", entry
    assert entry["topic"] == poison.topic and entry["payload_bytes"] == len(deeply_nested(poison))
    assert metric_samples(edge.admin_url)["edge_events_quarantined_total{reason=too_deep}"] == 1
    assert_never_reconnected(edge)


def test_a_qos_0_publish_among_qos_1_ones_is_delivered_without_a_puback_or_a_disconnect(edge_factory, mosquitto, aws):
    edge = edge_factory()
    good, _ = burst(per_site=20)
    qos0 = sample_envelope(site_id="site-c", device_id="fire-and-forget")
    messages = [(e.topic, e.to_json(), 1) for e in good]
    messages.insert(len(messages) // 2, (qos0.topic, qos0.to_json(), 0))
    publish_mixed(mosquitto.port, messages)
    collector = Collector(aws.provisioned.queues["events"])
    wait_until(
        lambda: collector.has_all({e.event_id for e in good} | {qos0.event_id}),
        60,
        interval=0.3,
        message="every event in SQS",
    )
    # The acks of the QoS 0 message's chunk were written before these events were even published:
    # once they are in SQS, a broker that took offence at a PUBACK has long dropped the connection.
    after = [sample_envelope(site_id="site-a", device_id=f"after-{i}") for i in range(3)]
    publish_mixed(mosquitto.port, [(e.topic, e.to_json(), 1) for e in after])
    wait_until(
        lambda: collector.has_all({e.event_id for e in after}),
        30,
        interval=0.3,
        message="the events published after it in SQS",
    )
    assert_never_reconnected(edge)
    assert collector.seen[qos0.event_id] == 1 and max(collector.seen.values()) == 1, "events were redelivered"
