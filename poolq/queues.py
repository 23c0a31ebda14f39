"""Celery queue and task names: the message contract between the shim and the workers.

Messages only say "look": every task reads what to do from Redis, so a lost,
duplicated or redelivered message costs at most a little work (docs/architecture.md).
"""

PLACEMENT = "poolq.placement"  # placement workers
PLACE = "poolq.place"  # task: place the jobs waiting in line

SUBMIT = "poolq.submit"  # queue and task name for queue publishers (docs/api.md)

NODE_WAKE = "poolq.node.wake"  # task: a node agent starts the jobs placed on it


def node_queue(node_id: str) -> str:
    return f"poolq.node.{node_id}"
