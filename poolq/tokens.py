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


# -- log-tail tickets --------------------------------------------------------------------
#
# The API redirects a log tail's WebSocket handshake, once judged, to the port that serves
# tails, with a ticket in the query that says which tenant may follow which job until when.
# Clients do not carry an Authorization header across that redirect (aiohttp drops it for
# another origin), so the ticket is what the tail server believes.

TICKET_S = 60  # how long a ticket opens its tail; the redirect is followed at once


@redis_errors("the log-tail signing key")
def tail_key(client: redis.Redis) -> bytes:
    """The key that signs tickets: random, made by the first API process that needs it."""
    key = client.get(keys.TAIL_KEY)
    if key is None:
        client.set(keys.TAIL_KEY, secrets.token_hex(32), nx=True)
        key = client.get(keys.TAIL_KEY)
    return bytes.fromhex(key or "")


def _signature(key: bytes, tenant: str, submission_id: str, expires: int) -> str:
    return hmac.new(key, f"{tenant}\n{submission_id}\n{expires}".encode(), hashlib.sha256).hexdigest()


def tail_ticket(key: bytes, tenant: str, submission_id: str, now: float) -> dict[str, str]:
    """The query parameters of a ticket for ``tenant`` to follow ``submission_id``."""
    expires = int(now) + TICKET_S
    return {"tenant": tenant, "expires": str(expires), "ticket": _signature(key, tenant, submission_id, expires)}


def ticket_tenant(key: bytes, query: dict[str, str], submission_id: str, now: float) -> str | None:
    """The tenant a ticket names, if it is this job's, unexpired and signed with ``key``."""
    tenant, expires, signature = query.get("tenant", ""), query.get("expires", ""), query.get("ticket", "")
    if not (TENANT.fullmatch(tenant) and expires.isdigit() and int(expires) >= now and key):
        return None
    expected = _signature(key, tenant, submission_id, int(expires))
    return tenant if hmac.compare_digest(expected, signature) else None
