"""The edge code location: the 02:00 site-local DLQ replay as a Dagster schedule, visible in the UI.

The job holds no retry-log logic: the edge service owns its DuckDB file, so the op asks the service's
admin API to replay (`POST /dlq/replay`) and records how many events went back in line. That endpoint
needs the service's token, which the resource takes from `EDGE_ADMIN_TOKEN` when the run starts (an
`EnvVar`, so the secret never lands in run config or the UI).
"""

import os

from dagster import (
    ConfigurableResource,
    DefaultScheduleStatus,
    Definitions,
    EnvVar,
    OpExecutionContext,
    ScheduleDefinition,
    definitions,
    job,
    op,
)

from edge_bridge.cli import AdminClient

DEFAULT_ADMIN_URL = "http://127.0.0.1:9108"


class EdgeAdminResource(ConfigurableResource):
    """The admin API of the site's edge service; without `admin_token` the client reads EDGE_ADMIN_TOKEN itself."""

    admin_url: str = DEFAULT_ADMIN_URL
    admin_token: str | None = None

    def client(self) -> AdminClient:
        return AdminClient(self.admin_url, token=self.admin_token)


@op(description="Ask the edge service to move every local DLQ job back to its retry log for delivery.")
def replay_edge_dlq(context: OpExecutionContext, edge_admin: EdgeAdminResource) -> int:
    client = edge_admin.client()
    before = client.status()
    replayed = client.dlq_replay()
    context.log.info(f"replayed {replayed} DLQ events at site {before['site_id']}")
    context.add_output_metadata(
        {"replayed": replayed, "site_id": before["site_id"], "jobs_pending_before": before["jobs_pending"]}
    )
    return replayed


@job(description="Replay the edge service's local DLQ through its admin API.")
def edge_dlq_replay_job():
    replay_edge_dlq()


def edge_dlq_replay_schedule(timezone: str) -> ScheduleDefinition:
    return ScheduleDefinition(
        name="edge_dlq_replay_0200",
        job=edge_dlq_replay_job,
        cron_schedule="0 2 * * *",
        execution_timezone=timezone,
        default_status=DefaultScheduleStatus.RUNNING,  # the site's nightly replay must not wait for someone to switch it on
        description=(
            "Daily at 02:00 site time: events that failed three SQS attempts get another chance, "
            "at the quietest hour, after any overnight outage has usually cleared."
        ),
    )


@definitions
def defs() -> Definitions:
    """Built when the code location loads, so the site's timezone and admin URL come from its environment;
    the token is an EnvVar, resolved in each run."""
    admin_url = EnvVar("EDGE_ADMIN_URL") if os.environ.get("EDGE_ADMIN_URL") else DEFAULT_ADMIN_URL
    return Definitions(
        jobs=[edge_dlq_replay_job],
        schedules=[edge_dlq_replay_schedule(os.environ.get("EDGE_SITE_TIMEZONE", "UTC"))],
        resources={"edge_admin": EdgeAdminResource(admin_url=admin_url, admin_token=EnvVar("EDGE_ADMIN_TOKEN"))},
    )
