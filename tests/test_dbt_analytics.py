"""dbt over the archive, run through the Dagster assets (dagster-dbt) on generated data."""

import hashlib
from datetime import UTC, datetime, timedelta

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import AssetKey, materialize
from pyarrow import fs

from pipeline.analytics import analytics_dbt_models
from pipeline.archive import archive_dir, compact_hour, hour_key
from pipeline.resources import RESOURCES
from pipeline.routing.logs import AttemptLog
from pipeline.stack import s3_filesystem
from tests.helpers import datagen

START = datetime(2024, 3, 4, 0, 0, tzinfo=UTC)


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
    datagen.write_daily_log(
        filesystem, "events-archive", "delivery_attempts", datagen.delivery_attempts_table(events), "attempted_at"
    )
    datagen.write_daily_log(
        filesystem, "events-archive", "priority_handled", datagen.priority_handled_table(events), "handled_at"
    )

    result = dbt_build()

    assert result.success, [e.message for e in result.all_events if e.is_failure]
    failed_tests = [c for c in result.get_asset_check_evaluations() if not c.passed]
    assert result.get_asset_check_evaluations() and not failed_tests
    assert query(analytics_db, "select sum(events) from fct_events_hourly") == [(2000,)]
    assert query(analytics_db, "select count(*) from dim_devices") == [(40,)]
    assert query(analytics_db, "select distinct site_id from fct_edge_buffering where outage_suspected") == [
        ("site-003",)
    ]
    assert query(
        analytics_db,
        "select count(*) from fct_edge_buffering where p95_device_delay_seconds >= 2 or events_with_queued_at != events",
    ) == [(0,)]
    assert query(
        analytics_db,
        "select count(distinct partner) from fct_partner_delivery_sla where success_rate between 0.9 and 1",
    ) == [(3,)]
    assert query(analytics_db, "select count(distinct priority) from fct_priority_latency") == [(3,)]


def test_dbt_build_passes_when_the_routing_logs_are_still_empty(aws, analytics_db):
    archive_generated_events(300, hours=1)

    result = dbt_build()

    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert query(analytics_db, "select count(*) from fct_partner_delivery_sla") == [(0,)]
    assert query(analytics_db, "select count(*) from fct_priority_latency") == [(0,)]
    assert query(analytics_db, "select sum(events) from fct_events_hourly") == [(300,)]


def test_an_hour_compacted_before_queued_at_existed_still_builds_with_its_edge_buffering_unknown(aws, analytics_db):
    filesystem, _ = archive_generated_events(300, hours=2)
    old_hour = archive_dir("events-archive", hour_key(START))
    for info in filesystem.get_file_info(fs.FileSelector(old_hour)):
        pq.write_table(
            pq.read_table(info.path, filesystem=filesystem).drop_columns(["queued_at"]),
            info.path,
            filesystem=filesystem,
        )

    result = dbt_build()

    assert result.success, [e.message for e in result.all_events if e.is_failure]
    rows = query(
        analytics_db,
        "select hour(event_hour_utc), sum(events), sum(events_with_queued_at), count(p95_delay_seconds), count(outage_suspected) from fct_edge_buffering group by 1 order by 1",
    )
    assert rows == [(0, rows[0][1], 0, 0, 0), (1, rows[1][1], rows[1][1], 5, 5)]
    assert query(analytics_db, "select count(*) from fct_edge_buffering where p95_device_delay_seconds is null") == [
        (0,)
    ]


def test_the_asset_graph_runs_from_the_archive_through_staging_to_the_marts():
    from pipeline.definitions import defs

    graph = defs.resolve_asset_graph()

    def parents(name):
        return {key.to_user_string() for key in graph.get(AssetKey(name)).parent_keys}

    assert parents("events_archive") == {"events_landing"}
    assert parents("stg_events") == {"events_archive"}
    assert {"fct_events_hourly", "dim_devices", "fct_edge_buffering"} <= {
        k.to_user_string() for k in graph.get(AssetKey("stg_events")).child_keys
    }
    assert parents("stg_delivery_attempts") == {"delivery_attempts"} and parents("fct_partner_delivery_sla") == {
        "stg_delivery_attempts"
    }
    assert parents("fct_partner_deliveries") == {"stg_delivery_attempts"}
    assert parents("stg_priority_handled") == {"priority_handled"} and parents("fct_priority_latency") == {
        "stg_priority_handled"
    }


