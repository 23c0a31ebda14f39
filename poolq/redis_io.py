"""The Redis connection every process uses, and the Lua scripts, loaded once.

Timeouts are short on purpose: when Redis is down or blackholed, an API request
must answer 503 within 2 s (docs/api.md) rather than wait on a socket.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Callable, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from poolq import sentinel
from poolq.errors import Unavailable
from poolq.settings import Settings

LUA_DIR = Path(__file__).with_name("lua")
F = TypeVar("F", bound=Callable[..., Any])


MAX_CONNECTIONS = 256  # per process and client; a thread beyond waits for one to free up


def connect(
    settings: Settings,
    *,
    timeout_s: float | None = None,
    read_timeout_s: float | None = None,
    decode: bool = True,
    retries: int = 1,
) -> redis.Redis:
    """A client with a connection pool.

    The pool blocks (for at most the timeout) rather than failing when every
    connection is in use: a node agent runs a thread per job. ``decode=False`` gives
    bytes, for binary values (logs, packages). ``read_timeout_s``: a longer wait for a
    reply only (a command that blocks, WAIT). A ``redis+sentinel://`` URL gives a pool
    that follows the master the sentinels name (poolq/sentinel.py).
    """
    timeout = settings.redis_timeout_s if timeout_s is None else timeout_s
    options: dict[str, Any] = dict(
        max_connections=MAX_CONNECTIONS,
        timeout=timeout,
        socket_timeout=read_timeout_s or timeout,
        socket_connect_timeout=timeout,
        # A command whose connection broke or timed out may have run: it is sent once
        # more, which is safe because every Lua step is safe to run twice and answers
        # the second time from what the first did (docs/faults.md, "unknown outcomes").
        retry=Retry(NoBackoff(), retries, supported_errors=(redis.ConnectionError, redis.TimeoutError)),
        decode_responses=decode,
        health_check_interval=0,
    )
    url = settings.resolved_redis_url()
    if sentinel.is_sentinel_url(url):
        pool = sentinel.master_pool(sentinel.parse(url), **options)
    else:
        pool = redis.BlockingConnectionPool.from_url(url, **options)
    return redis.Redis(connection_pool=pool)


def redis_errors(what: str) -> Callable[[F], F]:
    """Decorator: a Redis failure becomes Unavailable (a 503), never a 500."""

    def wrap(func: F) -> F:
        @functools.wraps(func)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise Unavailable(f"redis unavailable: {exc}") from exc
            except redis.ResponseError as exc:  # OOM, READONLY, MISCONF: Redis refuses writes
                raise Unavailable(f"redis refused {what}: {exc}") from exc

        return inner  # type: ignore[return-value]

    return wrap


def now_ms(client: redis.Redis) -> int:
    """Redis's clock, in ms: the clock every record and lease is written on."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


class Scripts:
    """Every ``poolq/lua/*.lua`` file as a callable ``Script`` attribute of the same name.

    A line ``--! include lib/<name>.lua`` is replaced by that file of ``poolq/lua/lib/``:
    the helpers several scripts share (a status count, a tenant's fair-share use) are
    written once.
    """

    def __init__(self, client: redis.Redis):
        for path in sorted(LUA_DIR.glob("*.lua")):
            setattr(self, path.stem, client.register_script(_source(path)))

    def __getattr__(self, name: str) -> Script:  # for type checkers; real ones are set above
        raise AttributeError(f"no Lua script {name}.lua in {LUA_DIR}")

    def pipelined(self, client: redis.Redis, build: Callable[[Any], None]) -> list[Any]:
        """``build(pipe)`` queues commands (``Scripts.queue``, among others) and the pipeline
        runs them in one round trip. redis-py's own way (``script(client=pipe)``) asks
        ``SCRIPT EXISTS`` first, a second round trip each time; here a NOSCRIPT reply
        (a new or restarted Redis) loads every script and runs the pipeline again, which
        is safe because each step is safe to run twice (docs/faults.md)."""
        for attempt in (1, 2):
            pipe = client.pipeline(transaction=False)
            build(pipe)
            try:
                return list(pipe.execute())
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                for script in vars(self).values():
                    client.script_load(script.script)
        raise AssertionError("unreachable")

    def queue(self, pipe: Any, name: str, keys: list[str], args: list[Any]) -> None:
        """Queue script ``name`` on ``pipe`` by its SHA (see ``pipelined``)."""
        pipe.evalsha(getattr(self, name).sha, len(keys), *keys, *args)


@functools.cache
def _source(path: Path) -> str:
    lines = path.read_text().splitlines(keepends=True)
    return "".join(
        (LUA_DIR / line.removeprefix(INCLUDE).strip()).read_text() if line.startswith(INCLUDE) else line
        for line in lines
    )


INCLUDE = "--! include "


def script_sha(name: str) -> str:
    """The SHA1 Redis knows script ``name`` by (EVALSHA), its includes put in place."""
    return hashlib.sha1(_source(LUA_DIR / f"{name}.lua").encode()).hexdigest()
