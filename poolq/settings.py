"""One frozen settings object, read once from ``POOLQ_*`` environment variables.

Every default lives here. Code receives a ``Settings`` instance and never reads
``os.environ`` itself; command-line flags override fields with ``replace()``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

KiB = 1024
MiB = 1024 * KiB


class ConfigError(Exception):
    """A POOLQ_* variable or flag has a value poolq cannot use."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    # Where things are.
    data_dir: Path = dataclasses.field(default_factory=lambda: Path(".poolq").resolve())
    redis_url: str | None = None  # None: read $data_dir/redis.url (written by `poolq up`)
    redis_timeout_s: float = 0.5  # socket connect/read timeout, two tries: a dead Redis is a 503 within ~1 s

    # The HTTP API.
    host: str = "127.0.0.1"
    port: int = 8000
    api_workers: int = 2
    api_threads: int = 16  # per API process: threads running the WSGI app
    # Serve Ray's log-tail WebSocket (granian's RSGI interface in front of the WSGI app);
    # off: granian's plain WSGI interface, and /api/version says Ray's CLI cannot tail.
    api_websockets: bool = True
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
    placement_batch: int = 256  # jobs claimed per placement round
    claim_lease_s: float = 30.0  # a claimed job not placed within this returns to its queue
    intake_lease_s: float = 10.0  # a poolq.submit consumer silent this long has its messages put back
    max_backoff_s: float = 2.0  # longest wait before a job that did not fit is tried again

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

    def resolved_redis_url(self) -> str:
        """The Redis URL every command uses: POOLQ_REDIS_URL, else the file `poolq up` wrote."""
        if self.redis_url:
            return self.redis_url
        try:
            return self.redis_url_file.read_text().strip()
        except FileNotFoundError:
            raise ConfigError(
                f"no Redis configured: run `poolq up` (it writes {self.redis_url_file}) or set POOLQ_REDIS_URL"
            ) from None

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
        if not 0 <= self.schedule_timeout_ms <= 604_800_000:
            raise ConfigError("POOLQ_SCHEDULE_TIMEOUT_MS must be between 0 and 604800000")
        for name in ("max_body", "max_batch_body", "max_log_bytes", "max_package_bytes", "max_tenant_package_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"POOLQ_{name.upper()} must be positive")


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
