"""Fault-tolerance suite: real redis-server, placement workers, node agents and jobs,
with processes killed, stopped and restarted under load (docs/faults.md)."""
