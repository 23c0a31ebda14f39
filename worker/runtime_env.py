"""Preparing a job's runtime_env on its node: the working directory and the pip environment.

Archives and pip environments are built once into content-addressed caches under the
node's data directory and reused; a file lock makes concurrent jobs that need the
same one wait for a single build. Anything that goes wrong raises ``SetupFailed``,
which the agent turns into FAILED / RUNTIME_ENV_SETUP_FAILED with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

from poolq.settings import Settings

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar.xz")
PIP_TIMEOUT_S = 900
HIDDEN_ENV_PREFIX = "POOLQ_"  # the agent's settings, among them the Redis URL with its password
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def safe_dir(name: str) -> str:
    """A directory name for a tenant: ``t-`` keeps names such as ``..`` inside their parent."""
    return "t-" + name


class SetupFailed(Exception):
    """The runtime_env could not be prepared; the message says why, for the job record."""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class RuntimeEnvs:
    """Builds working directories and pip environments under ``cache_dir``.

    ``fetch_package(tenant, uri)`` returns the bytes of a tenant's ``gcs://_ray_pkg_…``
    package (stored in Redis by the API); None when it does not exist. An archive may
    unpack to at most ``max_unpacked_bytes`` in at most ``max_archive_entries`` entries.
    """

    def __init__(
        self,
        cache_dir: Path,
        fetch_package: Callable[[str, str], bytes | None] | None = None,
        *,
        max_unpacked_bytes: int = Settings.max_unpacked_bytes,
        max_archive_entries: int = Settings.max_archive_entries,
    ):
        self.cache_dir = cache_dir
        self.fetch_package = fetch_package
        self.limits = Limits(max_unpacked_bytes, max_archive_entries)
        self._digests: dict[tuple[int, int, int, int], str] = {}

    def working_dir(self, value: str, tenant: str = "default") -> Path:
        if value.startswith("gcs://"):
            return self._package(value, tenant)
        path = Path(value[len("file://") :] if value.startswith("file://") else value)
        if path.is_dir():
            return path
        if not path.exists():
            raise SetupFailed(f"working_dir {value} does not exist on this node")
        if not path.name.endswith(ARCHIVE_SUFFIXES):
            raise SetupFailed(f"working_dir {value} is neither a directory nor a {', '.join(ARCHIVE_SUFFIXES)} archive")
        target = self.cache_dir / "wd" / self._digest(path)
        return self._unpacked(target, lambda dest: unpack(path, dest, flatten=True, limits=self.limits))

    def _digest(self, path: Path) -> str:
        """The archive's content hash, computed once per version of the file."""
        info = path.stat()
        version = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        digest = self._digests.get(version)
        if digest is None:
            digest = self._digests[version] = _file_digest(path)
        return digest

    def _package(self, uri: str, tenant: str) -> Path:
        if self.fetch_package is None:
            raise SetupFailed(f"package {uri} cannot be fetched on this node")
        name = uri[len("gcs://") :]
        target = self.cache_dir / "pkg" / safe_dir(tenant) / name  # a tenant's packages are its own
        if (target / ".ready").exists():
            return target
        data = self.fetch_package(tenant, uri)
        if data is None:
            raise SetupFailed(f"package {uri} was not uploaded (PUT /api/packages/gcs/{name}) or has expired")
        with tempfile.NamedTemporaryFile(suffix=".zip") as handle:
            handle.write(data)
            handle.flush()
            # Ray zips a directory's contents without a top directory: keep the layout.
            return self._unpacked(
                target, lambda dest: unpack(Path(handle.name), dest, flatten=False, name=name, limits=self.limits)
            )

    def _unpacked(self, target: Path, fill: Callable[[Path], None]) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        if (target / ".ready").exists():
            return target
        with _locked(target.with_name(target.name + ".lock")):
            if (target / ".ready").exists():
                return target
            if target.exists():
                shutil.rmtree(target)  # a build interrupted earlier
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpack-"))
            try:
                fill(staging)
                (staging / ".ready").touch()
                staging.rename(target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return target

    def pip_env(self, spec: Any) -> Path | None:
        """A virtual environment with the requirements installed (None when there are none)."""
        packages, pip_version, pip_check = _pip_spec(spec)
        if not packages:
            return None
        digest = hashlib.sha256(json.dumps([sorted(packages), pip_version, pip_check]).encode()).hexdigest()[:32]
        target = self.cache_dir / "pip" / digest
        if (target / ".ready").exists():
            return target
        with _locked(target.with_name(digest + ".lock")):
            if (target / ".ready").exists():
                return target
            if target.exists():
                shutil.rmtree(target)
            _run([sys.executable, "-m", "venv", "--without-pip", str(target)], "creating the virtual environment")
            pip = [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(target / "bin" / "python"),
                "--disable-pip-version-check",
                "--no-input",
            ]
            if pip_version:
                _run([*pip, "install", f"pip{pip_version}"], "installing the requested pip version")
            _run([*pip, "install", *packages], "pip install")
            if pip_check:
                _run([*pip, "check"], "pip check")
            (target / ".ready").touch()
        return target


def _pip_spec(spec: Any) -> tuple[list[str], str | None, bool]:
    if not spec:
        return [], None, False
    if isinstance(spec, list):
        return list(spec), None, False
    version = (spec.get("pip_version") or "").split(";")[0].strip()  # the marker is not evaluated
    if version[:1].isdigit() or version[:1] == "v":  # a bare version
        version = "==" + version
    return list(spec.get("packages") or []), version or None, bool(spec.get("pip_check"))


def _run(command: list[str], what: str) -> None:
    # pip and the build backends it runs get the agent's environment without its secrets.
    env = {k: v for k, v in os.environ.items() if not k.startswith(HIDDEN_ENV_PREFIX)}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, stdin=subprocess.DEVNULL, env=env
        )
    except subprocess.TimeoutExpired:
        raise SetupFailed(f"{what} took longer than {PIP_TIMEOUT_S} s") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-2000:]
        raise SetupFailed(f"{what} failed (exit {done.returncode}): {tail}")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class Limits:
    """How much one archive may unpack to on this node."""

    max_bytes: int = Settings.max_unpacked_bytes
    max_entries: int = Settings.max_archive_entries

    def check(self, sizes: Iterable[int], name: str) -> None:
        """Refuse an archive whose entries (their declared sizes) pass a limit; stops at the first that does."""
        total = 0
        for count, size in enumerate(sizes, 1):
            total += size
            if count > self.max_entries:
                raise SetupFailed(
                    f"archive {name} has more than {self.max_entries:,} entries"
                    " (the node's limit, POOLQ_MAX_ARCHIVE_ENTRIES)"
                )
            if total > self.max_bytes:
                raise SetupFailed(
                    f"archive {name} unpacks to more than {_bytes(self.max_bytes)} (the node's limit,"
                    f" POOLQ_MAX_UNPACKED_BYTES): {_bytes(total)} in its first {count:,} entries"
                )


