"""/api/nodes and /api/pools: capacity, reserved and free amounts, labels, liveness."""

from __future__ import annotations

from typing import Any

import redis

from api_shim.http import Request, Response
from poolq.model import MEMORY
from poolq.nodes import describe_nodes


class Nodes:
    def __init__(self, client: redis.Redis):
        self.redis = client

    def list_nodes(self, request: Request) -> Response:
        return Response.json(describe_nodes(self.redis))

    def list_pools(self, request: Request) -> Response:
        pools: dict[str, dict[str, Any]] = {}
        for node in describe_nodes(self.redis):
            pool = pools.setdefault(
                node["pool"], {"pool": node["pool"], "nodes": 0, "alive": 0, "capacity": {}, "reserved": {}, "free": {}}
            )
            pool["nodes"] += 1
            if not node["alive"]:
                continue
            pool["alive"] += 1
            for part in ("capacity", "reserved", "free"):
                for name, amount in node[part].items():
                    total = pool[part].get(name, 0) + amount
                    pool[part][name] = total if name == MEMORY else round(total, 3)
        return Response.json(sorted(pools.values(), key=lambda p: p["pool"]))
