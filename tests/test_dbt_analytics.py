"""dbt over the archive, run through the Dagster assets (dagster-dbt) on generated data."""

from datetime import datetime, timezone

import duckdb
import pytest
from dagster import AssetKey, materialize

from pipeline.analytics import analytics_dbt_models
from pipeline.archive import compact_hour
from pipeline.resources import RESOURCES
from pipeline.stack import s3_filesystem
from tests import datagen

START = datetime(2024, 3, 4, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def analytics_db(tmp_path, monkeypatch):
    path = tmp_path / "analytics.duckdb"
    monkeypatch.setenv("DBT_DUCKDB_PATH", str(path))
    return path


def archive_generated_events(n: int, hours: int = 3):
    filesystem = s3_filesystem()
    events = datagen.events_table(n, start=START, hours=hours, sites=5, devices_per_site=8, outage_site="site-003")
    for hour in datagen.write_landing_batches(filesystem, "events-archive", "landing", events, batches_per_hour=2):
        compact_hour(filesystem, "events-archive", "landing", hour)
    return filesystem, events


def dbt_build():
    return materialize([analytics_dbt_models], resources={"dbt": RESOURCES["dbt"]}, raise_on_error=False)


def query(path, sql):
    with duckdb.connect(str(path), read_only=True) as con:
        return con.sql(sql).fetchall()


def test_dbt_build_passes_on_generated_data_and_the_marts_add_up_to_the_archive(aws, analytics_db):
    filesystem, events = archive_generated_events(2000)
    datagen.write_daily_log(filesystem, "events-archive", "delivery_attempts", datagen.delivery_attempts_table(events), "attempted_at")
    datagen.write_daily_log(filesystem, "events-archive", "priority_handled", datagen.priority_handled_table(events), "handled_at")

    result = dbt_build()

    assert result.success, [e.message for e in result.all_events if e.is_failure]
    failed_tests = [c for c in result.get_asset_check_evaluations() if not c.passed]
    assert result.get_asset_check_evaluations() and not failed_tests
    assert query(analytics_db, "select sum(events) from fct_events_hourly") == [(2000,)]
    assert query(analytics_db, "select count(*) from dim_devices") == [(40,)]
    assert query(analytics_db, "select distinct site_id from fct_edge_buffering where outage_suspected") == [("site-003",)]
    assert query(analytics_db, "select count(distinct partner) from fct_partner_delivery_sla where success_rate between 0.9 and 1") == [(3,)]
    assert query(analytics_db, "select count(distinct priority) from fct_priority_latency") == [(3,)]


def test_dbt_build_passes_when_the_routing_logs_are_still_empty(aws, analytics_db):
    archive_generated_events(300, hours=1)

    result = dbt_build()

    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert query(analytics_db, "select count(*) from fct_partner_delivery_sla") == [(0,)]
    assert query(analytics_db, "select count(*) from fct_priority_latency") == [(0,)]
    assert query(analytics_db, "select sum(events) from fct_events_hourly") == [(300,)]


def test_the_asset_graph_runs_from_the_archive_through_staging_to_the_marts():
    from pipeline.definitions import defs

    graph = defs.resolve_asset_graph()

    def parents(name):
        return {key.to_user_string() for key in graph.get(AssetKey(name)).parent_keys}

    assert parents("events_archive") == {"events_landing"}
    assert parents("stg_events") == {"events_archive"}
    assert {"fct_events_hourly", "dim_devices", "fct_edge_buffering"} <= {k.to_user_string() for k in graph.get(AssetKey("stg_events")).child_keys}
    assert parents("stg_delivery_attempts") == {"delivery_attempts"} and parents("fct_partner_delivery_sla") == {"stg_delivery_attempts"}
    assert parents("stg_priority_handled") == {"priority_handled"} and parents("fct_priority_latency") == {"stg_priority_handled"}


def test_events_of_different_sites_sharing_an_event_id_are_all_counted_and_pass_the_uniqueness_tests(aws, analytics_db):
    events = datagen.events_table(200, start=START, hours=1, sites=4, devices_per_site=5)
    # Each site numbers its own events from 1: ids collide across sites, as publishers may choose them.
    events = duckdb.sql("select * replace ('evt-' || row_number() over (partition by site_id order by timestamp) as event_id) from events").to_arrow_table()
    assert len(set(events.column("event_id").to_pylist())) < 200
    filesystem = s3_filesystem()
    for hour in datagen.write_landing_batches(filesystem, "events-archive", "landing", events):
        compact_hour(filesystem, "events-archive", "landing", hour)

    result = dbt_build()

    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert not [c.check_name for c in result.get_asset_check_evaluations() if not c.passed]
    assert query(analytics_db, "select sum(events) from fct_events_hourly") == [(200,)]
