"""The drain isolates every message and trusts only what it can.

One event's trouble at any destination (its transform raising, a body too big, an entry SQS refuses)
quarantines that event alone and the window goes on; identity is (site_id, event_id), so one site
cannot make another's events disappear; a claim-check pointer is honoured only if the edge made it;
an event too big for a downstream queue travels there as a pointer of the drain's own.
"""

import inspect
import json
import pickle
import sys

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from dagster import FilesystemIOManager, materialize

from devstack.processes import free_port
from edge_bridge.claim_check import ROUTED_PREFIX, ClaimChecker, verify_and_fetch
from edge_bridge.envelope import MAX_PAYLOAD_DEPTH, Envelope, claim_check_pointer, parse_envelope
from pipeline import drain
from pipeline.archive import hour_key, read_archive_hour, write_landing
from pipeline.assets import events_archive
from pipeline.jobs import drain_events_job
from pipeline.routing.destinations import QueueLimits, SendFailed, send_all
from pipeline.routing.monitoring import MAX_LOKI_LINE_BYTES, loki_streams
from pipeline.routing.transform import PartnerTransform
from pipeline.stack import aws_client, s3_filesystem
from tests.conftest import queue_counts, receive_all, sample_envelope
from tests.test_drain_and_archive import send_bodies
from tests.test_drain_routing import resources, routed  # noqa: F401 - the fixture

CLAIMS = "events-claim-check"
ARCHIVE = "events-archive"
LIMIT = 262144  # events_queue.max_message_bytes in config/stack.yaml


def quarantine_entries() -> list[dict]:
    s3 = aws_client("s3")
    lines = []
    for item in s3.list_objects_v2(Bucket=ARCHIVE, Prefix="quarantine/").get("Contents", []):
        lines += s3.get_object(Bucket=ARCHIVE, Key=item["Key"])["Body"].read().decode().splitlines()
    return [json.loads(line) for line in lines if line]


