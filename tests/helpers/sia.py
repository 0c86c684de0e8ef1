"""What the SIA ingress tests and its benchmark share: an account key and the forwarder with its SIA ingress as a
process of its own (run with `python -c`, so a test can kill -9 it)."""

import textwrap

KEY = "K3y-0f-16-chars!"  # an Ajax hub's encryption key is typed in as characters

FORWARDER_PROCESS = textwrap.dedent(
    """
    import os, sys, threading
    from pathlib import Path
    from edge_bridge.forwarder import Forwarder
    from edge_bridge.ingress.sia import SiaIngress, parse_accounts

    forwarder = Forwarder.connect(os.environ["SITE"], "127.0.0.1", int(os.environ["MQTT_PORT"]), Path(os.environ["STATE_DIR"]))
    SiaIngress(forwarder, "127.0.0.1", int(os.environ["FORWARDER_SIA_PORT"]), parse_accounts(os.environ["FORWARDER_SIA_ACCOUNTS"]), publish_timeout=2).start()
    print("READY", flush=True)
    threading.Event().wait()
    """
)
