"""`python -m pipeline.consumers`: run the priority consumer until SIGTERM/SIGINT.

Environment: PIPELINE_CONSUMER_STORE_URL (postgresql://user@host:port/db: the store every replica shares;
unset: the DuckDB file PIPELINE_CONSUMER_DB, default .consumer/consumer.duckdb),
PIPELINE_CONSUMER_METRICS_PORT (/metrics, default 9102; empty disables), PIPELINE_ARCHIVE_BUCKET
(where the priority_handled log goes; unset: not exported), PIPELINE_ROUTING_CONFIG, PIPELINE_STACK_CONFIG
(the claim-check bucket that events too big for SQS are fetched from), and the standard AWS variables.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from pipeline.consumers.service import ConsumerSettings, PriorityConsumer
from pipeline.routing.config import load_routing_config
from pipeline.stack import PROJECT_ROOT, aws_client, s3_filesystem


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    port = os.environ.get("PIPELINE_CONSUMER_METRICS_PORT", "9102")
    bucket = os.environ.get("PIPELINE_ARCHIVE_BUCKET") or None
    settings = ConsumerSettings(
        db_path=os.environ.get("PIPELINE_CONSUMER_DB", str(PROJECT_ROOT / ".consumer" / "consumer.duckdb")),
        store_url=os.environ.get("PIPELINE_CONSUMER_STORE_URL") or None,
        metrics_port=int(port) if port else None,
        archive_bucket=bucket,
    )
    consumer = PriorityConsumer(
        load_routing_config(), aws_client("sqs"), settings, s3_filesystem() if bucket else None, aws_client("s3")
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    consumer.start()
    stop.wait()
    logging.getLogger(__name__).info("stopping: finishing pending batches and exporting the handling log")
    consumer.stop()


if __name__ == "__main__":
    main()