def drain_once(path, **extra):
    result = drain_events_job.execute_in_process(resources={**resources(path), **extra}, raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    return result


def door_events(n, **overrides):
    return [sample_envelope(device_id=f"door-{i}", **overrides) for i in range(n)]


def nested(depth: int, leaf="bottom"):
    """A JSON object `depth` levels deep (the object itself is level 1)."""
    value = {"leaf": leaf}
    for _ in range(depth - 1):
        value = {"inner": value}
    return value


# --- identity ------------------------------------------------------------------------------------
def test_two_sites_with_the_same_event_id_are_both_archived_and_routed_while_a_true_duplicate_is_dropped(aws, routed):  # noqa: F811
    routing, path, urls, _ = routed
    events_url = aws.provisioned.queues["events"]
    ours = sample_envelope(site_id="site-a", event_id="door-event-1")
    theirs = sample_envelope(site_id="site-b", event_id="door-event-1", device_id="door-9")
    send_bodies(events_url, [ours.to_json(), theirs.to_json(), ours.to_json()])

    parsed = drain_once(path).output_for_node("validate_and_dedupe")

    assert parsed.duplicates == 1 and sorted(e.site_id for e in parsed.events) == ["site-a", "site-b"]
    assert queue_counts(events_url) == (0, 0)
    partner = receive_all(urls["partner-acme"], timeout=0.5)
    assert sorted(m["webhook_id"] for m in partner) == ["site-a/door-event-1", "site-b/door-event-1"]
    priority = receive_all(urls[routing.priority.queue_for("medium")], timeout=0.5)
    assert sorted(m["site_id"] for m in priority) == ["site-a", "site-b"]
    hour = hour_key(ours.timestamp)
    archived = materialize([events_archive], partition_key=hour, resources=resources(path))
    assert archived.get_asset_check_evaluations() and all(c.passed for c in archived.get_asset_check_evaluations())
    rows = read_archive_hour(s3_filesystem(), ARCHIVE, hour).to_pylist()
    assert sorted((r["site_id"], r["event_id"]) for r in rows) == [
        ("site-a", "door-event-1"),
        ("site-b", "door-event-1"),
    ]


# --- size limits and claim checks -------------------------------------------------------------------
def test_a_two_mib_event_claim_checked_by_the_edge_is_archived_whole_and_reaches_its_priority_queue_as_a_pointer(
    aws, routed
):  # noqa: F811
    routing, path, urls, _ = routed
    s3 = aws_client("s3")
    big = sample_envelope(event_type="intrusion_alert", payload={"blob": "x" * 2_000_000, "door": "7"})
    pointer = ClaimChecker(s3, CLAIMS, LIMIT).check_in(big.event_id, big.site_id, big.to_json())
    neighbours = door_events(5, event_type="intrusion_alert")
    send_bodies(aws.provisioned.queues["events"], [pointer] + [e.to_json() for e in neighbours])

    drain_once(path)

    assert queue_counts(aws.provisioned.queues["events"]) == (0, 0)
    high = {m["event_id"]: m for m in receive_all(urls[routing.priority.queue_for("high")], timeout=0.5)}
    assert set(high) == {big.event_id} | {e.event_id for e in neighbours}
    routed_pointer = json.dumps(high[big.event_id])
    assert claim_check_pointer(routed_pointer) is not None, "the high queue got a pointer, not 2 MiB"
    assert parse_envelope(verify_and_fetch(s3, routed_pointer, bucket=CLAIMS, prefix=ROUTED_PREFIX)) == big
    partner = {m["event_id"]: json.loads(m["body"]) for m in receive_all(urls["partner-acme"], timeout=0.5)}
    assert partner[big.event_id]["payload"] == {"door": "7"}
    materialize([events_archive], partition_key=hour_key(big.timestamp), resources=resources(path))
    [row] = [
        r
        for r in read_archive_hour(s3_filesystem(), ARCHIVE, hour_key(big.timestamp)).to_pylist()
        if r["event_id"] == big.event_id
    ]
    assert json.loads(row["payload"]) == big.payload
    assert quarantine_entries() == []


def test_an_event_too_big_for_its_partner_is_quarantined_and_the_rest_of_the_window_goes_on(aws, routed):  # noqa: F811
    routing, path, urls, _ = routed
    events = door_events(6)
    huge = sample_envelope(device_id="door-huge", payload={"door": "y" * 300_000})
    pointer = ClaimChecker(aws_client("s3"), CLAIMS, LIMIT).check_in(huge.event_id, huge.site_id, huge.to_json())
    send_bodies(
        aws.provisioned.queues["events"],
        [e.to_json() for e in events[:3]] + [pointer] + [e.to_json() for e in events[3:]],
    )

    drain_once(path)

    assert queue_counts(aws.provisioned.queues["events"]) == (0, 0)
    assert sorted(m["event_id"] for m in receive_all(urls["partner-acme"], timeout=0.5)) == sorted(
        e.event_id for e in events
    )
    [entry] = quarantine_entries()
    assert (entry["stage"], entry["reason"], entry["destination"], entry["event_id"]) == (
        "route_to_partner_queues",
        "too_large_for_partner",
        "partner:acme",
        huge.event_id,
    )
    assert parse_envelope(entry["body"]) == huge, "the quarantine keeps what it takes to release the event"
    medium = {m["event_id"]: m for m in receive_all(urls[routing.priority.queue_for("medium")], timeout=0.5)}
    assert len(medium) == 7 and claim_check_pointer(json.dumps(medium[huge.event_id])) is not None


# --- per-message isolation at the destinations ----------------------------------------------------
def test_a_partner_transform_that_raises_on_one_event_quarantines_that_event_alone(aws, routed, monkeypatch):  # noqa: F811
    routing, path, urls, _ = routed
    events = door_events(12)
    poison = events[5]
    real_apply = PartnerTransform.apply

    def apply(self, wire):
        if wire["device_id"] == poison.device_id:
            raise RuntimeError("transform exploded")
        return real_apply(self, wire)

    monkeypatch.setattr(PartnerTransform, "apply", apply)
    send_bodies(aws.provisioned.queues["events"], [e.to_json() for e in events])

    drain_once(path)

    assert queue_counts(aws.provisioned.queues["events"]) == (0, 0)
    assert sorted(m["event_id"] for m in receive_all(urls["partner-acme"], timeout=0.5)) == sorted(
        e.event_id for e in events if e is not poison
    )
    assert len(receive_all(urls[routing.priority.queue_for("medium")], timeout=0.5)) == 12, (
        "other destinations take it as usual"
    )
    [entry] = quarantine_entries()
    assert (entry["stage"], entry["reason"], entry["error_type"], entry["site_id"], entry["event_id"]) == (
        "route_to_partner_queues",
        "transform_failed",
        "RuntimeError",
        poison.site_id,
        poison.event_id,
    )
    assert "transform exploded" in entry["detail"]


def test_an_entry_sqs_refuses_for_its_content_is_quarantined_and_its_batch_mates_are_delivered(aws, routed):  # noqa: F811
    routing, path, urls, _ = routed
    medium_url = urls[routing.priority.queue_for("medium")]
    aws_client("sqs").set_queue_attributes(QueueUrl=medium_url, Attributes={"MaximumMessageSize": "1024"})
    events = door_events(8)
    refused = sample_envelope(device_id="door-wordy", payload={"door": "1", "note": "z" * 1500})
    send_bodies(
        aws.provisioned.queues["events"],
        [e.to_json() for e in events[:4]] + [refused.to_json()] + [e.to_json() for e in events[4:]],
    )

    drain_once(path)

    assert queue_counts(aws.provisioned.queues["events"]) == (0, 0)
    assert sorted(m["event_id"] for m in receive_all(medium_url, timeout=0.5)) == sorted(e.event_id for e in events)
    [entry] = quarantine_entries()
    assert (entry["stage"], entry["reason"], entry["destination"], entry["event_id"]) == (
        "route_to_priority_queues",
        "refused_by_sqs",
        "priority:medium",
        refused.event_id,
    )
    assert entry["error_type"] == "InvalidParameterValue"


def test_an_event_holding_characters_sqs_refuses_still_reaches_its_priority_queue(aws, routed):  # noqa: F811
    routing, path, urls, _ = routed
    odd = sample_envelope(payload={"door": "\ufffe\uffff", "note": "\x01\x7f"})
    send_bodies(
        aws.provisioned.queues["events"], [json.dumps(json.loads(odd.to_json()))]
    )  # ASCII on the wire, as the edge may send it

    drain_once(path)

    [message] = receive_all(urls[routing.priority.queue_for("medium")], timeout=0.5)
    assert parse_envelope(json.dumps(message)) == odd
    assert quarantine_entries() == []


def test_when_a_quarantine_cannot_be_written_the_window_stays_in_sqs(aws, routed, monkeypatch):  # noqa: F811
    _, path, _, _ = routed
    events = door_events(4)

    def poison(self, wire):
        raise RuntimeError("every event is poison to this partner")

    def s3_down(*args, **kwargs):
        raise ConnectionError("S3 unreachable")

    monkeypatch.setattr(PartnerTransform, "apply", poison)

    monkeypatch.setattr(drain, "write_quarantine", s3_down)
    send_bodies(aws.provisioned.queues["events"], [e.to_json() for e in events])

    result = drain_events_job.execute_in_process(resources=resources(path), raise_on_error=False)

    assert not result.success
    assert sum(queue_counts(aws.provisioned.queues["events"])) == 4, "nothing deleted before its quarantine was durable"


# --- what passes between ops ------------------------------------------------------------------------
def test_an_event_at_the_depth_bound_passes_between_ops_through_the_pickling_io_manager(aws, routed, tmp_path):  # noqa: F811
    routing, path, urls, _ = routed
    deepest = sample_envelope(payload={"door": nested(MAX_PAYLOAD_DEPTH - 1)})
    send_bodies(aws.provisioned.queues["events"], [deepest.to_json(), sample_envelope(device_id="door-2").to_json()])

    drain_once(path, io_manager=FilesystemIOManager(base_dir=str(tmp_path / "io")))

    assert queue_counts(aws.provisioned.queues["events"]) == (0, 0)
    partner = {m["event_id"]: json.loads(m["body"]) for m in receive_all(urls["partner-acme"], timeout=0.5)}
    assert partner[deepest.event_id]["payload"]["door"] == deepest.payload["door"]


def test_a_parsed_window_pickles_in_a_few_stack_frames_whatever_its_events_nest():
    deepest = sample_envelope(payload=nested(MAX_PAYLOAD_DEPTH))
    parsed = drain.parse_window(drain.Window([drain.QueueMessage("m-1", "r-1", deepest.to_json(), 1)]))
    assert parsed.events == [deepest]

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack(0)) + 25)  # far fewer frames than the payload has levels
    try:
        data = pickle.dumps(parsed)
    finally:
        sys.setrecursionlimit(limit)

    assert pickle.loads(data).events == [deepest]


