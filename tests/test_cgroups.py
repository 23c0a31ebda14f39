"""worker/cgroups.py on this machine's real cgroups, with real processes and no mocks.

Tests that need cgroups take the ``cgroups`` fixture: it skips, saying why, only on a machine
without usable cgroups (``test_detects_what_the_machine_offers`` fails if that verdict is wrong),
and kills and removes every cgroup of the test afterwards, pass or fail.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.cgroups import CFS_PERIOD_US, JOIN_FAILED, MIN_CFS_QUOTA_US, CgroupError, CgroupPool, Cgroups, JobCgroup

CGROUP_ROOT = Path("/sys/fs/cgroup")
REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
_serial = itertools.count()

Spawn = Callable[..., "subprocess.Popen[bytes]"]


def parent_name() -> str:
    return f"poolq-test-{os.getpid()}-{next(_serial)}"


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    found = Cgroups.detect(parent_name=parent_name())
    if found.mode == "none":
        reason = f"no usable cgroups on this machine: {found.reason}"
        print(reason)
        pytest.skip(reason)
    yield found
    found.remove_stale()
    found.remove_parent()


@pytest.fixture
def spawn(cgroups: Cgroups) -> Iterator[Spawn]:
    """Start ``argv`` in a job's cgroup the way the agent does, as a shell command in a session of
    its own; the command execs it, so that the process is ``argv``'s."""
    started: list[subprocess.Popen[bytes]] = []

    def start(job: JobCgroup, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        process = job.shell(f"exec {shlex.join(argv)}", start_new_session=True, stdin=subprocess.DEVNULL, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        for pipe in (process.stdout, process.stderr):
            if pipe:
                pipe.close()


def expected_mode() -> str:
    """What this machine offers, read independently of the module: its mounts and our privileges."""
    mounts = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        tail = fields.index("-")
        mounts[fields[4]] = (fields[tail + 1], fields[tail + 3].split(","))
    if os.geteuid() != 0:
        return "none"
    top = mounts.get(str(CGROUP_ROOT))
    if top and top[0] == "cgroup2":
        offered = (CGROUP_ROOT / "cgroup.controllers").read_text().split()
        return "v2" if {"memory", "cpu", "pids"} <= set(offered) else "none"
    v1 = all(
        mounts.get(str(CGROUP_ROOT / c), ("", []))[0] == "cgroup" and c in mounts[str(CGROUP_ROOT / c)][1]
        for c in ("memory", "cpu", "pids")
    )
    return "v1" if v1 else "none"


def own_cgroup(controller: str) -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    raise AssertionError(f"not in a {controller} cgroup")


def subdirs(cgroup: Path) -> list[str]:
    """The child cgroups of a cgroup (its other entries are the kernel's control files)."""
    return sorted(p.name for p in cgroup.iterdir() if p.is_dir())


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except (FileNotFoundError, ProcessLookupError):  # gone meanwhile (a read of a dying one is ESRCH)
        return []


def cpu_time_s(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def dead(pid: int) -> bool:
    """Gone, or a zombie: this machine's PID 1 does not reap the orphans it inherits."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def control(job: JobCgroup, controller: str, v1_file: str, v2_file: str) -> str:
    return (job.dirs[controller] / (v2_file if job.mode == "v2" else v1_file)).read_text().strip()


# -- detection ----------------------------------------------------------------------------------


def test_detects_what_the_machine_offers() -> None:
    name = parent_name()
    found = Cgroups.detect(parent_name=name)
    try:
        assert found.describe() == {"mode": expected_mode(), "reason": found.reason}
        if found.mode == "none":
            assert found.reason
            return
        assert found.reason is None
        if found.mode == "v1":  # here: the parent sits in the agent's own cgroup of each hierarchy
            for controller, parent in found.dirs.items():
                assert parent == CGROUP_ROOT / controller / own_cgroup(controller).lstrip("/") / name
            assert {"memory", "cpu", "pids"} <= set(found.dirs)
        for controller, parent in found.dirs.items():
            assert parent.is_dir() and subdirs(parent) == []
            assert parent.parent != CGROUP_ROOT / controller or own_cgroup(controller) == "/"
    finally:
        found.remove_parent()


def test_no_cgroups_where_there_are_none(tmp_path: Path) -> None:
    looks_like = tmp_path / "fake"  # the layout of a v1 machine, but no cgroup file system mounted
    for controller in ("memory", "cpu", "pids"):
        (looks_like / controller).mkdir(parents=True)
        (looks_like / controller / "cgroup.procs").write_text("")
    roots = [tmp_path / "empty", looks_like, tmp_path / "missing"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty").chmod(0o555)
    if (CGROUP_ROOT / "unified" / "cgroup.controllers").exists():
        roots.append(CGROUP_ROOT / "unified")  # a hybrid layout's v2 mount: memory, cpu, pids are on v1
    for root in roots:
        found = Cgroups.detect(root, parent_name=parent_name())
        assert found.mode == "none" and found.dirs == {}, root
        assert found.reason and str(root) in found.reason
    assert sorted(p.name for p in looks_like.iterdir()) == ["cpu", "memory", "pids"]
    assert not list((tmp_path / "empty").iterdir())


def test_no_cgroups_without_root() -> None:
    name = parent_name()
    probe = f"from worker.cgroups import Cgroups; import json; print(json.dumps(Cgroups.detect(parent_name={name!r}).describe()))"
    user = NOBODY if os.geteuid() == 0 else None
    done = subprocess.run(
        [sys.executable, "-c", probe],
        user=user,
        cwd="/",
        env={"PYTHONPATH": str(REPO)},
        capture_output=True,
        check=True,
    )
    described = json.loads(done.stdout)
    assert described["mode"] == "none"
    assert "not root" in described["reason"] and "Permission denied" in described["reason"], described
    assert not (CGROUP_ROOT / "pids" / name).exists()


def test_operator_opt_out_gives_a_job_cgroup_that_does_nothing() -> None:
    found = Cgroups.detect(enabled=False, parent_name=parent_name())
    assert found.describe() == {"mode": "none", "reason": "turned off by the operator"}
    job = found.create("job-1", memory_bytes=1 << 20, cpu_milli=100, pids_max=5)
    hello = job.shell("echo hi; cat /proc/self/cgroup", stdout=subprocess.PIPE)
    out, _ = hello.communicate(timeout=10)
    assert hello.returncode == 0 and out.decode().splitlines()[0] == "hi"
    assert out.decode().splitlines()[1:] == Path("/proc/self/cgroup").read_text().splitlines()  # where the caller is
    assert job.pids() == [] and job.oom_killed() is False
    job.kill()
    job.remove()


def test_names_and_limits_are_checked() -> None:
    found = Cgroups("none", "test")
    for bad in ("", "..", ".hidden", "a/b", "a b", "x" * 101, "cgroup.procs"):
        with pytest.raises(ValueError):
            found.create(bad, memory_bytes=None, cpu_milli=None, pids_max=None)
    for limits in ({"memory_bytes": 0}, {"cpu_milli": -1}, {"pids_max": 0}):
        with pytest.raises(ValueError):
            found.create("ok", **{"memory_bytes": None, "cpu_milli": None, "pids_max": None, **limits})


# -- limits ---------------------------------------------------------------------------------------


def test_limits_are_written(cgroups: Cgroups, spawn: Spawn) -> None:
    job = cgroups.create("limited", memory_bytes=128 << 20, cpu_milli=500, pids_max=20)
    assert control(job, "memory", "memory.limit_in_bytes", "memory.max") == str(128 << 20)
    assert control(job, "pids", "pids.max", "pids.max") == "20"
    if job.mode == "v1":
        assert control(job, "cpu", "cpu.cfs_quota_us", "") == "50000"
        assert control(job, "cpu", "cpu.cfs_period_us", "") == str(CFS_PERIOD_US)
        if (job.dirs["memory"] / "memory.memsw.limit_in_bytes").exists():  # memory + swap = memory: no swap
            assert control(job, "memory", "memory.memsw.limit_in_bytes", "") == str(128 << 20)
    else:
        assert control(job, "cpu", "", "cpu.max") == f"50000 {CFS_PERIOD_US}"
        if (job.dirs["memory"] / "memory.swap.max").exists():
            assert control(job, "memory", "", "memory.swap.max") == "0"
    # Half a core weighs half a busy process (1024 shares, weight 100), and the parent as many as
    # the node offers jobs: under contention, all jobs together are not one process among many.
    assert control(job, "cpu", "cpu.shares", "cpu.weight") == ("512" if job.mode == "v1" else "50")
    parent = JobCgroup("parent", job.mode, dict(cgroups.dirs))
    cores = len(os.sched_getaffinity(0))
    assert cgroups.weigh(cores * 1000 - 500) == cores * 1000 - 500
    assert control(parent, "cpu", "cpu.shares", "cpu.weight") == str(
        (cores * 1000 - 500) * (1024 if job.mode == "v1" else 100) // 1000
    )
    # Never more than the cores the agent may run on: a node offering 64 would starve its agent.
    assert cgroups.weigh(64_000) == cores * 1000
    assert control(parent, "cpu", "cpu.shares", "cpu.weight") == str(cores * (1024 if job.mode == "v1" else 100))
    with pytest.raises(CgroupError, match="exists"):  # and the cgroup that was there stays as it was
        cgroups.create("limited", memory_bytes=None, cpu_milli=None, pids_max=None)
    assert all(d.is_dir() for d in job.dirs.values())
    assert control(job, "pids", "pids.max", "pids.max") == "20"
    tiny = cgroups.create("tiny", memory_bytes=None, cpu_milli=1, pids_max=None)
    spawn(tiny, ["true"]).wait(10)
    assert control(tiny, "cpu", "cpu.cfs_quota_us", "cpu.max").split()[0] == str(MIN_CFS_QUOTA_US)
    assert control(tiny, "pids", "pids.max", "pids.max") == "max"


def test_shell_starts_the_process_inside_and_runs_the_command_as_sh_c_would(cgroups: Cgroups, spawn: Spawn) -> None:
    job = cgroups.create("join", memory_bytes=None, cpu_milli=None, pids_max=None)
    args = ["a b", "$(touch /tmp/poolq-injected)", "--", "'\"", "", "*", "x\ny", "; exit 3"]
    probe = "import json, sys; print(json.dumps([open('/proc/self/cgroup').read(), sys.argv[1:]]))"
    process = spawn(job, [sys.executable, "-c", probe, *args], stdout=subprocess.PIPE)
    out, _ = process.communicate(timeout=10)
    assert process.returncode == 0
    membership, argv = json.loads(out)
    assert argv == args
    assert not Path("/tmp/poolq-injected").exists()
    joined = {}
    for line in membership.splitlines():
        _, controllers, path = line.split(":", 2)
        joined.update({c: path for c in controllers.split(",")})
    for controller, d in job.dirs.items():  # in the job's cgroup of every hierarchy, from its first exec
        mount = CGROUP_ROOT / controller if job.mode == "v1" else CGROUP_ROOT
        assert joined[controller if job.mode == "v1" else ""] == "/" + d.relative_to(mount).as_posix()
    # The joining shell runs the command itself: what the command sees, and how it ends, are
    # what they are under a bare `sh -c` (dash's error messages but say "eval:").
    for command, code in (
        ("""echo "$0|$#|$*|${f-unset}"; trap 'echo bye' EXIT; read -r x </dev/null; exit 7""", 7),
        ("nosuchcommand-poolq", 127),
        ("if then", 2),
        ("kill -9 $$", -9),
        ("echo a; break; echo b", 0),  # a loop of the command's own: the joining shell has none around it
        ("set -- x; continue", 0),
        ('[ "$f" = kept ] && echo "$f"', 0),  # nor does it set a variable: the job's environment is the command's
    ):
        env = {**os.environ, "f": "kept"}
        bare = subprocess.run(["/bin/sh", "-c", command], capture_output=True, timeout=10, env=env)
        joined_shell = job.shell(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        out, err = joined_shell.communicate(timeout=10)
        assert (joined_shell.returncode, out) == (bare.returncode, bare.stdout) and bool(err) == bool(bare.stderr)
        assert joined_shell.returncode == code, command
        if command.startswith('echo "$0'):
            assert out == b"/bin/sh|0||kept\nbye\n"
        if command.startswith("[ "):
            assert out == b"kept\n"


def test_a_cgroup_that_cannot_be_joined_runs_nothing(cgroups: Cgroups, spawn: Spawn) -> None:
    job = cgroups.create("gone", memory_bytes=None, cpu_milli=None, pids_max=None)
    job.remove()
    before = Path("/proc/thread-self/cgroup").read_text()
    process = spawn(job, ["/bin/echo", "must not run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=10)  # the first process could not join: it exits before running it
    assert process.returncode == JOIN_FAILED and out == b""
    assert b"poolq-join: could not join the job's cgroup" in err
    assert Path("/proc/thread-self/cgroup").read_text() == before


def test_the_starting_thread_never_enters_the_job_cgroup(cgroups: Cgroups, spawn: Spawn) -> None:
    job = cgroups.create("starter", memory_bytes=None, cpu_milli=None, pids_max=None)
    before = Path("/proc/thread-self/cgroup").read_text()
    process = spawn(job, ["sleep", "1000"])
    assert Path("/proc/thread-self/cgroup").read_text() == before
    wait_for(lambda: job.pids() == [process.pid])  # the job's first process joins, then runs the command
    assert Path("/proc/thread-self/cgroup").read_text() == before
    job.kill()
    assert process.wait(10) == -signal.SIGKILL


def test_memory_limit_kills_the_job_not_its_neighbour(cgroups: Cgroups, spawn: Spawn) -> None:
    hog = cgroups.create("hog", memory_bytes=128 << 20, cpu_milli=None, pids_max=None)
    neighbour = cgroups.create("neighbour", memory_bytes=128 << 20, cpu_milli=None, pids_max=None)
    calm = spawn(neighbour, [sys.executable, "-c", "import time; time.sleep(60)"])
    greedy = spawn(hog, [sys.executable, "-c", "data = b'x' * (300 << 20); print('allocated')"], stdout=subprocess.PIPE)
    out, _ = greedy.communicate(timeout=30)
    assert greedy.returncode == -signal.SIGKILL and out == b""
    assert hog.oom_killed(greedy.returncode)
    assert calm.poll() is None and not neighbour.oom_killed()


@pytest.mark.serial
def test_cpu_quota_gives_about_half_a_core(cgroups: Cgroups, spawn: Spawn) -> None:
    job = cgroups.create("spin", memory_bytes=None, cpu_milli=500, pids_max=None)
    spinner = spawn(job, [sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)  # past the interpreter's start
    used, began = cpu_time_s(spinner.pid), time.monotonic()
    time.sleep(2.5)
    used_after, ended = cpu_time_s(spinner.pid), time.monotonic()
    cores = (used_after - used) / (ended - began)
    print(f"CPU-bound job limited to 500 milli-CPU used {cores:.3f} cores")
    assert 0.3 <= cores <= 0.7
    stat = dict(line.split() for line in (job.dirs["cpu"] / "cpu.stat").read_text().splitlines())
    assert int(stat["nr_throttled"]) > 0


FORK_BOMB = """
import os, time
forked = failed = 0
for _ in range(60):
    try:
        pid = os.fork()
    except OSError:
        failed += 1
        continue
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    forked += 1
print(forked, failed, flush=True)
time.sleep(60)
"""


def test_fork_bomb_stops_at_pids_max(cgroups: Cgroups, spawn: Spawn) -> None:
    limit = 16
    job = cgroups.create("bomb", memory_bytes=None, cpu_milli=None, pids_max=limit)
    bomb = spawn(job, [sys.executable, "-c", FORK_BOMB], stdout=subprocess.PIPE)
    assert bomb.stdout is not None
    forked, failed = map(int, bomb.stdout.readline().split())
    assert forked == limit - 1 and failed == 60 - forked  # the bomb itself is one of the 16
    assert len(job.pids()) == limit
    peak = job.dirs["pids"] / "pids.peak"
    if peak.exists():
        assert int(peak.read_text()) == limit
    job.kill()
    assert job.pids() == []


def test_kill_reaches_children_that_left_the_process_group(cgroups: Cgroups, spawn: Spawn) -> None:
    job = cgroups.create("escape", memory_bytes=None, cpu_milli=None, pids_max=None)
    script = "setsid sh -c 'sleep 1001' & (sh -c 'sleep 1002 &' &); sleep 1003"
    leader = spawn(job, ["/bin/sh", "-c", script])

    def sleeps() -> dict[str, int]:
        return {cmdline(pid)[1]: pid for pid in job.pids() if cmdline(pid)[:1] == ["sleep"]}

    wait_for(lambda: len(sleeps()) == 3)
    escaped = sleeps()
    assert os.getsid(escaped["1001"]) != leader.pid  # setsid: out of reach of the agent's killpg
    assert parent_pid(escaped["1002"]) not in job.pids()  # double fork: its parent is gone
    job.kill()
    assert job.pids() == []
    assert all(dead(pid) for pid in escaped.values())
    assert leader.wait(10) == -signal.SIGKILL


def test_remove_leaves_nothing(cgroups: Cgroups, spawn: Spawn) -> None:
    job = cgroups.create("done", memory_bytes=64 << 20, cpu_milli=200, pids_max=10)
    spawn(job, ["/bin/sh", "-c", "setsid sleep 1000 & exec sleep 1000"])
    wait_for(lambda: len(job.pids()) == 2)
    pids = job.pids()
    job.remove()
    assert not any(d.exists() for d in job.dirs.values())
    assert all(dead(pid) for pid in pids)
    job.remove()  # already removed: fine
    assert job.pids() == []
    assert all(subdirs(parent) == [] for parent in cgroups.dirs.values())


def test_remove_stale_cleans_up_after_a_crash(cgroups: Cgroups, spawn: Spawn) -> None:
    crashed = cgroups.create("crashed", memory_bytes=None, cpu_milli=None, pids_max=None)
    spawn(crashed, ["/bin/sh", "-c", "setsid sleep 1000 & exec sleep 1000"])
    wait_for(lambda: len(crashed.pids()) == 2)
    orphans = crashed.pids()
    half = next(iter(cgroups.dirs.values())) / "half-made"  # a crash between two hierarchies' mkdir
    half.mkdir()
    # The agent crashed: a new one starts with the same parent and knows nothing of these.
    restarted = Cgroups.detect(parent_name=cgroups.dirs["pids"].name)
    assert restarted.dirs == cgroups.dirs
    assert restarted.remove_stale() == ["crashed", "half-made"]
    assert all(dead(pid) for pid in orphans)
    assert all(parent.is_dir() and subdirs(parent) == [] for parent in cgroups.dirs.values())
    assert restarted.remove_stale() == []


# -- the pool --------------------------------------------------------------------------------------


def memory_limit(job: JobCgroup) -> int:
    text = control(job, "memory", "memory.limit_in_bytes", "memory.max")
    return -1 if text == "max" or int(text) >= 1 << 62 else int(text)  # v1 writes "unlimited" as a huge number


def test_a_pooled_cgroup_is_emptied_then_reused_with_the_next_jobs_limits(cgroups: Cgroups, spawn: Spawn) -> None:
    pool = CgroupPool(cgroups, size=2)
    first = pool.take(memory_bytes=128 << 20, cpu_milli=500, pids_max=20)
    process = spawn(
        first, ["/bin/sh", "-c", "setsid sleep 1000 >/dev/null 2>&1 & echo started"], stdout=subprocess.PIPE
    )
    process.communicate(timeout=10)
    wait_for(lambda: len(first.pids()) == 1)  # the setsid child outlived the job's shell
    left = first.pids()
    pool.give_back(first)
    assert all(dead(pid) for pid in left) and first.pids() == []
    assert control(first, "cpu", "cpu.cfs_quota_us", "cpu.max").split()[0] == "50000"  # kept with its limits
    # Taken again, unlimited: every limit of the first job is written over.
    second = pool.take(memory_bytes=None, cpu_milli=None, pids_max=None)
    assert second.name == first.name
    assert memory_limit(second) == -1
    assert control(second, "pids", "pids.max", "pids.max") == "max"
    assert control(second, "cpu", "cpu.cfs_quota_us", "cpu.max").split()[0] in ("-1", "max")
    other = pool.take(memory_bytes=64 << 20, cpu_milli=250, pids_max=5)  # none kept now: a new one
    assert other.name != second.name and all(d.is_dir() for d in other.dirs.values())
    pool.give_back(second)
    pool.give_back(other)
    # A job of a shape seen before gets the cgroup that carries its limits, not the last one kept.
    assert pool.take(memory_bytes=None, cpu_milli=None, pids_max=None).name == second.name
    # And a new shape one whose limits are lowered (v1: memory + swap follows memory down).
    third = pool.take(memory_bytes=32 << 20, cpu_milli=100, pids_max=3)
    assert third.name == other.name and memory_limit(third) == 32 << 20
    assert control(third, "pids", "pids.max", "pids.max") == "3"
    if third.mode == "v1" and (third.dirs["memory"] / "memory.memsw.limit_in_bytes").exists():
        assert control(third, "memory", "memory.memsw.limit_in_bytes", "") == str(32 << 20)
    ran = spawn(third, ["/bin/sh", "-c", "cat /proc/self/cgroup"], stdout=subprocess.PIPE)
    out, _ = ran.communicate(timeout=10)
    assert ran.returncode == 0 and f"/{third.name}\n" in out.decode()
    pool.give_back(third)
    pool.give_back(second)
    kept = pool.take(memory_bytes=None, cpu_milli=None, pids_max=None)
    cgroups.remove_parent()  # a parent that holds a job cgroup stays
    assert all(parent.is_dir() for parent in cgroups.dirs.values())
    pool.give_back(kept)
    pool.close()
    assert all(subdirs(parent) == [] for parent in cgroups.dirs.values())
    cgroups.remove_parent()  # the agent shuts down: nothing of it is left
    assert not any(parent.exists() for parent in cgroups.dirs.values())


def test_the_pool_removes_a_cgroup_the_oom_killer_acted_in_and_keeps_at_most_its_size(
    cgroups: Cgroups, spawn: Spawn
) -> None:
    pool = CgroupPool(cgroups, size=1)
    hog = pool.take(memory_bytes=64 << 20, cpu_milli=None, pids_max=None)
    greedy = spawn(hog, [sys.executable, "-c", "data = b'x' * (200 << 20)"])
    greedy.wait(30)
    assert hog.oom_killed(greedy.returncode)
    pool.give_back(hog, reusable=not hog.oom_killed(greedy.returncode))
    assert not any(d.exists() for d in hog.dirs.values())
    a, b = (pool.take(memory_bytes=None, cpu_milli=None, pids_max=None) for _ in range(2))
    pool.give_back(a)
    pool.give_back(b)  # the pool is full: removed
    assert [d.is_dir() for d in a.dirs.values()] == [True] * len(a.dirs)
    assert not any(d.exists() for d in b.dirs.values())
    assert pool.take(memory_bytes=None, cpu_milli=None, pids_max=None).name == a.name


def test_a_node_without_cgroups_keeps_none() -> None:
    pool = CgroupPool(Cgroups("none", "test"))
    assert pool.size == 0
    job = pool.take(memory_bytes=1 << 20, cpu_milli=100, pids_max=5)
    pool.give_back(job)
    assert job.mode == "none" and job.dirs == {} and job.shell("true").wait(10) == 0