def _bytes(count: int) -> str:
    """A size as people read it: 4 GiB, 1.2 MiB, 300 bytes."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{count} bytes"


def unpack(archive: Path, target: Path, *, flatten: bool, name: str | None = None, limits: Limits = Limits()) -> None:
    """Extract an archive into ``target``, refusing entries that would land outside it.

    With ``flatten``, an archive holding a single top directory is used from inside
    it, as Ray does for remote archives. ``name`` is what messages call the archive.
    """
    name = name or archive.name
    try:
        if name.endswith(".zip"):
            _unzip(archive, target, name, limits)
        elif name.endswith((".tar.gz", ".tgz", ".tar.xz")):
            with tarfile.open(archive) as tar:
                # Iterating reads the headers one by one: a bomb is refused before it is all read.
                limits.check((member.size for member in tar), name)
                for member in tar.getmembers():
                    _check_member(member.name, name)
                try:
                    tar.extractall(target, filter="data")  # also refuses links leaving it and devices
                except tarfile.FilterError as exc:
                    raise SetupFailed(f"archive {name} has an unsafe entry: {exc}") from None
        else:
            raise SetupFailed(f"{name} is not a supported archive ({', '.join(ARCHIVE_SUFFIXES)})")
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise SetupFailed(
                f"the node's disk is full: archive {name} could not be unpacked into {target.parent} ({exc.strerror})"
            ) from None
        raise SetupFailed(f"archive {name} could not be unpacked: {exc}") from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise SetupFailed(f"archive {name} could not be unpacked: {exc}") from None
    if flatten:
        _flatten_single_top_directory(target)


def _check_member(entry: str, name: str) -> None:
    """Refuse an entry with an absolute path or a `..` part (zip and tar alike)."""
    member = PurePosixPath(entry)
    if member.is_absolute() or ".." in member.parts or entry.startswith(("\\", "/")):
        raise SetupFailed(f"archive {name} has an unsafe entry: {entry!r} leaves the working directory")


def _unzip(archive: Path, target: Path, name: str, limits: Limits) -> None:
    with zipfile.ZipFile(archive) as zipped:
        # zipfile stops reading each entry at its declared file_size (and then checks its CRC):
        # declared sizes that lie cannot make it write more than they add up to.
        limits.check((info.file_size for info in zipped.infolist()), name)
        for info in zipped.infolist():
            _check_member(info.filename, name)
            member = PurePosixPath(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                link = PurePosixPath(zipped.read(info).decode("utf-8", "replace"))
                resolved = PurePosixPath(*member.parent.parts, *link.parts)
                if link.is_absolute() or _escapes(resolved):
                    raise SetupFailed(
                        f"archive {name} has a link {info.filename!r} -> {link} that leaves the working directory"
                    )
        zipped.extractall(target)


def _escapes(path: PurePosixPath) -> bool:
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return True
    return False


def _flatten_single_top_directory(target: Path) -> None:
    """Move the contents of a lone top directory up into ``target``."""
    entries = [p for p in target.iterdir() if p.name != ".ready"]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        inner = entries[0]
        temporary = target / (".flatten-" + os.urandom(4).hex())
        inner.rename(temporary)
        for child in temporary.iterdir():
            child.rename(target / child.name)
        temporary.rmdir()
