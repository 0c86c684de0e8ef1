"""`python -m edge_bridge`: run the edge service until SIGTERM / Ctrl-C."""

from __future__ import annotations

import gc
import logging
import signal
import threading

from edge_bridge.config import EdgeConfig
from edge_bridge.service import EdgeService


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s edge %(levelname)s %(message)s")
    config = EdgeConfig.from_env()
    service = EdgeService(config).start()
    # What is loaded by now (boto3's models, pydantic, DuckDB) lives as long as the process: out of the
    # collector's sight, the collections that a flow of messages sets off stay small (~10% more
    # events/s into the retry log on the edge benchmark).
    gc.freeze()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    service.stop()


if __name__ == "__main__":
    main()
