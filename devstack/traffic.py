"""Demo traffic: the device simulator (`edge_bridge.simulator`), kept here under its old name."""

from edge_bridge.simulator import main

if __name__ == "__main__":
    main()
