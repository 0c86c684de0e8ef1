"""`python -m edge_bridge`: run the edge service until SIGTERM / Ctrl-C."""

from __future__ import annotations

import logging
import signal
import threading

from edge_bridge.config import EdgeConfig
from edge_bridge.service import EdgeService


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s edge %(levelname)s %(message)s")
    config = EdgeConfig.from_env()
    service = EdgeService(config).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    service.stop()


if __name__ == "__main__":
    main()