# --- claim-check pointers are honoured only when the edge made them -------------------------------------
def window_of(*bodies: str) -> drain.Window:
    return drain.Window([drain.QueueMessage(f"m-{i}", f"r-{i}", body, 1) for i, body in enumerate(bodies)])


def test_a_pointer_to_another_bucket_or_key_is_quarantined_as_bad_input(aws):
    good = sample_envelope()
    aws_client("s3").put_object(Bucket=ARCHIVE, Key="secret.json", Body=good.to_json().encode())
    forged = [
        json.dumps(
            {
                "claim_check": {"bucket": ARCHIVE, "key": "secret.json", "bytes": 10, "sha256": "0" * 64},
                "event_id": good.event_id,
                "site_id": good.site_id,
            }
        ),
        json.dumps(
            {
                "claim_check": {
                    "bucket": CLAIMS,
                    "key": "claim-check/site-9/other.json",
                    "bytes": 10,
                    "sha256": "0" * 64,
                },
                "event_id": good.event_id,
                "site_id": good.site_id,
            }
        ),
    ]

    parsed = drain.parse_window(window_of(*forged, good.to_json()))

    assert [r.reason for r in parsed.quarantined] == ["bad_claim_check", "bad_claim_check"]
    assert parsed.events == [good] and parsed.receipts == ["r-2"]


