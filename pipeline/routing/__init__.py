"""Routing: where each drained event goes (partners, priority queues, monitoring), in plain Python."""
