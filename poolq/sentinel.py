"""Redis through Sentinel: the URL that names it, the redis-py pool that follows its
master, and the same for Celery's broker (docs/operations.md, "Redis Sentinel").

    POOLQ_REDIS_URL=redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[/DB][?OPTIONS]

HOST:PORT are the sentinels; MASTER is the name they monitor; PASSWORD is the master's
(and its replicas'). ``rediss+sentinel://`` speaks TLS to the master and the sentinels.
OPTIONS: ``sentinel_password`` (when the sentinels require one), and the TLS options
redis-py takes in a ``rediss://`` URL (``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_cert_reqs``).

Every new connection asks the sentinels where the master is, so a client follows a
failover without a restart: a connection to the old master fails (or answers READONLY,
which redis-py turns into a connection error), the request that used it answers 503,
and the next connection goes to the new master. Lua scripts are loaded there again on
their first NOSCRIPT (redis-py's ``Script``).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from poolq.settings import ConfigError

SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
# Asking one sentinel where the master is: once, for at most this long. Three sentinels
# that do not answer cost 0.6 s a connection, twice with its one retry: within the 2 s
# of a 503.
SENTINEL_TIMEOUT_S = 0.2


@dataclasses.dataclass(frozen=True)
class SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    tls: bool = False
    tls_options: tuple[tuple[str, str], ...] = ()


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0] in SCHEMES


def parse(url: str) -> SentinelUrl:
    """The parts of a ``redis+sentinel://`` URL; ConfigError naming what is wrong."""
    scheme, _, rest = url.partition("://")
    if scheme not in SCHEMES:
        raise ConfigError(f"not a Sentinel URL (redis+sentinel:// or rediss+sentinel://): {scheme}://…")
    rest, _, query = rest.partition("?")
    where, _, path = rest.partition("/")
    credentials, at, hosts = where.rpartition("@")
    username = password = None
    if at:
        user, _, secret = credentials.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    sentinels = tuple(_address(host) for host in hosts.split(","))
    parts = [unquote(p) for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ConfigError("POOLQ_REDIS_URL: a Sentinel URL names the master after the sentinels: …/MASTER[/DB]")
    try:
        db = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise ConfigError(f"POOLQ_REDIS_URL: the database must be a number, not {parts[1]!r}") from None
    options = dict(parse_qsl(query))
    unknown = sorted(set(options) - {"sentinel_password", *TLS_OPTIONS})
    if unknown:
        raise ConfigError(f"POOLQ_REDIS_URL: unknown Sentinel URL option {', '.join(unknown)}")
    if not SCHEMES[scheme] and set(options) & set(TLS_OPTIONS):
        raise ConfigError("POOLQ_REDIS_URL: TLS options need rediss+sentinel://, not redis+sentinel://")
    return SentinelUrl(
        sentinels=sentinels,
        master=parts[0],
        db=db,
        username=username,
        password=password,
        sentinel_password=options.pop("sentinel_password", None),
        tls=SCHEMES[scheme],
        tls_options=tuple(sorted(options.items())),
    )


def _address(text: str) -> tuple[str, int]:
    host, colon, port = text.strip().rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"POOLQ_REDIS_URL: a sentinel is HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 address in brackets


def format_url(target: SentinelUrl) -> str:
    """The URL of ``target`` (``parse``'s inverse), as `poolq up --replicas` writes it."""
    scheme = "rediss+sentinel" if target.tls else "redis+sentinel"
    auth = _credentials(target)
    hosts = ",".join(_hostport(host, port) for host, port in target.sentinels)
    options = dict(target.tls_options)
    if target.sentinel_password:
        options["sentinel_password"] = target.sentinel_password
    query = "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in options.items()) if options else ""
    return f"{scheme}://{auth}{hosts}/{quote(target.master, safe='')}/{target.db}{query}"


def _credentials(target: SentinelUrl) -> str:
    if not (target.username or target.password):
        return ""
    return f"{quote(target.username or '', safe='')}:{quote(target.password or '', safe='')}@"


class _BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """A Sentinel pool that waits for a free connection (as the plain one does,
    poolq/redis_io.py) rather than failing when all are in use."""

    def release(self, connection: Any) -> None:
        # A connection to an old master (or one that never connected) is not given back:
        # BlockingConnectionPool puts a placeholder in its place but keeps the connection
        # in its list, which would grow by one with every such release.
        if not self.owns_connection(connection):
            with self._lock:
                if connection in self._connections:
                    self._connections.remove(connection)
        super().release(connection)


def _sentinel_kwargs(target: SentinelUrl, timeout_s: float) -> dict[str, Any]:
    timeout = min(timeout_s, SENTINEL_TIMEOUT_S)
    # Each sentinel is asked once: one that does not answer is skipped for the next.
    # (redis-py's default retries a client 10 times with a backoff: ~7 s on a sentinel
    # cut off by a partition, for every new connection, far past a request's 2 s.)
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if target.sentinel_password:
        kwargs["password"] = target.sentinel_password
    if target.tls:
        kwargs.update(ssl=True, **dict(target.tls_options))
    return kwargs


def master_pool(target: SentinelUrl, **pool_kwargs: Any) -> redis.ConnectionPool:
    """A blocking connection pool to the master the sentinels name, whichever it is now."""
    manager = Sentinel(list(target.sentinels), sentinel_kwargs=_sentinel_kwargs(target, pool_kwargs["timeout"]))
    tls: dict[str, Any] = {"ssl": True, **dict(target.tls_options)} if target.tls else {}
    return _BlockingSentinelPool(
        target.master,
        manager,
        db=target.db,
        username=target.username,
        password=target.password,
        **tls,
        **pool_kwargs,
    )


def celery_broker(target: SentinelUrl, timeout_s: float) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """kombu's form of ``target``: the broker URL (one ``sentinel://`` per sentinel), the
    transport options to add, and ``broker_use_ssl`` (None without TLS)."""
    auth = _credentials(target)
    url = ";".join(f"sentinel://{auth}{_hostport(host, port)}/{target.db}" for host, port in target.sentinels)
    options = {"master_name": target.master, "sentinel_kwargs": _sentinel_kwargs(target, timeout_s)}
    # kombu speaks TLS to the master only when broker_use_ssl is a non-empty dict.
    use_ssl = {"ssl_cert_reqs": "required", **dict(target.tls_options)} if target.tls else None
    return url, options, use_ssl
