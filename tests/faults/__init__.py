"""Fault-tolerance suite: real redis-server, placement workers, node agents and jobs,
with processes killed, stopped and restarted under load (docs/architecture.md, docs/placement.md, docs/jobs.md, docs/running.md, docs/operations.md)."""
