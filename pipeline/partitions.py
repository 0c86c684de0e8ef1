"""Partitions, declared once: the archive is hourly by event time (UTC).

`end_offset=1` makes the hour in progress a partition too, so the archive follows the stream within
minutes; its compaction simply re-runs as more of the hour lands (it is idempotent).
"""

from datetime import UTC, datetime

from dagster import HourlyPartitionsDefinition

ARCHIVE_START = datetime(2024, 1, 1, tzinfo=UTC)  # the first hour; earlier event times: see archive_hour

archive_hourly_partitions = HourlyPartitionsDefinition(
    start_date=f"{ARCHIVE_START:%Y-%m-%d-%H:%M}", timezone="UTC", end_offset=1
)
