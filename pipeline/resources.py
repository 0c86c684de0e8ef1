"""Dagster resources: thin, configurable handles on SQS and the archive bucket.

Endpoint and credentials default to the standard AWS environment, read when a run uses them, so the
same definitions reach the local emulator in dev and AWS in production.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dagster import ConfigurableResource, EnvVar
from dagster_aws.utils import ResourceWithBoto3Configuration
from dagster_dbt import DbtCliResource
from pyarrow import fs

from pipeline import stack

DBT_PROJECT_DIR = stack.PROJECT_ROOT / "dbt"


def dbt_executable() -> str:
    """dbt from this interpreter's environment (the .venv), which need not be on PATH."""
    beside = Path(sys.executable).parent / "dbt"
    return str(beside) if beside.exists() else "dbt"


class _AwsEndpoint(ResourceWithBoto3Configuration):
    def _client(self, service: str):
        return stack.aws_client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=self.region_name,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token,
        )


class SQSResource(_AwsEndpoint):
    """SQS for the pipeline (dagster-aws ships S3 but no SQS resource)."""

    events_queue: str = "events"

    def get_client(self):
        return self._client("sqs")

    def queue_url(self, name: str | None = None) -> str:
        return self.get_client().get_queue_url(QueueName=name or self.events_queue)["QueueUrl"]


class ArchiveStore(_AwsEndpoint):
    """The archive bucket, as a pyarrow filesystem for Parquet and a boto3 client for the rest."""

    bucket: str = "events-archive"
    landing_prefix: str = "landing"

    def filesystem(self) -> fs.FileSystem:
        return stack.s3_filesystem(
            self.endpoint_url, self.region_name, self.aws_access_key_id, self.aws_secret_access_key
        )

    def get_client(self):
        return self._client("s3")


class DrainSettings(ConfigurableResource):
    """How much one drain run takes, and how many may run at once."""

    window_messages: int = 5000
    window_seconds: float = 60.0
    max_concurrent_runs: int = 2


class RoutingSettings(ConfigurableResource):
    """The routing config (config/routing.yaml unless PIPELINE_ROUTING_CONFIG or `config_path` says
    otherwise), loaded when a run or tick uses it, and the time budget of one partner delivery run."""

    config_path: str | None = None
    delivery_run_seconds: float = 60.0

    def load(self):
        from pipeline.routing.config import load_routing_config

        return load_routing_config(self.config_path)


# Shared by every module of the code location; configured from the environment when a run starts.
RESOURCES = {
    "sqs": SQSResource(events_queue=EnvVar("PIPELINE_EVENTS_QUEUE")),
    "archive": ArchiveStore(bucket=EnvVar("PIPELINE_ARCHIVE_BUCKET")),
    "drain_settings": DrainSettings(),
    "routing": RoutingSettings(),
    "dbt": DbtCliResource(
        project_dir=str(DBT_PROJECT_DIR), profiles_dir=str(DBT_PROJECT_DIR), dbt_executable=dbt_executable()
    ),
}