def test_a_pointer_whose_object_does_not_match_its_hash_is_quarantined_as_bad_input(aws):
    s3 = aws_client("s3")
    big = sample_envelope(payload={"blob": "x" * 300_000})
    pointer = ClaimChecker(s3, CLAIMS, LIMIT).check_in(big.event_id, big.site_id, big.to_json())
    key = claim_check_pointer(pointer).key
    s3.put_object(Bucket=CLAIMS, Key=key, Body=big.to_json().replace("x", "y").encode())

    parsed = drain.parse_window(window_of(pointer))

    assert [r.reason for r in parsed.quarantined] == ["claim_check_mismatch"] and parsed.events == []


def test_a_pointer_s3_cannot_serve_stays_in_sqs_and_its_neighbours_go_on(aws):
    big = sample_envelope(payload={"blob": "x" * 300_000})
    pointer = ClaimChecker(aws_client("s3"), CLAIMS, LIMIT).check_in(big.event_id, big.site_id, big.to_json())
    neighbour = sample_envelope(device_id="door-2")
    unreachable = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )

    parsed = drain.parse_window(
        window_of(pointer, neighbour.to_json()), s3_client=unreachable, claim_check_bucket=CLAIMS
    )

    assert parsed.held == 1 and parsed.quarantined == []
    assert parsed.events == [neighbour] and parsed.receipts == ["r-1"], "the pointer's message is not deleted"


def test_a_message_the_parser_cannot_handle_in_any_foreseen_way_is_quarantined_alone(monkeypatch):
    good = sample_envelope()
    real = drain.parse_envelope

    def parse(body):
        if "poison" in body:
            raise KeyError("unforeseen")
        return real(body)

    monkeypatch.setattr(drain, "parse_envelope", parse)

    parsed = drain.parse_window(window_of(sample_envelope(device_id="poison").to_json(), good.to_json()))

    assert [(r.reason, r.error_type) for r in parsed.quarantined] == [("unreadable", "KeyError")]
    assert parsed.events == [good]


def test_parse_window_returns_envelopes_equal_to_what_was_sent():
    events = [sample_envelope(device_id=f"d{i}") for i in range(3)]
    parsed = drain.parse_window(window_of(*[e.to_json() for e in events]))
    assert parsed.events == events and isinstance(parsed.events[0], Envelope)


# --- the archive and monitoring hand-overs --------------------------------------------------------------
def unencodable(event: Envelope) -> Envelope:
    """An event whose payload no JSON encoder takes: what a bug upstream could hand a destination."""
    return event.model_copy(update={"payload": {"tags": {"a", "b"}}})