def test_events_of_different_sites_sharing_an_event_id_are_all_counted_and_pass_the_uniqueness_tests(aws, analytics_db):
    events = datagen.events_table(200, start=START, hours=1, sites=4, devices_per_site=5)
    # Each site numbers its own events from 1: ids collide across sites, as publishers may choose them.
    events = duckdb.sql(
        "select * replace ('evt-' || row_number() over (partition by site_id order by timestamp) as event_id) from events"
    ).to_arrow_table()
    assert len(set(events.column("event_id").to_pylist())) < 200
    filesystem = s3_filesystem()
    for hour in datagen.write_landing_batches(filesystem, "events-archive", "landing", events):
        compact_hour(filesystem, "events-archive", "landing", hour)

    result = dbt_build()

    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert not [c.check_name for c in result.get_asset_check_evaluations() if not c.passed]
    assert query(analytics_db, "select sum(events) from fct_events_hourly") == [(200,)]


def attempt(partner, webhook_id, n, at, outcome, version, body=None):
    site, event_id = webhook_id.split("/")
    sent = body or f"body of {webhook_id} under {version}".encode()
    return {
        "event_id": event_id,
        "webhook_id": webhook_id,
        "site_id": site,
        "partner": partner,
        "attempt": n,
        "attempted_at": at,
        "status_code": 200 if outcome == "delivered" else 503,
        "latency_ms": 10.0,
        "outcome": outcome,
        "error": None if outcome == "delivered" else "HTTP 503",
        "contract_version": version,
        "body_sha256": hashlib.sha256(sent).hexdigest(),
        "body_bytes": len(sent),
        "webhook_timestamp": at.replace(microsecond=0),
        "archive_hour": "2024-03-04-00:00",
    }


def test_fct_partner_deliveries_has_one_row_per_delivered_webhook_id_per_partner_with_its_contract_and_body_hash(
    aws, analytics_db
):
    filesystem, _ = archive_generated_events(100, hours=1)
    t0 = START + timedelta(hours=10)
    rows = [
        attempt("acme", "site-a/evt-1", 1, t0, "failed", "v1aaaaaaaaaa"),
        attempt("acme", "site-a/evt-1", 2, t0 + timedelta(seconds=1), "delivered", "v1aaaaaaaaaa"),
        attempt("acme", "site-b/evt-1", 1, t0, "delivered", "v1aaaaaaaaaa"),  # another site, the same event id
        attempt("acme", "site-a/evt-2", 1, t0, "failed", "v1aaaaaaaaaa"),
        attempt("acme", "site-a/evt-2", 2, t0 + timedelta(seconds=5), "dead_lettered", "v1aaaaaaaaaa"),
        attempt(
            "acme", "site-a/evt-1", 1, t0 + timedelta(hours=1), "delivered", "v2bbbbbbbbbb"
        ),  # an archive-range replay under a new contract
        attempt("globex", "site-a/evt-1", 1, t0, "delivered", "v9cccccccccc"),
    ]
    log = AttemptLog(filesystem, "events-archive")
    for row in rows:
        log.record(**row)
    log.flush()
    legacy = {
        "event_id": "evt-0",
        "partner": "acme",
        "attempt": 1,
        "attempted_at": t0,
        "status_code": 200,
        "latency_ms": 9.0,
        "outcome": "delivered",
        "error": None,
    }
    datagen.write_daily_log(
        filesystem,
        "events-archive",
        "delivery_attempts",
        pa.Table.from_pylist([legacy], schema=datagen.DELIVERY_SCHEMA),
        "attempted_at",
    )

    result = dbt_build()

    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert not [c.check_name for c in result.get_asset_check_evaluations() if not c.passed]
    got = query(
        analytics_db,
        "select partner, webhook_id, contract_version, attempts, deliveries, contract_versions, distinct_bodies, body_sha256, first_attempt_at, last_attempt_at from fct_partner_deliveries order by partner, webhook_id",
    )
    first = attempt("acme", "site-a/evt-1", 2, t0, "delivered", "v1aaaaaaaaaa")["body_sha256"]
    assert [g[:7] for g in got] == [
        ("acme", "evt-0", None, 1, 1, 0, 0),  # logged before the audit columns: keyed by its event id
        ("acme", "site-a/evt-1", "v1aaaaaaaaaa", 3, 2, 2, 2),
        ("acme", "site-b/evt-1", "v1aaaaaaaaaa", 1, 1, 1, 1),
        ("globex", "site-a/evt-1", "v9cccccccccc", 1, 1, 1, 1),
    ]
    assert got[1][7] == first and got[1][8] == t0 and got[1][9] == t0 + timedelta(hours=1)
    assert query(
        analytics_db,
        "select events, delivered_events, dead_lettered_events from fct_partner_delivery_sla where partner = 'acme'",
    ) == [(4, 3, 1)]
