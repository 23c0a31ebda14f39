"""Fault-tolerance suite: real redis-server, placement workers, node agents and jobs,
with processes killed, stopped and restarted under load (DESIGN.md 1, 3, 4, 6, 7)."""
