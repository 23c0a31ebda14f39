"""working_dir packages uploaded by Ray's SDK (``PUT /api/packages/gcs/_ray_pkg_<hash>.zip``).

Stored in Redis, so a node agent on any machine can fetch them. The name is Ray's
hash of the source directory, which the server cannot recompute from the zip, so it
is an opaque key (DESIGN.md 2.6). A package expires after the retention period;
each submission that references it and each fetch renews it.
"""

from __future__ import annotations

import re

from poolq import keys
from poolq.store import JobStore

NAME = re.compile(r"^_ray_pkg_[A-Za-z0-9_.-]{1,128}\.zip$")
PROTOCOL = "gcs"


def valid(protocol: str, name: str) -> bool:
    return protocol == PROTOCOL and bool(NAME.fullmatch(name))


def exists(store: JobStore, name: str) -> bool:
    return bool(store.raw.exists(keys.package(name)))


def put(store: JobStore, name: str, data: bytes) -> None:
    store.raw.set(keys.package(name), data, ex=store.settings.retention_s)


def fetch(store: JobStore, uri: str) -> bytes | None:
    name = uri.removeprefix(f"{PROTOCOL}://")
    pipe = store.raw.pipeline(transaction=False)
    pipe.get(keys.package(name))
    pipe.expire(keys.package(name), store.settings.retention_s)
    data, _ = pipe.execute()
    return data  # type: ignore[no-any-return]
