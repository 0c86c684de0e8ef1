"""dbt analytics over the archive, as Dagster assets (dagster-dbt).

The dbt sources map onto `events_archive`, `delivery_attempts` and `priority_handled` through
`meta.dagster.asset_key`, so the asset graph runs archive -> staging -> marts in one picture. The
manifest is read at import: outside `dagster dev`, run `dbt parse` first (`make test` and `make demo`
do), otherwise loading this code location fails on the missing manifest.
"""

from dagster import (
    AssetExecutionContext,
    DefaultScheduleStatus,
    Definitions,
    ScheduleDefinition,
    define_asset_job,
    in_process_executor,
)
from dagster_dbt import DagsterDbtTranslator, DbtCliResource, DbtProject, dbt_assets

from pipeline.analyst import install_httpfs
from pipeline.resources import DBT_PROJECT_DIR

dbt_project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)
dbt_project.prepare_if_dev()


class AnalyticsTranslator(DagsterDbtTranslator):
    """dbt models sit in one `analytics` group next to the archive groups."""

    def get_group_name(self, dbt_resource_props) -> str | None:
        return (
            "analytics"
            if dbt_resource_props["resource_type"] == "model"
            else super().get_group_name(dbt_resource_props)
        )


@dbt_assets(manifest=dbt_project.manifest_path, project=dbt_project, dagster_dbt_translator=AnalyticsTranslator())
def analytics_dbt_models(context: AssetExecutionContext, dbt: DbtCliResource):
    """`dbt build`: staging views and mart tables over the archive, with their dbt tests."""
    install_httpfs()  # offline install from the wheel, so the profile's `httpfs` needs no download
    yield from dbt.cli(["build"], context=context).stream()


dbt_build_job = define_asset_job(
    "dbt_build_job",
    selection=[analytics_dbt_models],
    description="Rebuild the dbt staging models and marts over the archive, running their tests.",
    executor_def=in_process_executor,
)

dbt_daily_schedule = ScheduleDefinition(
    name="dbt_daily_build",
    job=dbt_build_job,
    cron_schedule="0 3 * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    description=(
        "Daily dbt build at 03:00 UTC: after the 02:00 DLQ replays have gone through drain and hourly "
        "compaction, so yesterday's marts include the replayed events."
    ),
)

defs = Definitions(assets=[analytics_dbt_models], jobs=[dbt_build_job], schedules=[dbt_daily_schedule])
