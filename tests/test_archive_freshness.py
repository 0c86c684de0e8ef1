"""archival_lag_minutes comes from the data, on a timer: it grows while compaction does not run, and a
real Prometheus fires ArchivalLagHigh on it and ArchiveFreshnessStale when the timer stops pushing.

Real parts: the local S3, a Pushgateway, Prometheus with the shipped rules (for the live test only
ArchivalLagHigh's `for:` is 0 s and the staleness threshold 8 s instead of 600 s, so it runs in seconds;
promtool pins the shipped values in alerts_freshness_test.yml). The landing files' ingested_at times are
chosen by the test, so an event can have waited almost 90 minutes when the test starts.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import yaml
from dagster import build_sensor_context, materialize

from devstack.processes import PROMETHEUS_CONFIG, Prometheus, Pushgateway
from edge_bridge.envelope import utc_now
from pipeline.archive import compact_hour, hour_key, write_landing
from pipeline.assets import events_archive
from pipeline.freshness import measure_archive_freshness
from pipeline.resources import ArchiveStore
from pipeline.sensors import archive_freshness_sensor
from tests.conftest import sample_envelope, wait_until

BUCKET = "events-archive"


def store() -> ArchiveStore:
    return ArchiveStore(bucket=BUCKET)


def land(envelopes, batch_id: str, ingested_minutes_ago: float) -> None:
    write_landing(
        store().filesystem(),
        BUCKET,
        "landing",
        envelopes,
        batch_id,
        utc_now() - timedelta(minutes=ingested_minutes_ago),
    )


def events(n: int, hours_ago: int = 2, prefix: str = "door"):
    at = utc_now().replace(minute=30, second=0, microsecond=0) - timedelta(hours=hours_ago)
    return [sample_envelope(device_id=f"{prefix}-{i}", timestamp=at + timedelta(seconds=i)) for i in range(n)]


def freshness():
    return measure_archive_freshness(store().get_client(), BUCKET, "landing", utc_now(), store().filesystem())


def test_the_lag_is_the_age_of_the_oldest_landed_event_that_compaction_has_not_archived(aws):
    assert freshness().lag_minutes == 0.0, "an empty bucket has nothing waiting"
    first = events(3)
    land(first, "batch-1", ingested_minutes_ago=30)

    waiting = freshness()
    assert waiting.lag_minutes == pytest.approx(30, abs=0.5) and waiting.unarchived_files == 1

    compact_hour(store().filesystem(), BUCKET, "landing", hour_key(first[0].timestamp))
    assert freshness().lag_minutes == 0.0, "compacted: nothing is waiting"

    land(events(2, prefix="late"), "batch-2", ingested_minutes_ago=5)
    land(events(2, hours_ago=5, prefix="older-hour"), "batch-3", ingested_minutes_ago=12)

    after = freshness()
    assert after.unarchived_files == 2, "the compacted batch no longer counts; both new ones do"
    assert after.lag_minutes == pytest.approx(5, abs=0.5), (
        "the oldest *landed* file is batch-2 (its events were ingested 5 minutes ago)"
    )


def test_events_stamped_ahead_of_the_clock_do_not_count_until_their_hour_opens(aws):
    next_hour = utc_now().replace(minute=0, second=0, microsecond=0) + timedelta(hours=1, seconds=10)
    ahead = [sample_envelope(device_id="ahead", timestamp=next_hour, received_at=utc_now())]
    land(ahead, "batch-future", ingested_minutes_ago=40)

    assert freshness().lag_minutes == 0.0


def test_events_older_than_the_lookback_are_not_listed(aws):
    land(events(1, hours_ago=30), "batch-old", ingested_minutes_ago=50)

    assert (
        measure_archive_freshness(
            store().get_client(), BUCKET, "landing", utc_now(), store().filesystem(), lookback=24
        ).lag_minutes
        == 0.0
    )
    assert measure_archive_freshness(
        store().get_client(), BUCKET, "landing", utc_now(), store().filesystem(), lookback=48
    ).lag_minutes == pytest.approx(50, abs=0.5)


def live_test_rules(tmp_path):
    """The shipped alerts.yml with two changes that only make the live test fast (promtool pins the shipped ones)."""
    rules = yaml.safe_load((PROMETHEUS_CONFIG.parent / "alerts.yml").read_text())
    wanted = {"ArchivalLagHigh", "ArchiveFreshnessStale"}
    picked = [rule for group in rules["groups"] for rule in group["rules"] if rule["alert"] in wanted]
    assert {rule["alert"] for rule in picked} == wanted
    for rule in picked:
        rule.pop("for", None)
        assert rule["alert"] != "ArchiveFreshnessStale" or "> 600" in rule["expr"]
        rule["expr"] = rule["expr"].replace("> 600", "> 8")
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump({"groups": [{"name": "freshness", "rules": picked}]}))
    template = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    template["rule_files"] = ["alerts.yml"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(template))
    return tmp_path / "prometheus.yml"


@pytest.fixture
def monitoring(tmp_path, monkeypatch):
    gateway = Pushgateway(tmp_path / "pushgateway").start()
    monkeypatch.setenv("PIPELINE_PUSHGATEWAY_URL", gateway.url)
    prometheus = Prometheus(
        tmp_path / "prometheus", targets={"pushgateway": [gateway.target]}, template=live_test_rules(tmp_path)
    ).start()
    yield prometheus
    prometheus.stop()
    gateway.stop()


def firing(prometheus: Prometheus, alert: str) -> list[dict]:
    return prometheus.query(f'ALERTS{{alertname="{alert}", alertstate="firing"}}')


def pushed_lag(prometheus: Prometheus) -> float | None:
    result = prometheus.query('archival_lag_minutes{job="pipeline_archive", instance="freshness"}')
    return float(result[0]["value"][1]) if result else None


def test_with_compaction_blocked_the_lag_grows_on_the_timer_and_the_alerts_fire_in_prometheus(aws, monitoring):
    prometheus = monitoring
    first = events(3)
    land(first, "batch-1", ingested_minutes_ago=10)
    hour = hour_key(first[0].timestamp)
    assert materialize([events_archive], partition_key=hour, resources={"archive": store()}).success
    wait_until(lambda: pushed_lag(prometheus) == 0.0, 30, message="the compaction's lag of 0 in Prometheus")

    # From here compaction never runs; this batch's events were taken from SQS 90 minutes less 15 s ago.
    land(events(2, prefix="blocked"), "batch-2", ingested_minutes_ago=90 - 0.25)
    ticks = []

    def tick_and_check():
        ticks.append(archive_freshness_sensor(build_sensor_context(resources={"archive": store()})).skip_message)
        return firing(prometheus, "ArchivalLagHigh")

    tick_and_check()
    first_seen = wait_until(lambda: pushed_lag(prometheus) or None, 30, message="the timer's first lag in Prometheus")
    assert 89 < first_seen < 90 and not firing(prometheus, "ArchivalLagHigh"), ticks[-1]

    [alert] = wait_until(tick_and_check, 60, interval=1.0, message=f"ArchivalLagHigh to fire; last tick: {ticks[-1]}")

    assert alert["metric"]["instance"] == "freshness"
    assert pushed_lag(prometheus) > 90 > first_seen - 1, "the lag grew past 90 with no compaction"
    assert "batch-2.parquet of 1" in ticks[-1]
    assert not firing(prometheus, "ArchiveFreshnessStale"), "a timer that ticks every second is not stale"

    # The timer stops (sensor off, daemon down): the last value stays, and the staleness alert says so.
    [stale] = wait_until(
        lambda: firing(prometheus, "ArchiveFreshnessStale"), 60, interval=0.5, message="ArchiveFreshnessStale to fire"
    )
    assert stale["metric"]["job"] == "pipeline_archive"

    # Compaction runs again: it archives the batch and pushes the data's lag (0) at once.
    assert materialize([events_archive], partition_key=hour, resources={"archive": store()}).success
    wait_until(
        lambda: not firing(prometheus, "ArchivalLagHigh") and not firing(prometheus, "ArchiveFreshnessStale"),
        30,
        message="both alerts to clear",
    )
    assert pushed_lag(prometheus) == 0.0


def test_the_freshness_timer_is_on_by_default_and_ticks_every_minute():
    from dagster import DefaultSensorStatus

    from pipeline.definitions import defs

    sensor = defs.get_sensor_def("archive_freshness_sensor")
    assert sensor.default_status == DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 60
