"""Each job in cgroups of its own: memory, CPU and process-count limits, and a kill that misses nothing.

The node agent detects once, at start, what the machine offers (``Cgroups.detect``), then per job
takes a cgroup from its ``CgroupPool`` with the job's limits written into it, starts the entrypoint
with ``JobCgroup.shell`` (the job's first process joins the cgroup before it runs anything), and in
the end kills what is left and gives the emptied cgroup back for the next job. Creating and
removing a cgroup costs the kernel far more than rewriting an empty one's limits (docs/running.md).

Layout, always beneath the agent's own cgroup, never directly at a hierarchy's root:

    v2    <mount>/<agent's cgroup>/<parent_name>/<job>          one directory; memory, cpu, pids
    v1    <mount>/<hierarchy>/<agent's cgroup>/<parent_name>/<job>
          for hierarchy in memory, cpu, pids (required) and freezer (when mounted)

Mode "none" (no usable cgroups, or turned off) gives a ``JobCgroup`` without directories: ``shell``
starts a bare ``/bin/sh -c`` and every other method does nothing, so the agent needs no branch.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

Mode = Literal["v1", "v2", "none"]

CFS_PERIOD_US = 100_000
MIN_CFS_QUOTA_US = 1_000  # the kernel refuses less
JOIN_FAILED = 125  # exit status of a job whose first process could not join its cgroup
KILL_TIMEOUT_S = 5.0  # a process stuck in uninterruptible sleep outlives SIGKILL; give up after this
RMDIR_TIMEOUT_S = 1.0  # rmdir is EBUSY until the kernel has finished the killed processes' exit

V2_CONTROLLERS = ("memory", "cpu", "pids")
V1_REQUIRED = ("memory", "cpu", "pids")
V1_OPTIONAL = ("freezer",)  # a kill that no fork escapes

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")

# A job's first process: a shell that writes its own pid into each cgroup.procs file given
# before "--", then evaluates the command after it, once, with no positional parameters, as
# `sh -c` would (but that dash prefixes its error messages with "eval: "). Paths and the command
# arrive as arguments, never inside the script; it sets no variable (the job's environment is
# the command's), and the command runs outside any loop of its own (a `break` is the command's).
_JOIN_SCRIPT = (
    f'while [ $# -gt 1 ] && [ "$1" != -- ]; do echo $$ > "$1" || {{ echo "poolq-join: could not join the '
    f'job\'s cgroup $1" >&2; exit {JOIN_FAILED}; }}; shift; done; [ "$1" = -- ] || exit {JOIN_FAILED}; shift; '
    'eval "set --; $1"'
)
POOL_SIZE = 64  # emptied cgroups an agent keeps for its next jobs


class CgroupError(Exception):
    """A job's cgroup could not be created, emptied or removed."""


