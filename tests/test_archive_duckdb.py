"""Analysts read the archive where it is: DuckDB over s3:// (the local endpoint here), hive-partitioned."""

from datetime import UTC, datetime

from pipeline import analyst
from pipeline.archive import compact_hour
from pipeline.stack import s3_filesystem
from tests.helpers import datagen

START = datetime(2024, 3, 4, 0, 0, tzinfo=UTC)


def test_duckdb_reads_the_archive_over_s3_with_hour_partitions_from_the_path(aws):
    filesystem = s3_filesystem()
    table = datagen.events_table(1500, start=START, hours=3)
    for hour in datagen.write_landing_batches(filesystem, "events-archive", "landing", table, batches_per_hour=3):
        compact_hour(filesystem, "events-archive", "landing", hour)

    con = analyst.connect()
    rows = con.sql(
        f"select year, month, day, hour, count(*), count(distinct event_id) from {analyst.read_archive_sql('events-archive')} "
        "group by all order by hour"
    ).fetchall()

    per_hour = {int(r[3]): r[4] for r in rows}
    assert sum(per_hour.values()) == 1500 and set(per_hour) == {0, 1, 2}
    assert all(r[4] == r[5] for r in rows), "each event once"
    assert {(int(r[0]), int(r[1]), int(r[2])) for r in rows} == {(2024, 3, 4)}
