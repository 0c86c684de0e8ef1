"""`archive_replay_job` re-sends an archive time range to one partner, under its current contract.

Real parts: the archive is written by the pipeline's own landing + compaction code into the local S3,
the job runs through the code location's Definitions, delivery is the partner's usual
`partner_delivery_job`, and the partner is a real HTTP receiver that verifies every signature with the
standardwebhooks library and de-duplicates by webhook-id.
"""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime, timedelta

import pytest

from devstack.partner_receiver import PartnerReceiver
from pipeline.archive import compact_hour, write_landing
from pipeline.archive_range import ReplayRangeError, hours_in_range, parse_utc
from pipeline.routing.config import load_routing_config
from pipeline.routing.provisioning import provision_routing
from pipeline.stack import aws_client, s3_filesystem
from tests.conftest import sample_envelope
from tests.test_routing_config import routing_file

T10 = datetime(2024, 1, 15, 10, 0, tzinfo=UTC)
START, END = "2024-01-15T10:00:00Z", "2024-01-15T12:00:00Z"


def event(event_type: str, at: datetime, n: int):
    return sample_envelope(
        event_type=event_type,
        device_id=f"dev-{n}",
        timestamp=at,
        payload={"zone": f"z{n}", "credential": f"card-{n}", "note": "internal"},
    )


@pytest.fixture
def archived(aws):
    """Events around a two-hour range, archived exactly as drain runs + compaction leave them."""
    inside = [
        event(t, T10 + timedelta(minutes=17 * i), i)
        for i, t in enumerate(["door_access", "intrusion_alert", "motion"] * 3)
    ]
    outside = [
        event("door_access", T10 - timedelta(seconds=1), 90),
        event("intrusion_alert", T10 + timedelta(hours=2), 91),
    ]
    filesystem = s3_filesystem()
    ingested = datetime.now(UTC)
    hours = write_landing(filesystem, "events-archive", "landing", inside + outside, "run-a", ingested)
    write_landing(
        filesystem, "events-archive", "landing", inside[:4], "run-b-redelivered", ingested
    )  # SQS redelivered a window
    for hour in hours:
        compact_hour(filesystem, "events-archive", "landing", hour)
    return inside, outside


@pytest.fixture
def newco(tmp_path, aws, monkeypatch):
    """A partner onboarded today, with today's rules: whitelist, strip, rename."""
    receiver = PartnerReceiver("whsec_" + base64.b64encode(os.urandom(24)).decode()).start()
    monkeypatch.setenv("PARTNER_NEWCO_SECRET", receiver.secret)
    partner = {
        "name": "newco",
        "webhook": receiver.url,
        "secret_env": "PARTNER_NEWCO_SECRET",
        "subscriptions": ["door_access", "intrusion_alert"],
        "allowed_fields": ["event_id", "event_type", "timestamp", "site_id", "payload.zone", "payload.credential"],
        "transform": {"strip_fields": ["credential"], "rename": {"site_id": "location_id", "timestamp": "event_time"}},
        "timeout_s": 5,
    }
    path = routing_file(tmp_path, [partner])
    monkeypatch.setenv("PIPELINE_ROUTING_CONFIG", str(path))
    provision_routing(aws_client("sqs"), load_routing_config(path))
    yield receiver
    receiver.stop()


def run_job(name: str, op: str, config: dict):
    from pipeline.definitions import defs

    return defs.get_job_def(name).execute_in_process(run_config={"ops": {op: {"config": config}}})


def replay_and_deliver(partner: str = "newco") -> int:
    replay = run_job(
        "archive_replay_job", "replay_archive_range_to_partner", {"partner": partner, "start": START, "end": END}
    )
    assert replay.success
    delivery = run_job("partner_delivery_job", "deliver_partner_queue", {"partner": partner})
    assert delivery.success
    return replay.output_for_node("replay_archive_range_to_partner")


def test_a_replayed_range_reaches_the_partner_once_per_subscribed_event_id(archived, newco):
    inside, _ = archived

    queued = replay_and_deliver()

    expected = {e.dedupe_id for e in inside if e.event_type != "motion"}
    assert queued == len(expected)
    assert set(newco.accepted) == expected
    assert newco.duplicates == 0 and newco.rejected_signatures == 0


def test_replayed_bodies_follow_the_partners_current_transform(archived, newco):
    inside, _ = archived

    replay_and_deliver()

    for e in inside:
        if e.event_type == "motion":
            continue
        assert newco.accepted[e.dedupe_id] == {
            "event_id": e.event_id,
            "event_type": e.event_type,
            "event_time": e.timestamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "location_id": e.site_id,
            "payload": {"zone": e.payload["zone"]},
        }


def test_replaying_a_range_twice_is_absorbed_by_the_partners_webhook_id_dedupe(archived, newco):
    inside, _ = archived
    replay_and_deliver()

    replay_and_deliver()

    expected = {e.dedupe_id for e in inside if e.event_type != "motion"}
    assert set(newco.accepted) == expected
    assert newco.duplicates == len(expected), "the second replay carries the same webhook-ids"


def test_a_replay_states_the_contract_it_used_records_it_and_delivers_under_it(archived, newco):
    from pipeline.routing.config import contract_version

    version = load_routing_config().partner("newco").contract_version
    replay = run_job(
        "archive_replay_job", "replay_archive_range_to_partner", {"partner": "newco", "start": START, "end": END}
    )
    [output] = [e for e in replay.all_events if e.event_type_value == "STEP_OUTPUT"]
    assert output.event_specific_data.metadata["contract_version"].value == version

    run_job("partner_delivery_job", "deliver_partner_queue", {"partner": "newco"})

    assert {r.contract_version for r in newco.requests} == {version}
    recorded = (
        aws_client("s3")
        .get_object(Bucket="events-archive", Key=f"partner_contracts/newco/{version}.json")["Body"]
        .read()
        .decode()
    )
    assert contract_version(recorded) == version


def test_an_unknown_partner_fails_the_run_naming_the_known_ones(archived, newco):
    from pipeline.definitions import defs

    result = defs.get_job_def("archive_replay_job").execute_in_process(
        run_config={
            "ops": {"replay_archive_range_to_partner": {"config": {"partner": "nobody", "start": START, "end": END}}}
        },
        raise_on_error=False,
    )

    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    error = failure.step_failure_data.error.to_string()
    assert "no partner named 'nobody'" in error and "newco" in error


def test_a_range_is_read_hour_by_hour_and_a_bad_range_is_refused():
    assert hours_in_range(parse_utc("2024-01-15T10:30:00Z"), parse_utc("2024-01-15T12:00:00Z")) == [
        "2024-01-15-10:00",
        "2024-01-15-11:00",
    ]
    with pytest.raises(ReplayRangeError, match="not after start"):
        hours_in_range(parse_utc(END), parse_utc(START))
    with pytest.raises(ReplayRangeError, match="no UTC offset"):
        parse_utc("2024-01-15T10:00:00")
    with pytest.raises(ReplayRangeError, match="longer than 93 days"):
        hours_in_range(parse_utc("2024-01-01T00:00:00Z"), parse_utc("2024-06-01T00:00:00Z"))
