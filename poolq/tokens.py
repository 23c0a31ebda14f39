"""API tokens, bound to a tenant, stored in Redis so every API process sees a change at once.

A token reads ``pq_<id>_<secret>``. Redis keeps, per id, the tenant and the SHA-256
of the whole token, never the token: ``poolq token create`` shows it once. A
presented token is looked up by its id and compared by digest in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

import redis

from poolq import keys
from poolq.redis_io import redis_errors
from poolq.schemas import TENANT

FORM = re.compile(r"^pq_([0-9a-f]{12})_[A-Za-z0-9_-]{43}$")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@redis_errors("the token creation")
def create(client: redis.Redis, tenant: str) -> str:
    if not TENANT.fullmatch(tenant):
        raise ValueError("a tenant must match [A-Za-z0-9._-]{1,64}")
    token_id = secrets.token_hex(6)
    token = f"pq_{token_id}_{secrets.token_urlsafe(32)}"
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.token(token_id), mapping={"tenant": tenant, "digest": _digest(token), "created": int(time.time())})
    pipe.sadd(keys.TOKENS, token_id)
    pipe.execute()
    return token


@redis_errors("the token revocation")
def revoke(client: redis.Redis, token_or_id: str) -> bool:
    found = FORM.fullmatch(token_or_id)
    token_id = found.group(1) if found else token_or_id
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.token(token_id))
    pipe.srem(keys.TOKENS, token_id)
    deleted, _ = pipe.execute()
    return bool(deleted)


@redis_errors("the token listing")
def listing(client: redis.Redis) -> list[dict[str, str]]:
    ids = sorted(client.smembers(keys.TOKENS))
    pipe = client.pipeline(transaction=False)
    for token_id in ids:
        pipe.hmget(keys.token(token_id), ["tenant", "created"])
    return [
        {"token_id": token_id, "tenant": tenant, "created": created}
        for token_id, (tenant, created) in zip(ids, pipe.execute())
        if tenant
    ]


@redis_errors("the token check")
def tenant_of(client: redis.Redis, token: str) -> str | None:
    """The tenant a token belongs to, or None for any token that is not valid."""
    found = FORM.fullmatch(token)
    if not found:
        hmac.compare_digest(_digest(token), _digest(token))  # same work as a real check
        return None
    tenant, digest = client.hmget(keys.token(found.group(1)), ["tenant", "digest"])
    if not hmac.compare_digest(digest or "", _digest(token)):
        return None
    return tenant