def test_an_event_that_cannot_become_an_archive_row_is_refused_alone_and_the_hour_is_written(aws):
    events = door_events(3)
    bad = unencodable(sample_envelope(device_id="door-bad"))
    refused = []

    written = write_landing(
        s3_filesystem(),
        ARCHIVE,
        "landing",
        [events[0], bad, *events[1:]],
        "batch-1",
        events[0].received_at,
        on_refused=lambda e, exc: refused.append((e, type(exc).__name__)),
    )

    assert written == {hour_key(events[0].timestamp): 3}
    assert refused == [(bad, "TypeError")]


def test_a_loki_line_an_event_cannot_make_is_left_out_and_a_huge_payload_is_cut_short():
    good = sample_envelope(event_type="device_heartbeat")
    # Loki lines carry only declared device-health fields, so the hostile values sit in those.
    huge = sample_envelope(
        event_type="device_heartbeat", device_id="cam-1", payload={"state": "x" * (MAX_LOKI_LINE_BYTES * 2)}
    )
    bad = sample_envelope(event_type="device_heartbeat", device_id="door-bad").model_copy(
        update={"payload": {"battery": float("nan")}}
    )

    body = loki_streams([good, bad, huge])

    lines = [json.loads(v[1]) for stream in body["streams"] for v in stream["values"]]
    assert sorted(line["device_id"] for line in lines) == ["cam-1", "door-456"]
    assert all(len(v[1]) <= MAX_LOKI_LINE_BYTES for stream in body["streams"] for v in stream["values"])
    assert [line for line in lines if line["device_id"] == "cam-1"][0]["payload_truncated_bytes"] > MAX_LOKI_LINE_BYTES


# --- how SQS's answers are read ----------------------------------------------------------------------
class ScriptedSQS:
    """Answers SendMessageBatch as told, to show how each kind of answer is read (the live endpoint
    cannot be made to fail in every one of these ways)."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def send_message_batch(self, QueueUrl, Entries):  # noqa: N803 - boto3's names
        self.calls.append([e["MessageBody"] for e in Entries])
        return self.answer(Entries)


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "SendMessageBatch")


def test_a_batch_sqs_refuses_as_too_long_is_resent_one_entry_a_call_and_only_the_culprit_is_refused():
    def answer(entries):
        if len(entries) > 1:
            raise client_error("AWS.SimpleQueueService.BatchRequestTooLong")
        if entries[0]["MessageBody"] == "culprit":
            raise client_error("AWS.SimpleQueueService.BatchRequestTooLong")
        return {"Successful": [{"Id": entries[0]["Id"]}], "Failed": []}

    sqs = ScriptedSQS(answer)

    refused = []
    send_all(sqs, {"q": ["a", "culprit", "b"]}, refusals=refused)

    assert [(tag, code) for tag, code, _ in refused] == [(1, "BatchRequestTooLong")]
    assert sorted(body for call in sqs.calls[1:] for body in call) == ["a", "b", "culprit"]


def test_a_refusal_sqs_blames_on_itself_or_an_unknown_code_fails_the_hand_over():
    for failure in ({"SenderFault": False, "Code": "InternalError"}, {"SenderFault": True, "Code": "MissingParameter"}):
        sqs = ScriptedSQS(
            lambda entries, failure=failure: {"Successful": [], "Failed": [{"Id": entries[0]["Id"], **failure}]}
        )
        with pytest.raises(SendFailed):
            send_all(sqs, {"q": ["a"]})

    def throttle(entries):
        raise client_error("ThrottlingException")

    throttled = ScriptedSQS(throttle)
    with pytest.raises(ClientError):
        send_all(throttled, {"q": ["a", "b"]})


def test_batches_stay_within_ten_entries_and_the_byte_limit():
    sizes = [100_000, 100_000, 100_000, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 250_000]
    sqs = ScriptedSQS(lambda entries: {"Successful": [{"Id": e["Id"]} for e in entries], "Failed": []})

    send_all(sqs, {"q": ["x" * n for n in sizes]}, QueueLimits(max_message_bytes=LIMIT, max_batch_bytes=LIMIT))

    assert sorted(len(b) for call in sqs.calls for b in call) == sorted(sizes)
    assert all(len(call) <= 10 and sum(len(b) for b in call) <= LIMIT for call in sqs.calls)
