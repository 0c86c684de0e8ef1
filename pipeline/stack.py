"""The stack configuration (`config/stack.yaml`) and the boto3 clients that reach it.

Clients honour the standard AWS environment (AWS_ENDPOINT_URL, AWS_REGION, credentials), so the code
that talks to the local emulator in dev is the code that talks to AWS.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import boto3
import yaml
from botocore.config import Config
from pydantic import BaseModel, ConfigDict, Field

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "config" / "stack.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeadLetterConfig(_Strict):
    name: str
    max_receive_count: int = Field(3, ge=1, le=1000)


class EventsQueueConfig(_Strict):
    name: str = "events"
    fifo: bool = False
    visibility_timeout_s: int = Field(300, ge=0, le=43200)
    retention_s: int = Field(1209600, ge=60, le=1209600)
    max_message_bytes: int = Field(262144, ge=1024, le=1048576)
    dead_letter: DeadLetterConfig = DeadLetterConfig(name="events-dlq")

    @property
    def queue_name(self) -> str:
        return f"{self.name}.fifo" if self.fifo else self.name

    @property
    def dlq_name(self) -> str:
        return f"{self.dead_letter.name}.fifo" if self.fifo else self.dead_letter.name


class PriorityDeadLetterConfig(_Strict):
    max_receive_count: int = Field(5, ge=1, le=1000)


class PriorityQueuesConfig(_Strict):
    """The priority queues (named in `config/routing.yaml`) that the priority consumer reads.

    Each redrives to `dead_letter_queue_name(queue)` after `max_receive_count` receives, so a message
    the consumer never manages to commit stops coming back ahead of the queue.
    """

    dead_letter: PriorityDeadLetterConfig = PriorityDeadLetterConfig()


def dead_letter_queue_name(queue_name: str) -> str:
    """`events-high` -> `events-high-dlq`; a FIFO queue's DLQ must be FIFO too: `x.fifo` -> `x-dlq.fifo`."""
    if queue_name.endswith(".fifo"):
        return f"{queue_name[: -len('.fifo')]}-dlq.fifo"
    return f"{queue_name}-dlq"


class ArchiveConfig(_Strict):
    bucket: str = "events-archive"
    landing_prefix: str = "landing"


class ClaimCheckConfig(_Strict):
    bucket: str = "events-claim-check"


class StackConfig(_Strict):
    region: str = "us-east-1"
    events_queue: EventsQueueConfig = EventsQueueConfig()
    priority_queues: PriorityQueuesConfig = PriorityQueuesConfig()
    archive: ArchiveConfig = ArchiveConfig()
    claim_check: ClaimCheckConfig = ClaimCheckConfig()


def load_stack_config(path: str | Path | None = None) -> StackConfig:
    path = Path(path or os.environ.get("PIPELINE_STACK_CONFIG", DEFAULT_CONFIG))
    return StackConfig.model_validate(yaml.safe_load(path.read_text()) or {})


def endpoint_url() -> str | None:
    """The AWS endpoint override, if any (the local emulator in dev and tests)."""
    return os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or load_stack_config().region


_CLIENT_CONFIG = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=3, read_timeout=25)


def aws_client(service: str, **overrides):
    """A boto3 client for `service`; endpoint and region come from the environment unless overridden."""
    kwargs = {"region_name": region(), "config": _CLIENT_CONFIG}
    if url := endpoint_url():
        kwargs["endpoint_url"] = url
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return boto3.session.Session().client(service, **kwargs)


@lru_cache(maxsize=64)
def _cached_queue_url(endpoint: str | None, name: str) -> str:
    return aws_client("sqs").get_queue_url(QueueName=name)["QueueUrl"]


def queue_url(name: str) -> str:
    return _cached_queue_url(endpoint_url(), name)


def s3_filesystem(
    endpoint: str | None = None,
    region_name: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
):
    """A pyarrow S3 filesystem on the same endpoint and credentials as the boto3 clients."""
    from pyarrow import fs

    kwargs = {"region": region_name or region()}
    if url := endpoint or endpoint_url():
        scheme, _, host = url.partition("://")
        kwargs.update(endpoint_override=host, scheme=scheme)
    access_key = access_key or os.environ.get("AWS_ACCESS_KEY_ID")
    if access_key:
        kwargs.update(access_key=access_key, secret_key=secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY"))
    return fs.S3FileSystem(**kwargs)
