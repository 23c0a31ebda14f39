"""Slurm as the arrays scenario's peer: a single-host cluster under a temporary directory.

munged (with a key made for the run), slurmctld and slurmd run in the foreground as
children of the harness, on free ports, with a minimal ``slurm.conf`` (no accounting,
no cgroups, one partition holding this machine with its CPU count). Nothing outside
the directory is touched, and every daemon is stopped when the context exits.

Debian packages it as ``slurm-wlm`` (``apt-get install -y slurm-wlm``); when its
programs are missing, or the cluster does not come up, ``SlurmUnavailable`` says why
and the scenario reports poolq's figure alone.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from poolq.embedded import free_port
from poolq.procs import die_with_parent

PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scancel", "sinfo")
START_S = 30.0  # how long the cluster may take to answer sbatch


class SlurmUnavailable(Exception):
    """Slurm cannot be run here: not installed, or it did not come up (the reason)."""


class Slurm:
    """A single-host Slurm cluster for the duration of a ``with`` block."""

    def __init__(self) -> None:
        missing = [p for p in PROGRAMS if shutil.which(p) is None]
        if missing:
            raise SlurmUnavailable(f"not installed ({', '.join(missing)} not found; Debian: apt-get install slurm-wlm)")
        self.root = Path(tempfile.mkdtemp(prefix="poolq-bench-slurm-"))
        self.children: list[subprocess.Popen[bytes]] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}
        self.version = ""

    def __enter__(self) -> Slurm:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> None:
        root = self.root
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(mode=0o700)
        (root / "munge").chmod(0o711)  # clients reach the socket through it
        key = root / "munge" / "munge.key"
        self._run(["mungekey", "--create", f"--keyfile={key}", "--bits=1024"])
        key.chmod(0o600)
        socket_path = root / "munge" / "munge.socket"
        self._daemon(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={socket_path}",
                f"--pid-file={root / 'munge' / 'munged.pid'}",
                f"--log-file={root / 'log' / 'munged.log'}",
                f"--seed-file={root / 'munge' / 'munged.seed'}",
            ],
        )
        self._wait(socket_path.exists, "munged's socket")
        host = socket.gethostname().split(".")[0]
        user = getpass.getuser()
        conf = root / "slurm.conf"
        conf.write_text(
            "\n".join(
                [
                    "ClusterName=poolqbench",
                    f"SlurmctldHost={host}",
                    f"SlurmUser={user}",
                    f"SlurmdUser={user}",
                    "AuthType=auth/munge",
                    f"AuthInfo=socket={socket_path}",
                    "CredType=cred/munge",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    f"StateSaveLocation={root / 'state'}",
                    f"SlurmdSpoolDir={root / 'spool'}",
                    f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SchedulerType=sched/builtin",
                    "SelectType=select/cons_tres",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "JobCompType=jobcomp/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "MaxArraySize=100001",
                    # An array's tasks count against MaxJobCount until its record is purged,
                    # MinJobAge after it ended (cancelled): room for every call of a run.
                    "MaxJobCount=4000000",
                    "MinJobAge=2",
                    f"NodeName={host} CPUs={os.cpu_count() or 1} State=UNKNOWN",
                    "PartitionName=bench Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        self._daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)])
        self._daemon("slurmd", ["slurmd", "-D", "-f", str(conf)])
        self._wait(lambda: self._sinfo_idle(), "slurmd to register with slurmctld")
        self.version = self._run(["sbatch", "--version"]).strip()

    def sbatch_array(self, count: int) -> float:
        """Seconds one ``sbatch --hold --array=0-<count-1>`` takes to be accepted."""
        began = time.perf_counter()
        answer = self._run(["sbatch", "--hold", f"--array=0-{count - 1}", "--output=/dev/null", "--wrap", "true"])
        took = time.perf_counter() - began
        if not answer.startswith("Submitted batch job"):
            raise SlurmUnavailable(f"sbatch answered {answer!r}")
        return took

    def median_sbatch(self, count: int, runs: int) -> float:
        """The median of ``runs`` sbatch calls (the arrays cancelled after)."""
        times = [self.sbatch_array(count) for _ in range(runs)]
        self._run(["scancel", f"--user={getpass.getuser()}"])
        return statistics.median(times)

    def close(self) -> None:
        for child in reversed(self.children):
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        self.children.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def _daemon(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")
        child = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent, cwd=self.root
        )
        log.close()
        self.children.append(child)

    def _run(self, argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"{' '.join(argv[:2])} did not answer within 60 s") from None
        if done.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(argv[:2])} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        return done.stdout

    def _sinfo_idle(self) -> bool:
        done = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True, timeout=10)
        return done.returncode == 0 and done.stdout.strip() in ("idle", "mix", "alloc")

    def _wait(self, ready: Any, what: str) -> None:
        deadline = time.monotonic() + START_S
        while not ready():
            dead = [str(c.args) for c in self.children if c.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "; ".join(
                    f"{p.name}: {p.read_text()[-300:]}" for p in sorted((self.root / "log").glob("*")) if p.is_file()
                )
                why = f"{', '.join(dead)} exited" if dead else f"no {what} in {START_S:g}s"
                raise SlurmUnavailable(f"the single-host cluster did not come up ({why}): {logs[-1500:]}")
            time.sleep(0.1)
