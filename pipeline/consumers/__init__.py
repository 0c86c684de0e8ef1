"""The long-running priority consumer service (`python -m pipeline.consumers`)."""
