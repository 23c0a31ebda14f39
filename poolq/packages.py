"""working_dir packages uploaded by Ray's SDK (``PUT /api/packages/gcs/_ray_pkg_<hash>.zip``).

Stored in Redis, so a node agent on any machine can fetch them, and per tenant: a
tenant's jobs only ever see its own packages, so no tenant can replace the code
another runs. The name is Ray's hash of the source directory, which the server
cannot recompute from the zip, so it is an opaque key (docs/api.md).

A package is removed once unused for the retention period (``poolq:packages`` keeps
each one's last use: an upload, a submission naming it, a node fetching it, a job
using it ending), but never while a PENDING or RUNNING job runs from it: submit.lua
and finish.lua count those in ``poolq:tenant:<tenant>:pkguse``. A tenant's packages
together hold at most POOLQ_MAX_TENANT_PACKAGE_BYTES.
"""

from __future__ import annotations

import redis

from poolq import keys
from poolq.errors import StorageFull
from poolq.redis_io import Scripts, now_ms, redis_errors
from poolq.schemas import PACKAGE_NAME

PROTOCOL = "gcs"


def valid(protocol: str, name: str) -> bool:
    return protocol == PROTOCOL and bool(PACKAGE_NAME.fullmatch(name))


def name_of(uri: str) -> str:
    """``gcs://_ray_pkg_x.zip`` -> ``_ray_pkg_x.zip``."""
    return uri.removeprefix(f"{PROTOCOL}://")


@redis_errors("the package read")
def exists(client: redis.Redis, tenant: str, name: str) -> bool:
    return bool(client.exists(keys.package(tenant, name)))


@redis_errors("the package upload")
def put(client: redis.Redis, scripts: Scripts, tenant: str, name: str, data: bytes, *, budget: int) -> None:
    stored, used = scripts.package_put(
        keys=[keys.package(tenant, name), keys.tenant_package_sizes(tenant), keys.PACKAGES],
        args=[name, data, budget, keys.package_member(tenant, name)],
        client=client,
    )
    if not stored:
        raise StorageFull(
            f"package storage of tenant {tenant} is full: {int(used)} of {budget} bytes in use; "
            "packages are removed when unused for the retention period"
        )


@redis_errors("the package read")
def fetch(client: redis.Redis, tenant: str, uri: str) -> bytes | None:
    """A package's bytes for a node, marking it used now; None if it does not exist."""
    name = name_of(uri)
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.package(tenant, name))
    pipe.zadd(keys.PACKAGES, {keys.package_member(tenant, name): now_ms(client)}, xx=True)
    data, _ = pipe.execute()
    return data  # type: ignore[no-any-return]


def expire(client: redis.Redis, scripts: Scripts, now_ms: int, retention_s: int, batch: int = 100) -> int:
    """Remove packages unused for the retention period that no live job runs from."""
    cutoff = now_ms - retention_s * 1000
    removed = 0
    for member in client.zrangebyscore(keys.PACKAGES, "-inf", cutoff, start=0, num=batch):
        tenant, _, name = str(member).partition(":")
        removed += scripts.package_expire(
            keys=[
                keys.package(tenant, name),
                keys.tenant_package_sizes(tenant),
                keys.tenant_package_use(tenant),
                keys.PACKAGES,
            ],
            args=[name, member, cutoff],
        )
    return removed
