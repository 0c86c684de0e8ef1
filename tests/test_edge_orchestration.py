"""The edge code location: the 02:00 site-local DLQ replay schedule and its job against a running service."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from dagster import DagsterInvalidConfigError, DefaultScheduleStatus, build_schedule_context

from edge_bridge.orchestration import EdgeAdminResource, defs, edge_dlq_replay_job
from tests.conftest import publish, wait_until
from tests.test_edge_faults import Collector, make_events


def test_replay_schedule_fires_at_two_in_the_morning_site_time(monkeypatch):
    monkeypatch.setenv("EDGE_SITE_TIMEZONE", "Europe/Berlin")
    schedule = defs().get_schedule_def("edge_dlq_replay_0200")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 2 * * *", "Europe/Berlin")
    context = build_schedule_context(
        scheduled_execution_time=datetime(2024, 1, 15, 2, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    )
    [request] = list(schedule.evaluate_tick(context).run_requests)
    assert (
        schedule.job_name == "edge_dlq_replay_job" and request.tags["dagster/schedule_name"] == "edge_dlq_replay_0200"
    )


def test_replay_schedule_is_on_without_anyone_switching_it_on():
    """A site's nightly replay that waits for someone to find it in the UI never runs (the daemon's view: tests/test_dagster_operations.py)."""
    assert defs().get_schedule_def("edge_dlq_replay_0200").default_status == DefaultScheduleStatus.RUNNING


def test_replay_job_delivers_the_dlq_of_a_running_service_with_the_token_from_the_environment(
    edge_factory, mosquitto, aws, monkeypatch
):
    from pipeline.stack import aws_client

    url = aws.provisioned.queues["events"]
    sqs = aws_client("sqs")
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"MaximumMessageSize": "1024"})
    edge = edge_factory(EDGE_RETRY_BACKOFF_S="0.1")
    admin = edge.admin()
    [poison] = make_events(1, tag="big", payload_bytes=2000)
    publish(mosquitto.port, poison.topic, [poison.to_json()])
    wait_until(lambda: admin.status()["dlq_size"] == 1, 30, message="the event in the DLQ")
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"MaximumMessageSize": "262144"})

    monkeypatch.setenv("EDGE_ADMIN_URL", edge.admin_url)  # EDGE_ADMIN_TOKEN is set by edge_factory, as at a site
    result = defs().get_job_def("edge_dlq_replay_job").execute_in_process()
    assert result.success and result.output_for_node("replay_edge_dlq") == 1
    collector = Collector(url)
    wait_until(lambda: collector.has_all({poison.event_id}), 30, message="the replayed event in SQS")


def test_replay_job_without_edge_admin_token_in_its_environment_fails_naming_it(monkeypatch):
    """The token is read when the run starts, so a site without it gets a run that says what is missing."""
    monkeypatch.delenv("EDGE_ADMIN_TOKEN", raising=False)
    with pytest.raises(DagsterInvalidConfigError, match="EDGE_ADMIN_TOKEN"):
        defs().get_job_def("edge_dlq_replay_job").execute_in_process()


def test_replay_job_sends_the_token_its_resource_holds_not_one_it_finds_elsewhere(edge_factory):
    edge = edge_factory()  # the right token is in this process's environment too
    resource = EdgeAdminResource(admin_url=edge.admin_url, admin_token="not-the-token")
    result = edge_dlq_replay_job.execute_in_process(resources={"edge_admin": resource}, raise_on_error=False)
    [failure] = [event.step_failure_data.error.cause.message for event in result.all_events if event.is_step_failure]
    assert "401" in failure and "wrong admin token" in failure
