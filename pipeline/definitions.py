"""The `pipeline` code location: one Definitions assembled from its modules."""

from dagster import Definitions, EnvVar

from pipeline.assets import events_archive, events_landing
from pipeline.jobs import drain_events_job
from pipeline.resources import ArchiveStore, DrainSettings, SQSResource
from pipeline.sensors import archive_hours_sensor, archive_job, events_queue_sensor

defs = Definitions(
    assets=[events_landing, events_archive],
    jobs=[drain_events_job, archive_job],
    sensors=[events_queue_sensor, archive_hours_sensor],
    resources={
        "sqs": SQSResource(events_queue=EnvVar("PIPELINE_EVENTS_QUEUE")),
        "archive": ArchiveStore(bucket=EnvVar("PIPELINE_ARCHIVE_BUCKET")),
        "drain_settings": DrainSettings(),
    },
)
