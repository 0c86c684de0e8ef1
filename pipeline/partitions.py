"""Partitions, declared once: the archive is hourly by event time (UTC).

`end_offset=1` makes the hour in progress a partition too, so the archive follows the stream within
minutes; its compaction simply re-runs as more of the hour lands (it is idempotent).
"""

from dagster import HourlyPartitionsDefinition

archive_hourly_partitions = HourlyPartitionsDefinition(start_date="2024-01-01-00:00", timezone="UTC", end_offset=1)
