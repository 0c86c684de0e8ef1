"""The `pipeline` code location: one Definitions, merged from the modules that each contribute theirs."""

from dagster import Definitions

from pipeline import analytics, archive_replay, assets, partner_jobs, reconciliation_checks, replay, sensors
from pipeline.resources import RESOURCES

defs = Definitions.merge(
    Definitions(resources=RESOURCES),
    assets.defs,
    sensors.defs,
    analytics.defs,
    partner_jobs.defs,
    replay.defs,
    archive_replay.defs,
    reconciliation_checks.defs,
)
