"""working_dir packages uploaded by Ray's SDK (``PUT /api/packages/gcs/_ray_pkg_<hash>.zip``).

Stored in Redis, so a node agent on any machine can fetch them, and per tenant: a
tenant's jobs only ever see its own packages, so no tenant can replace the code
another runs. The name is Ray's hash of the source directory, which the server
cannot recompute from the zip, so it is an opaque key (DESIGN.md 2.6). A package
expires after the retention period; each submission that names it and each fetch
renews it. A tenant's packages together hold at most POOLQ_MAX_TENANT_PACKAGE_BYTES.
"""

from __future__ import annotations

import redis

from poolq import keys
from poolq.errors import StorageFull
from poolq.redis_io import Scripts, redis_errors
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
def put(client: redis.Redis, scripts: Scripts, tenant: str, name: str, data: bytes, *, ttl_s: int, budget: int) -> None:
    stored, used = scripts.package_put(
        keys=[keys.package(tenant, name), keys.tenant_packages(tenant), keys.tenant_package_sizes(tenant)],
        args=[name, data, ttl_s, budget],
        client=client,
    )
    if not stored:
        raise StorageFull(
            f"package storage of tenant {tenant} is full: {int(used)} of {budget} bytes in use; "
            "packages expire when unused for the retention period"
        )


@redis_errors("the package check")
def touch(client: redis.Redis, tenant: str, name: str, ttl_s: int) -> bool:
    """Keep a package (and its size record) from expiring; False if it is not there."""
    expiry_ms = int(client.time()[0]) * 1000 + ttl_s * 1000
    pipe = client.pipeline(transaction=False)
    pipe.expire(keys.package(tenant, name), ttl_s)
    pipe.zadd(keys.tenant_packages(tenant), {name: expiry_ms}, xx=True)
    pipe.expire(keys.tenant_packages(tenant), ttl_s)
    pipe.expire(keys.tenant_package_sizes(tenant), ttl_s)
    return bool(pipe.execute()[0])


@redis_errors("the package read")
def fetch(client: redis.Redis, tenant: str, uri: str, ttl_s: int) -> bytes | None:
    name = name_of(uri)
    data = client.get(keys.package(tenant, name))
    if data is not None:
        touch(client, tenant, name, ttl_s)
    return data  # type: ignore[no-any-return]
