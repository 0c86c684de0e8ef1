"""`python -m edge_bridge.forwarder`: one site's forwarder service until SIGTERM / Ctrl-C."""

from edge_bridge.forwarder.service import main

if __name__ == "__main__":
    main()