@dataclass(frozen=True)
class JobCgroup:
    """One job's cgroup: ``dirs`` maps each controller (v1: hierarchy) to its directory."""

    name: str
    mode: Mode
    dirs: Mapping[str, Path] = field(default_factory=dict)

    def shell(self, command: str, **options: Any) -> subprocess.Popen[bytes]:
        """``subprocess.Popen`` of ``/bin/sh -c command``, the shell in this cgroup before the
        command runs, so that nothing the command forks is ever outside; raises OSError if the
        shell could not be started.

        The shell first writes its own pid into the cgroup's ``cgroup.procs`` files (v1: one a
        hierarchy, pids first), then runs the command itself (``eval``): no exec more than a
        bare ``/bin/sh -c``. Dash, which execs no command of a ``-c`` string, stays the job's
        first process either way; where ``/bin/sh`` is bash, which execs a lone simple command,
        the shell now stays too. If it cannot join, it exits 125 (JOIN_FAILED) before running anything and
        says why on stderr. The agent's own threads never enter a job cgroup: one that forks
        from inside a v1 cpu cgroup waits for the scheduler up to a millisecond, every job
        (docs/running.md). Nor is ``preexec_fn`` used, unsafe in a threaded agent."""
        # The pids hierarchy first: a process in any of the job's cgroups is in that one (``empty``).
        first = [self.dirs["pids"]] if "pids" in self.dirs else []
        procs = [str(d / "cgroup.procs") for d in dict.fromkeys(first + self._unique_dirs())]
        if not procs:
            return subprocess.Popen(["/bin/sh", "-c", command], **options)
        return subprocess.Popen(["/bin/sh", "-c", _JOIN_SCRIPT, "/bin/sh", *procs, "--", command], **options)

    def pids(self) -> list[int]:
        """Every process in the cgroup, however far it has left the job's process group or session."""
        found: set[int] = set()
        for d in self._unique_dirs():
            try:
                found.update(int(pid) for pid in _read(d / "cgroup.procs").split())
            except FileNotFoundError:
                pass
        return sorted(found)

    def empty(self) -> bool:
        """Whether no process is left, from one file: the pids hierarchy's, which a job's first
        process joins before the others (``shell``). Most jobs leave nothing behind, and every
        job's end asks."""
        try:
            return not _read(self.dirs["pids"] / "cgroup.procs").split()
        except (KeyError, FileNotFoundError):  # no cgroup ("none"), or removed
            return True

    def signal(self, sig: int) -> None:
        """Send ``sig`` to every process in the cgroup (a stop's SIGTERM: those that left the
        job's process group get their grace too)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> None:
        """SIGKILL every process in the cgroup and wait until none is left (at most KILL_TIMEOUT_S)."""
        if self.empty():
            return
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while left := self.pids():
            if time.monotonic() >= deadline:
                raise CgroupError(f"cgroup {self.name}: {len(left)} processes survived SIGKILL: {left[:10]}")
            self._kill_once()
            _until(lambda: not self.pids(), 0.2)

    def _kill_once(self) -> None:
        if self.mode == "v2" and (self.dirs["memory"] / "cgroup.kill").exists():
            _write(self.dirs["memory"] / "cgroup.kill", "1")  # the kernel kills them all, forks included
            return
        # Frozen processes can neither fork nor exit, so the list read is complete and no pid in it
        # is reused by an unrelated process before the signal lands. Without a freezer (v1 with no
        # freezer hierarchy), a fork may slip through (the next round catches it) and the reuse race
        # remains, as with any kill by pid.
        frozen = self._freeze(True)
        try:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            if frozen:
                self._freeze(False)  # a v1 frozen process dies of SIGKILL only once thawed

    def _freeze(self, freeze: bool) -> bool:
        """Freeze (waiting briefly until it is) or thaw the cgroup; False when there is no freezer."""
        if self.mode == "v2":
            control, value = self.dirs["memory"] / "cgroup.freeze", "1" if freeze else "0"
        else:
            control = self.dirs.get("freezer", Path("/nonexistent")) / "freezer.state"
            value = "FROZEN" if freeze else "THAWED"
        if not control.exists():
            return False
        _write(control, value)
        if freeze:
            _until(self._frozen, 0.1)  # a process in uninterruptible sleep delays it; kill the others meanwhile
        return True

    def _frozen(self) -> bool:
        if self.mode == "v2":
            return _keyed(self.dirs["memory"] / "cgroup.events").get("frozen") == 1
        return _read(self.dirs["freezer"] / "freezer.state").strip() == "FROZEN"

    def oom_killed(self, returncode: int | None = None) -> bool:
        """Whether the kernel killed a process of this job for exceeding its memory limit.

        Call it before ``remove()``. ``returncode`` (the job's, as Popen reports it) is used only on
        kernels too old to count OOM kills."""
        memory = self.dirs.get("memory")
        if memory is None:
            return False
        if self.mode == "v2":
            return _keyed(memory / "memory.events").get("oom_kill", 0) > 0
        control = _keyed(memory / "memory.oom_control")
        if "oom_kill" in control:  # Linux 4.13 and later
            return control["oom_kill"] > 0
        # Older kernels only count how often usage hit the limit (failcnt). Reaching the limit alone
        # is not fatal (the kernel first reclaims); reaching it and dying of SIGKILL, which only the
        # OOM killer or a stop sends, is the best evidence left.
        hit_limit = int(_read(memory / "memory.failcnt")) > 0
        return hit_limit and returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)

    def with_limits(self, *, memory_bytes: int | None, cpu_milli: int | None, pids_max: int | None) -> JobCgroup:
        """This cgroup, new or emptied, with the limits (None: unlimited) written; raises OSError.

        CPU is a CFS quota of ``cpu_milli`` thousandths of a core per 100 ms period (at least 1 ms);
        memory is a hard limit with swap disabled where the kernel accounts for swap."""
        _check_limits(memory_bytes, cpu_milli, pids_max)
        for path, setting in _limits(self, memory_bytes, cpu_milli, pids_max):
            _write(path, setting)
        return self

    def remove(self) -> None:
        """Kill what is left, then delete the cgroup in every hierarchy. Already removed is fine."""
        self.kill()
        for d in self._unique_dirs():
            deadline = time.monotonic() + RMDIR_TIMEOUT_S
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        raise CgroupError(f"cgroup {self.name}: could not remove {d}: {exc.strerror}") from exc
                    time.sleep(0.005)

    def _unique_dirs(self) -> list[Path]:
        return list(dict.fromkeys(self.dirs.values()))  # v2 (and co-mounted v1) controllers share one


@dataclass(frozen=True)
class Cgroups:
    """What this node offers, found once at agent start; ``dirs`` maps each controller to poolq's parent."""

    mode: Mode
    reason: str | None = None  # why mode is "none"
    dirs: Mapping[str, Path] = field(default_factory=dict)

    @classmethod
    def detect(
        cls, root: Path = Path("/sys/fs/cgroup"), *, enabled: bool = True, parent_name: str = "poolq"
    ) -> Cgroups:
        """Find usable cgroups under ``root`` and prepare poolq's parent cgroup; never raises.

        ``parent_name`` must be unique per agent on a machine: ``remove_stale`` empties all of it.
        On cgroup v2 an agent alone in its cgroup moves itself into ``<parent_name>-agent`` beside the
        parent (see ``_detect_v2``): call this before the agent starts any child process."""
        if not enabled:
            return cls("none", "turned off by the operator")
        if not _NAME.fullmatch(parent_name):
            return cls("none", f"invalid cgroup parent name {parent_name!r}")
        try:
            return _detect(root, parent_name)
        except (OSError, ValueError, LookupError) as exc:  # LookupError: a file not as expected
            hint = "" if os.geteuid() == 0 else f" (the agent runs as uid {os.geteuid()}, not root)"
            return cls("none", f"cgroups unusable: {exc}{hint}")

    def weigh(self, cpu_milli: int) -> int:
        """Give the parent of the job cgroups the CPU weight of the cores the node offers jobs
        (``_weight``), but never of more cores than this process may run on: all jobs together
        can use no more, and a node that offers more (``--cpus 64`` on two cores) would starve
        its agent, which must start, reap and report their jobs. Returns the cores weighed, in
        thousandths; raises OSError."""
        weighed = min(cpu_milli, len(os.sched_getaffinity(0)) * 1000)
        if self.mode != "none":
            name = "cpu.shares" if self.mode == "v1" else "cpu.weight"
            _write(self.dirs["cpu"] / name, _weight(self.mode, weighed))
        return weighed

    def describe(self) -> dict[str, str | None]:
        """For the node record."""
        return {"mode": self.mode, "reason": self.reason}

    def create(self, name: str, *, memory_bytes: int | None, cpu_milli: int | None, pids_max: int | None) -> JobCgroup:
        """A new, empty cgroup for a job, with its limits (``JobCgroup.with_limits``); raises CgroupError."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"invalid cgroup name {name!r}: letters, digits, '-' and '_', at most 100")
        job = JobCgroup(name, self.mode, {controller: parent / name for controller, parent in self.dirs.items()})
        _check_limits(memory_bytes, cpu_milli, pids_max)
        created: list[Path] = []
        try:
            for d in job._unique_dirs():
                d.mkdir()
                created.append(d)
            job = job.with_limits(memory_bytes=memory_bytes, cpu_milli=cpu_milli, pids_max=pids_max)
        except OSError as exc:
            for d in reversed(created):  # empty: nothing can have joined it yet
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise CgroupError(f"could not create cgroup {name}: {exc}") from exc
        return job

    def fresh(self, name: str, *, memory_bytes: int | None, cpu_milli: int | None, pids_max: int | None) -> JobCgroup:
        """``create``, after removing a cgroup of that name that an agent killed before it could
        clean up left behind."""
        dirs = {controller: parent / name for controller, parent in self.dirs.items() if (parent / name).is_dir()}
        if dirs:
            JobCgroup(name, self.mode, dirs).remove()
        return self.create(name, memory_bytes=memory_bytes, cpu_milli=cpu_milli, pids_max=pids_max)

    def jobs(self) -> list[JobCgroup]:
        """The job cgroups under poolq's parent now."""
        names = sorted(
            {d.name for parent in set(self.dirs.values()) if parent.is_dir() for d in parent.iterdir() if d.is_dir()}
        )
        found = []
        for name in names:
            dirs = {controller: parent / name for controller, parent in self.dirs.items()}
            found.append(JobCgroup(name, self.mode, {c: d for c, d in dirs.items() if d.is_dir()}))
        return found

    def remove_parent(self) -> None:
        """Remove poolq's parent cgroup, the agent shutting down with its job cgroups removed; one
        that still holds any stays, for the next agent of this node to empty (``remove_stale``)."""
        for d in set(self.dirs.values()):
            with contextlib.suppress(OSError):
                d.rmdir()

    def remove_stale(self) -> list[str]:
        """Kill and remove the job cgroups an earlier run of this agent left behind; their names."""
        stale = self.jobs()
        for job in stale:
            job.remove()
        return [job.name for job in stale]


Limits = tuple[int | None, int | None, int | None]  # memory_bytes, cpu_milli, pids_max


class CgroupPool:
    """One agent's job cgroups: each job takes one with its limits, and gives it back empty, to be
    kept (at most ``size``) for a later job instead of removed.

    A kept cgroup is one whose processes are all gone (``JobCgroup.kill``) and whose kernel never
    killed one of them for memory (its OOM count stays 0, so ``oom_killed`` speaks only of the job
    in it). A job gets a kept cgroup that carries its limits already where there is one (a batch
    of jobs of one shape: no write at all), else one whose limits are written over, else a new
    one. Of its last job nothing remains but the page cache charged to it, which the kernel
    reclaims as the next job needs."""

    def __init__(self, cgroups: Cgroups, size: int = POOL_SIZE) -> None:
        self.cgroups = cgroups
        self.size = size if cgroups.mode != "none" else 0
        self._kept: dict[Limits, list[JobCgroup]] = {}  # by the limits they carry
        self._carrying: dict[str, Limits] = {}  # taken: name -> its limits
        self._lock = threading.Lock()
        self._names = itertools.count(1)
        self._counts_oom_kills: bool | None = None  # found at the first give_back

    def take(self, *, memory_bytes: int | None, cpu_milli: int | None, pids_max: int | None) -> JobCgroup:
        """An empty cgroup with these limits; raises CgroupError."""
        limits = (memory_bytes, cpu_milli, pids_max)
        with self._lock:
            same = self._kept.get(limits)
            other = same or next(iter(self._kept.values()), None)
            job = other.pop() if other else None
            self._kept = {carried: jobs for carried, jobs in self._kept.items() if jobs}
        if job is not None and other is not same:
            try:
                job = job.with_limits(memory_bytes=memory_bytes, cpu_milli=cpu_milli, pids_max=pids_max)
            except OSError:  # v1 refuses a memory limit below what it cannot reclaim: start afresh
                job.remove()
                job = None
        if job is None:
            name = f"job-{next(self._names)}"
            job = self.cgroups.fresh(name, memory_bytes=memory_bytes, cpu_milli=cpu_milli, pids_max=pids_max)
        with self._lock:
            self._carrying[job.name] = limits
        return job

    def give_back(self, job: JobCgroup, *, reusable: bool = True) -> None:
        """A job ended: kill what is left in its cgroup, then keep it or remove it; raises CgroupError.

        Give ``reusable=False`` when the job was killed for memory (``oom_killed``)."""
        with self._lock:
            limits = self._carrying.pop(job.name, None)
        job.kill()
        if reusable and limits is not None and self._oom_kills_counted(job):
            with self._lock:
                if sum(map(len, self._kept.values())) < self.size:
                    self._kept.setdefault(limits, []).append(job)
                    return
        job.remove()

    def close(self) -> None:
        """Remove the kept cgroups (the agent is shutting down)."""
        with self._lock:
            kept, self._kept = self._kept, {}
        for jobs in kept.values():
            for job in jobs:
                job.remove()

    def _oom_kills_counted(self, job: JobCgroup) -> bool:
        """Whether the kernel counts OOM kills (v2, v1 since Linux 4.13). Older ones leave only
        memory.failcnt, which a stopped job's SIGKILL could later be mistaken by: keep nothing."""
        if self._counts_oom_kills is None:
            memory = job.dirs.get("memory")
            self._counts_oom_kills = job.mode == "v2" or (
                memory is not None and "oom_kill" in _keyed(memory / "memory.oom_control")
            )
        return self._counts_oom_kills


def _quota(cpu_milli: int) -> int:
    return max(MIN_CFS_QUOTA_US, cpu_milli * CFS_PERIOD_US // 1000)


def _weight(mode: Mode, cpu_milli: int | None) -> str:
    """A cgroup's CPU weight for ``cpu_milli`` thousandths of a core (None: the kernel's default),
    that of as many busy processes as it has cores, as Kubernetes weighs its pods: under contention
    the kernel shares CPU by weight, and a default weight would count a job's, or all jobs',
    cgroup as one process among the machine's others."""
    if mode == "v1":  # cpu.shares: 1024 a process, 2 to 262144
        return "1024" if cpu_milli is None else str(min(max(cpu_milli * 1024 // 1000, 2), 262_144))
    return "100" if cpu_milli is None else str(min(max(cpu_milli * 100 // 1000, 1), 10_000))  # cpu.weight


def _check_limits(memory_bytes: int | None, cpu_milli: int | None, pids_max: int | None) -> None:
    for label, value, least in (
        ("memory_bytes", memory_bytes, 1),
        ("cpu_milli", cpu_milli, 0),
        ("pids_max", pids_max, 1),
    ):
        if value is not None and value < least:
            raise ValueError(f"{label} must be at least {least}, not {value}")


def _limits(
    job: JobCgroup, memory_bytes: int | None, cpu_milli: int | None, pids_max: int | None
) -> list[tuple[Path, str]]:
    """The (file, value) writes that set every limit, in an order the kernel accepts from any
    earlier limits: a pooled cgroup keeps its last job's until they are written over."""
    d, writes = job.dirs, []
    quota = -1 if cpu_milli is None else _quota(cpu_milli)
    if job.mode == "v2":
        writes.append((d["memory"] / "memory.max", "max" if memory_bytes is None else str(memory_bytes)))
        if (d["memory"] / "memory.swap.max").exists():
            writes.append((d["memory"] / "memory.swap.max", "max" if memory_bytes is None else "0"))
        writes.append((d["cpu"] / "cpu.max", f"{'max' if quota < 0 else quota} {CFS_PERIOD_US}"))
        writes.append((d["cpu"] / "cpu.weight", _weight("v2", cpu_milli)))
    elif job.mode == "v1":
        # memory + swap may never be below memory: lift it first, then set memory, then it (no swap).
        memsw = d["memory"] / "memory.memsw.limit_in_bytes"
        limit = "-1" if memory_bytes is None else str(memory_bytes)
        swap_accounted = memsw.exists()
        if swap_accounted:
            writes.append((memsw, "-1"))
        writes.append((d["memory"] / "memory.limit_in_bytes", limit))
        if swap_accounted and memory_bytes is not None:
            writes.append((memsw, limit))
        writes.append((d["cpu"] / "cpu.cfs_period_us", str(CFS_PERIOD_US)))
        writes.append((d["cpu"] / "cpu.cfs_quota_us", str(quota)))
        writes.append((d["cpu"] / "cpu.shares", _weight("v1", cpu_milli)))
    if job.mode != "none":
        writes.append((d["pids"] / "pids.max", "max" if pids_max is None else str(pids_max)))
    return writes


# -- detection ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mount:
    fstype: str
    root: str  # the directory of the hierarchy mounted here (not "/" for a bind-mounted subtree)
    options: frozenset[str]  # super options: a v1 hierarchy's controllers


def _detect(root: Path, parent_name: str) -> Cgroups:
    mounts = _mounts()
    membership = _membership()
    root = root.resolve()
    top = mounts.get(root)
    if top is not None and top.fstype == "cgroup2":
        if "" not in membership:
            raise ValueError("/proc/self/cgroup names no cgroup2 membership")
        return _detect_v2(root, top, membership[""], parent_name)
    dirs: dict[str, Path] = {}
    missing = []
    for controller in V1_REQUIRED + V1_OPTIONAL:
        mount_point = (root / controller).resolve()
        mount = mounts.get(mount_point)
        if mount is None or mount.fstype != "cgroup" or controller not in mount.options or controller not in membership:
            missing.append(controller)
            continue
        dirs[controller] = _own(mount_point, mount, membership[controller], controller) / parent_name
    if absent := [c for c in V1_REQUIRED if c in missing]:
        return Cgroups(
            "none", f"no cgroup2 mount at {root} and no cgroup v1 hierarchy for {', '.join(absent)} under it"
        )
    for d in dict.fromkeys(dirs.values()):
        d.mkdir(exist_ok=True)
    if not (dirs["cpu"] / "cpu.cfs_quota_us").exists():
        return Cgroups("none", "the kernel has no CFS bandwidth control (cpu.cfs_quota_us), so CPU cannot be limited")
    return Cgroups("v1", None, dirs)


def _detect_v2(root: Path, mount: _Mount, path: str, parent_name: str) -> Cgroups:
    own = _own(root, mount, path, "unified")
    offered = (own / "cgroup.controllers").read_text().split()
    if missing := [c for c in V2_CONTROLLERS if c not in offered]:
        return Cgroups(
            "none",
            f"the cgroup2 hierarchy at {root} does not offer {', '.join(missing)} (offered: {' '.join(offered) or 'none'})",
        )
    enable = " ".join(f"+{c}" for c in V2_CONTROLLERS)
    if not set(V2_CONTROLLERS) <= set((own / "cgroup.subtree_control").read_text().split()):
        try:
            _write(own / "cgroup.subtree_control", enable)
        except OSError as exc:
            # cgroup v2 lets a cgroup hand controllers to its children only while it holds no processes
            # (the root excepted). An agent alone in its cgroup moves into a leaf beside the job parent,
            # as systemd asks of a service with Delegate=yes; with other processes there, it cannot.
            if exc.errno != errno.EBUSY:
                raise
            others = [pid for pid in (own / "cgroup.procs").read_text().split() if int(pid) != os.getpid()]
            if others:
                return Cgroups(
                    "none",
                    f"the agent's cgroup {own} holds {len(others)} other processes, and cgroup v2 lets only a "
                    "cgroup without processes delegate memory, cpu and pids to job cgroups; run the agent in a "
                    "cgroup of its own (for instance a systemd service with Delegate=yes)",
                )
            leaf = own / f"{parent_name}-agent"
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
            _write(own / "cgroup.subtree_control", enable)
    parent = own / parent_name
    parent.mkdir(exist_ok=True)
    _write(parent / "cgroup.subtree_control", enable)  # the parent holds no processes; its children do
    return Cgroups("v2", None, {c: parent for c in V2_CONTROLLERS})


def _own(mount_point: Path, mount: _Mount, path: str, controller: str) -> Path:
    """The agent's own cgroup directory in the hierarchy mounted at ``mount_point``."""
    try:
        relative = PurePosixPath(path).relative_to(mount.root)
    except ValueError:
        raise ValueError(f"the agent's {controller} cgroup {path} is outside what {mount_point} shows") from None
    own = mount_point / relative
    if not own.is_dir():
        raise ValueError(f"the agent's {controller} cgroup {path} is not at {own}")
    return own


def _mounts() -> dict[Path, _Mount]:
    """Mount point -> mount, from /proc/self/mountinfo; the last mount on a point is the visible one."""
    mounts = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        tail = fields.index("-")
        mounts[Path(_unescape(fields[4]))] = _Mount(
            fields[tail + 1], _unescape(fields[3]), frozenset(fields[tail + 3].split(","))
        )
    return mounts


def _membership() -> dict[str, str]:
    """Controller -> this process's cgroup path, from /proc/self/cgroup; "" is the v2 hierarchy."""
    membership = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            membership[controller] = path
    return membership


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), text)  # mountinfo writes " " as \040


# -- files ----------------------------------------------------------------------------------------


def _write(path: Path, value: str) -> None:
    """One write(2), as cgroup files expect; the kernel's refusal surfaces as OSError."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    """A cgroup file's text, read with bare system calls: a job's start and end read several,
    and ``Path.read_text`` costs three times as much."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def _keyed(path: Path) -> dict[str, int]:
    """A cgroup file of "key value" lines (memory.events, cpu.stat, memory.oom_control)."""
    return {key: int(value) for key, value in (line.split() for line in _read(path).splitlines() if line)}


def _until(done: Callable[[], bool], timeout_s: float) -> bool:
    deadline, delay = time.monotonic() + timeout_s, 0.0005
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True
