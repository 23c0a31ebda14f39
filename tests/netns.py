"""Hosts for one test: Linux network namespaces joined by one private switch.

``Network`` makes a namespace per host, ``<prefix>-<host>``, with ``lo`` and ``eth0`` at
10.77.0.N/24, and a switch namespace, ``<prefix>-sw``, holding a bridge and the other end
of each host's veth pair (named after the host). No host has a route off the subnet,
and nothing is added to the machine's own namespace (no interface, address or route),
so nothing a test sends can leave, and two runs at once can use the same addresses. Only
the namespaces' names are global: they carry the test process's pid, and a ``Network``
first removes those of a run that died before it could (``remove_stale``).

- ``run(host, argv, env)`` starts a process on a host (``tests.procs.Process``): it
  enters the namespace by setns(2) between fork and exec, not by ``ip netns exec``,
  which remounts /sys and so hides /sys/fs/cgroup (a node agent there could not run its
  jobs in cgroups). ``check`` runs a command to its end and returns its output.
- ``call(host, fn, …)`` runs ``fn`` in the test's own process, in a thread that lives on
  that host (a network namespace is per thread): clients, checkers and load generators
  open their sockets there.
- ``cut(host)`` pulls the host's cable at the switch: its veth there goes down, the host
  keeps its address and routes, and its packets vanish, as in a partition: no reset, and
  connections time out (new ones, once the host's ARP lookups have gone unanswered for a
  few seconds, fail with "no route to host"). ``restore(host)`` plugs it back.
- ``address(host)``, ``dir(host)`` (its own files: ``run`` gives each host its own HOME
  and TMPDIR), ``pids(host)`` and ``runs_in(pid, host)`` (which namespace a process is in).

``unavailable()`` says why a machine cannot do this (not Linux, not root, no ``ip``, a
container without the right to make namespaces); tests skip with that reason.
``start_redis`` runs a password-protected redis-server bound to a host's address.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import redis

from poolq.embedded import EmbeddedRedis, redis_server_binary
from tests.procs import Process, wait_for

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts each namespace by its name
SUBNET = "10.77.0"  # a /24: the switch is .1's subnet, hosts are .2 and up
PREFIX = "pq"  # namespaces are pq<pid>n<k>-<host>
STALE = re.compile(r"pq(\d+)n\d+-[a-z0-9]+")
HOST_NAME = re.compile(r"[a-z][a-z0-9]{0,10}")  # the switch's end of its veth is named after it (15 bytes at most)
IP_TIMEOUT_S = 10.0
LINK_UP_S = 10.0

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) if sys.platform == "linux" else None
_networks = itertools.count(1)


class IpError(Exception):
    """An ``ip`` command failed; the message is its stderr."""


def ip(*args: str, check: bool = True) -> str:
    """``ip ARGS``; its stdout. Raises IpError with its stderr when it fails (unless not ``check``)."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise IpError(f"ip {' '.join(args)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


def enter(netns: Path) -> None:
    """Move the calling thread (or, between fork and exec, the child) into the network
    namespace mounted at ``netns``."""
    assert _libc is not None
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def unavailable() -> str | None:
    """Why this machine cannot make a test's hosts; None when it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "making network namespaces needs root (CI runs the suite as root)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) on PATH"
    probe = f"{PREFIX}{os.getpid()}n0-probe"
    try:
        ip("netns", "add", probe)
        ip("-n", probe, "link", "add", "name", "br0", "type", "bridge")
        ip("-n", probe, "link", "add", "name", "v0", "type", "veth", "peer", "name", "v1")
    except (IpError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot make a network namespace with a bridge and a veth pair here: {exc}"
    finally:
        ip("netns", "delete", probe, check=False)
    return None


def namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def pids_in(netns: str) -> set[int]:
    """The processes in a namespace (their main threads'), by ``ip netns pids``."""
    return {int(pid) for pid in ip("netns", "pids", netns, check=False).split()}


def remove(netns: str) -> None:
    """Kill what still runs in a namespace (processes a test started there) and delete it."""
    for pid in pids_in(netns) - {os.getpid()}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    ip("netns", "delete", netns, check=False)


def remove_stale() -> list[str]:
    """Remove the namespaces of test processes that are gone (killed before they cleaned up)."""
    removed = []
    for netns in namespaces():
        found = STALE.fullmatch(netns)
        if not found or _alive(int(found.group(1))):
            continue
        remove(netns)
        removed.append(netns)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed and not yet reaped by its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


class HostProcess(Process):
    """A process started inside a host's network namespace; it dies with the test's thread
    that started it (so that a killed test leaves no server behind)."""

    def __init__(self, netns: Path, argv: list[str], env: dict[str, str], log_path: Path, name: str):
        super().__init__(argv, env, log_path, name=name, tied=True)
        self.netns = netns

    def preexec(self) -> Callable[[], None]:
        tie = super().preexec()

        def enter_host() -> None:
            if tie is not None:
                tie()
            enter(self.netns)

        return enter_host


class Network:
    """One test's hosts on one switch; ``close()`` (or leaving ``with``) stops every
    process started with ``run`` and removes every namespace, whatever happened."""

    def __init__(self, directory: Path, subnet: str = SUBNET):
        self.directory = directory
        self.subnet = subnet
        self.prefix = f"{PREFIX}{os.getpid()}n{next(_networks)}"
        self.switch = f"{self.prefix}-sw"
        self.hosts: dict[str, str] = {}  # host -> its address
        self.procs: list[HostProcess] = []
        self._made: list[str] = []
        self._threads: dict[str, concurrent.futures.ThreadPoolExecutor] = {}

    def __enter__(self) -> Network:
        try:
            remove_stale()
            self._add_namespace(self.switch)
            ip("-n", self.switch, "link", "add", "name", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "dev", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _add_namespace(self, netns: str) -> None:
        ip("netns", "add", netns)
        self._made.append(netns)
        ip("-n", netns, "link", "set", "dev", "lo", "up")

    def netns(self, host: str) -> str:
        """The host's namespace, by name (for ``ip -n``, ``ip netns exec``)."""
        return f"{self.prefix}-{host}"

    def add(self, host: str) -> str:
        """A new host, plugged into the switch; its address."""
        if not HOST_NAME.fullmatch(host) or host in self.hosts or host == "sw":
            raise ValueError(f"host names are [a-z][a-z0-9]{{0,10}}, once each, not sw: {host!r}")
        address = f"{self.subnet}.{len(self.hosts) + 2}"
        netns = self.netns(host)
        self._add_namespace(netns)
        ip("-n", self.switch, "link", "add", "name", host, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("-n", self.switch, "link", "set", "dev", host, "master", "br0", "up")
        ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", netns, "link", "set", "dev", "eth0", "up")
        for sub in ("home", "tmp"):
            (self.dir(host) / sub).mkdir(parents=True, exist_ok=True)
        self.hosts[host] = address
        self._wait_link(host)
        return address

    def address(self, host: str) -> str:
        return self.hosts[host]

    def dir(self, host: str) -> Path:
        """The host's own files (its disk, as far as the test goes)."""
        return self.directory / host

    # -- processes -------------------------------------------------------------------

    def host_env(self, host: str, env: dict[str, str] | None = None) -> dict[str, str]:
        """``env`` over the host's own HOME and TMPDIR."""
        return {"HOME": str(self.dir(host) / "home"), "TMPDIR": str(self.dir(host) / "tmp"), **(env or {})}

    def run(self, host: str, argv: list[str], env: dict[str, str] | None = None, *, name: str | None = None) -> HostProcess:
        """Start ``argv`` on ``host`` (the test's environment, the host's HOME and TMPDIR,
        then ``env``); its output goes to ``<host dir>/<name>.log``. Stopped by ``close()``."""
        name = name or Path(argv[0]).name
        proc = HostProcess(NETNS_DIR / self.netns(host), argv, self.host_env(host, env), self.dir(host) / f"{name}.log",
                           name=f"{name}@{host}")
        self.procs.append(proc)
        proc.start()
        return proc

    def check(self, host: str, argv: list[str], env: dict[str, str] | None = None, timeout: float = 120.0) -> str:
        """Run ``argv`` on ``host`` to its end; its stdout. Fails the test, with its output, if it fails."""
        netns = NETNS_DIR / self.netns(host)
        done = subprocess.run(argv, env={**os.environ, **self.host_env(host, env)}, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=lambda: enter(netns))
        assert done.returncode == 0, f"{' '.join(argv)} on {host} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        return done.stdout

    def call(self, host: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in this process, from a thread on ``host``: the sockets it
        opens are the host's. Each host has one such thread: calls to it run one at a time."""
        if host not in self._threads:
            netns = NETNS_DIR / self.netns(host)
            self._threads[host] = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"on-{host}", initializer=enter, initargs=(netns,)
            )
        return self._threads[host].submit(fn, *args, **kwargs).result()

    def on(self, host: str, target: Any) -> On:
        """``target`` seen from ``host``: each of its methods called through ``call``."""
        return On(self, host, target)

    def pids(self, host: str) -> set[int]:
        """The processes on ``host``."""
        return pids_in(self.netns(host))

    def runs_in(self, pid: int, host: str) -> bool:
        """Whether process ``pid`` is on ``host`` (in its network namespace)."""
        try:
            return os.stat(f"/proc/{pid}/ns/net").st_ino == self.inode(host)
        except (FileNotFoundError, ProcessLookupError):
            return False

    def inode(self, host: str) -> int:
        """The host's namespace's inode: what ``os.stat('/proc/self/ns/net').st_ino`` says there."""
        return os.stat(NETNS_DIR / self.netns(host)).st_ino

    # -- the links -------------------------------------------------------------------

    def cut(self, host: str) -> None:
        """Pull the host's cable at the switch: its packets vanish from now on."""
        ip("-n", self.switch, "link", "set", "dev", host, "down")

    def restore(self, host: str) -> None:
        """Plug it back, and wait until the link carries packets again."""
        ip("-n", self.switch, "link", "set", "dev", host, "up")
        self._wait_link(host)

    def _wait_link(self, host: str) -> None:
        def up() -> bool:
            port = ip("-n", self.switch, "-d", "-o", "link", "show", "dev", host)
            end = ip("-n", self.netns(host), "-o", "link", "show", "dev", "eth0")
            return "state UP" in end and "state UP" in port and "state forwarding" in port

        wait_for(up, LINK_UP_S, 0.02, what=f"the link of {host} to come up")

    # -- the end ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop the processes (SIGTERM, then SIGKILL to their sessions), kill anything
        else left in the namespaces (a job's orphans), and delete them."""
        errors = []
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # the namespaces go whatever happened
                errors.append(exc)
        self.procs.clear()
        for thread in self._threads.values():
            thread.shutdown(wait=True, cancel_futures=True)
        self._threads.clear()
        for netns in reversed(self._made):
            remove(netns)
        self._made.clear()
        left = set(namespaces()) & {self.switch, *map(self.netns, self.hosts)}
        assert not left, f"namespaces not removed: {sorted(left)}"
        if errors:
            raise errors[0]


class On:
    """An object whose methods run on a host (``Network.on``): ``on.get(…)`` is
    ``net.call(host, target.get, …)``; ``target`` is the object itself, for what must run
    there otherwise (an async iterator: iterate it inside a ``call``). Attributes that are not
    methods are read as they are."""

    def __init__(self, net: Network, host: str, target: Any):
        self.net, self.host, self.target = net, host, target

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.target, name)
        if not callable(found):
            return found
        return lambda *args, **kwargs: self.net.call(self.host, found, *args, **kwargs)


@dataclass
class HostRedis:
    """A redis-server on a host: its process, its URL (by the host's address) and its password."""

    proc: HostProcess
    url: str
    password: str
    host: str
    port: int

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client; use it from ``Network.call`` on a host that reaches this one."""
        return redis.Redis.from_url(self.url, **kwargs)


def start_redis(net: Network, host: str, *, port: int = 6379, name: str = "redis", password: str | None = None,
                appendonly: bool = False, extra_config: tuple[str, ...] = (), timeout: float = 20.0) -> HostRedis:
    """A redis-server on ``host``, bound to its address (not loopback) with a password,
    configured as ``poolq up``'s embedded one (poolq/embedded.py), without persistence unless
    ``appendonly``, plus ``extra_config`` lines (``replicaof …``). Returns once it answers there."""
    server = EmbeddedRedis(net.dir(host) / name, host=net.address(host), port=port, password=password,
                           appendonly=appendonly)
    server.directory.mkdir(parents=True, exist_ok=True)
    config = server.directory / "redis.conf"
    config.write_text(server.config() + "".join(f"{line}\n" for line in extra_config))
    os.chmod(config, 0o600)
    proc = net.run(host, [redis_server_binary(), str(config)], name=name)

    def answers() -> bool:
        assert proc.alive(), f"{name} on {host} exited:\n{(server.directory / 'redis.log').read_text()[-2000:]}"
        try:
            return bool(net.call(host, lambda: redis.Redis.from_url(server.url, socket_timeout=1).ping()))
        except redis.ConnectionError:
            time.sleep(0.05)
            return False

    wait_for(answers, timeout, 0.05, what=f"{name} to answer on {host}")
    return HostRedis(proc, server.url, server.password, host, port)
