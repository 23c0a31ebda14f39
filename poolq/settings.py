"""One frozen settings object, read once from ``POOLQ_*`` environment variables.

Every default lives here. Code receives a ``Settings`` instance and never reads
``os.environ`` itself; command-line flags override fields with ``replace()``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Mapping

KiB = 1024
MiB = 1024 * KiB


class ConfigError(Exception):
    """A POOLQ_* variable or flag has a value poolq cannot use."""


def default_data_dir(environ: Mapping[str, str]) -> Path:
    """The per-user data directory, the same from every working directory, so that the
    admin commands find the stack ``poolq up`` started anywhere (docs/operations.md):
    ``$XDG_STATE_HOME/poolq``, else ``~/.local/state/poolq``."""
    state = environ.get("XDG_STATE_HOME", "")
    if state and Path(state).is_absolute():  # the XDG spec: a relative value is to be ignored
        return Path(state) / "poolq"
    home = environ.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / "poolq"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    # Where things are.
    # --data-dir, else POOLQ_DATA_DIR, else the per-user default (default_data_dir).
    data_dir: Path = dataclasses.field(default_factory=lambda: default_data_dir(os.environ))
    redis_url: str | None = None  # None: read $data_dir/redis.url (written by `poolq up`)
    redis_timeout_s: float = 0.5  # socket connect/read timeout, two tries: a dead Redis is a 503 within ~1 s
    # Durability across a failover: an acceptance waits until this many replicas have the
    # job (WAIT), else answers 503 "outcome unknown". 0: answer once the master has it.
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 250  # how long an acceptance waits for them (within the 2 s of a 503)

    # The HTTP API.
    host: str = "127.0.0.1"
    port: int = 8000
    api_workers: int = 2
    api_threads: int = 16  # per API process: threads running the WSGI app
    # Serve Ray's log-tail WebSocket: `poolq api` runs a small server for it beside the WSGI
    # app, which redirects a tail's handshake there (api_shim/server.py). Off: no tail, and
    # /api/version says Ray's CLI cannot tail.
    api_websockets: bool = True
    api_tail_port: int = 0  # the tail server's port; 0: a free one, chosen when `poolq api` starts
    api_tail_url: str = ""  # where clients reach it, e.g. http://logs.example.com:8001; empty: this host
    max_log_tails: int = 64  # per API process: WebSocket log tails open at once
    log_tail_poll_s: float = 0.5  # longest a tail waits between looks at Redis (it starts at 0.05 s)
    max_waiters: int = 8  # per API process: submissions waiting with `Prefer: wait`
    max_body: int = 1 * MiB
    max_batch_body: int = 16 * MiB
    max_package_bytes: int = 100 * MiB
    max_tenant_package_bytes: int = 1024 * MiB  # a tenant's packages together
    cors_origins: tuple[str, ...] = ()
    auth: str = ""  # "tokens" or "none"; empty: tokens unless the API binds loopback

    # Jobs.
    schedule_timeout_ms: int = 18_000
    default_cpus: str = "1"  # a decimal string, converted exactly to milli-CPU
    default_memory: int = 512 * MiB
    retention_s: int = 86_400
    max_terminal_jobs: int = 1_000_000
    max_log_bytes: int = 1 * MiB
    max_log_file_bytes: int = 64 * MiB  # one job's log file on its node: its first and last halves, the middle cut
    max_node_log_bytes: int = 4096 * MiB  # a node's log files together: the oldest finished ones are deleted first

    # Placement.
    placement_strategy: str = "binpack"  # or "spread"
    placement_batch: int = 256  # jobs claimed per placement round, at most (Scheduler.claim_size)
    claim_lease_s: float = 30.0  # a claimed job not placed within this returns to its queue
    intake_lease_s: float = 10.0  # a poolq.submit consumer silent this long has its messages put back
    max_backoff_s: float = 2.0  # longest wait before a job that did not fit is tried again
    fair_share_half_life_s: float = 60.0  # how fast a tenant's past CPU use stops counting against its turn

    # Nodes.
    enforce_resources: bool = True  # each job in its own cgroup with its limits, where the node allows it
    cgroup_root: Path = Path("/sys/fs/cgroup")  # where the node's cgroup hierarchies are mounted
    job_pids_max: int = 4096  # processes and threads one job may have at once (0: no limit)
    runtime_limit_s: float = 0.0  # the node's runtime limit for jobs that name none, nor their tenant (0: none)
    node_ttl_s: float = 15.0
    heartbeat_s: float = 2.0
    stop_grace_s: float = 10.0
    drain_s: float = 30.0
    max_unpacked_bytes: int = 4096 * MiB  # what one working_dir archive or package may unpack to
    max_archive_entries: int = 100_000  # files and directories in one archive or package

    # Periodic duties (run inside placement workers, one at a time under a lock).
    duty_interval_s: float = 0.25

    # Celery's own tools (docs/operations.md): task events for Flower and `celery events`,
    # a few Redis PUBLISHes per wake-up; off by default.
    task_events: bool = False

    @property
    def serves_tails(self) -> bool:
        """Whether log tails are served beside the app: `poolq api` says on which port."""
        return self.api_websockets and self.api_tail_port > 0

    @property
    def loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")

    @property
    def fence_s(self) -> float:
        """How long a node agent keeps running jobs without a heartbeat reaching Redis:
        the node TTL less a margin, so that its jobs are killed before the reaper can
        declare the node lost and give their capacity to others (docs/faults.md)."""
        return self.node_ttl_s - max(1.0, 0.2 * self.node_ttl_s)

    @property
    def auth_mode(self) -> str:
        """``tokens`` or ``none``: POOLQ_AUTH, else tokens on any but a loopback address."""
        return self.auth or ("none" if self.loopback else "tokens")

    @property
    def redis_url_file(self) -> Path:
        return self.data_dir / "redis.url"

    @property
    def lock_file(self) -> Path:
        """Held (flock) by the one ``poolq up`` of this data directory; it names its PID and API."""
        return self.data_dir / "up.lock"

    def resolved_redis_url(self) -> str:
        """The Redis URL every command uses: POOLQ_REDIS_URL, else the file `poolq up` wrote."""
        if self.redis_url:
            return self.redis_url
        try:
            return self.redis_url_file.read_text().strip()
        except FileNotFoundError:
            raise ConfigError(
                f"no Redis configured: no poolq up has run on the data directory {self.data_dir} "
                f"(it writes {self.redis_url_file.name} there); start one with `poolq up`, "
                "or name the running stack's with --data-dir or POOLQ_DATA_DIR, or set POOLQ_REDIS_URL"
            ) from None

    def redis_address(self) -> str:
        """Where Redis is, for messages: the URL without its password."""
        try:
            url = self.resolved_redis_url()
        except ConfigError:
            return "(none configured)"
        return redact(url)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            raw = env.get("POOLQ_" + field.name.upper())
            if raw is None or raw == "":
                continue
            values[field.name] = _convert(field.name, field.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("data_dir"), str):  # --data-dir
            values["data_dir"] = Path(str(values["data_dir"])).expanduser().resolve()
        values.setdefault("data_dir", default_data_dir(env))
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate_node(self) -> None:
        """What a node agent needs on top: heartbeats well within the time it may go without."""
        if not 0 < self.heartbeat_s < self.fence_s:
            raise ConfigError(
                f"POOLQ_HEARTBEAT_S must be positive and below {self.fence_s:g} s "
                f"(POOLQ_NODE_TTL_S={self.node_ttl_s:g} less its fencing margin)"
            )

    def validate(self) -> None:
        if self.auth not in ("", "tokens", "none"):
            raise ConfigError("POOLQ_AUTH must be tokens or none")
        if self.placement_strategy not in ("binpack", "spread"):
            raise ConfigError("POOLQ_PLACEMENT_STRATEGY must be binpack or spread")
        if self.fair_share_half_life_s <= 0:
            raise ConfigError("POOLQ_FAIR_SHARE_HALF_LIFE_S must be positive")
        if not 0 <= self.schedule_timeout_ms <= 604_800_000:
            raise ConfigError("POOLQ_SCHEDULE_TIMEOUT_MS must be between 0 and 604800000")
        if self.redis_wait_replicas < 0:
            raise ConfigError("POOLQ_REDIS_WAIT_REPLICAS must be 0 or more")
        if not 1 <= self.redis_wait_timeout_ms <= 450:
            raise ConfigError("POOLQ_REDIS_WAIT_TIMEOUT_MS must be between 1 and 450 (a 503 comes within 2 s)")
        for name in ("max_body", "max_batch_body", "max_log_bytes", "max_package_bytes", "max_tenant_package_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"POOLQ_{name.upper()} must be positive")


def redact(url: str) -> str:
    """A Redis URL without its passwords (a Sentinel URL's too): fit for messages and logs."""
    url = re.sub(r"(sentinel_password=)[^&]*", r"\1***", url)
    scheme, sep, rest = url.partition("://")
    credentials, at, where = rest.rpartition("@")
    if not (sep and at and ":" in credentials):
        return url
    return f"{scheme}://{credentials.partition(':')[0]}:***@{where}"


def _convert(name: str, annotation: object, raw: str) -> object:
    kind = str(annotation)
    try:
        if name in ("data_dir", "cgroup_root"):
            return Path(raw).expanduser().resolve()
        if kind.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if kind == "bool":
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"POOLQ_{name.upper()}={raw!r} is not a valid {kind}") from None
    return raw
