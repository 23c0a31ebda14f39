"""worker/runtime_env.py on its own: working directories from directories, archives and
packages, refusal of unsafe archive entries, the unpack and pip caches, pip failures.

No Redis and no agent: ``RuntimeEnvs`` is called directly on real files, and pip really
installs hand-built wheels (no network needed).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import struct
import subprocess
import tarfile
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.kit import KiB, MiB
from tests.test_joblog import tiny_tmpfs
from worker.runtime_env import RuntimeEnvs, SetupFailed, _pip_spec

# -- building archives and wheels ------------------------------------------------------

Entry = tuple[str, str, str]  # (kind, name, data or link target)


def file(name: str, text: str = "x") -> Entry:
    return ("file", name, text)


def symlink(name: str, target: str) -> Entry:
    return ("symlink", name, target)


def hardlink(name: str, target: str) -> Entry:
    return ("hardlink", name, target)


def device(name: str) -> Entry:
    return ("device", name, "")


def write_archive(path: Path, entries: list[Entry]) -> Path:
    """Write ``entries`` into a .zip, .tar.gz, .tgz or .tar.xz, exactly as given (no path
    cleaning: the point is to build hostile archives too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as archive:
            for kind, name, data in entries:
                info = zipfile.ZipInfo(name)
                info.compress_type = zipfile.ZIP_DEFLATED
                if kind == "symlink":
                    info.external_attr = (stat.S_IFLNK | 0o777) << 16
                elif kind != "file":
                    raise ValueError(f"a zip cannot hold a {kind}")
                archive.writestr(info, data)
        return path
    mode = "w:xz" if path.name.endswith(".xz") else "w:gz"
    with tarfile.open(path, mode) as archive:
        for kind, name, data in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data.encode())
                archive.addfile(info, io.BytesIO(data.encode()))
                continue
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, data
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, data
            else:
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            archive.addfile(info)
    return path


def build_wheel(directory: Path, name: str = "poolq_probe", version: str = "0.1", value: str = "probe-42") -> Path:
    """A minimal pure-Python wheel, written by hand: no build backend, no network."""
    files = {
        f"{name}/__init__.py": f"VALUE = {value!r}\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: poolq-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record_name = f"{name}-{version}.dist-info/RECORD"
    lines = []
    for file_name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        lines.append(f"{file_name},sha256={digest},{len(text.encode())}")
    lines.append(f"{record_name},,")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for file_name, text in files.items():
            wheel.writestr(file_name, text)
        wheel.writestr(record_name, "\n".join(lines) + "\n")
    return path


def zip_bytes(entries: list[Entry]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for _, name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "node" / "cache"


@pytest.fixture
def envs(cache: Path) -> RuntimeEnvs:
    return RuntimeEnvs(cache)


def unpacked_dirs(cache: Path) -> list[Path]:
    """Directories the working-dir cache holds (lock files and the like are not counted)."""
    return sorted(p for p in cache.rglob("*") if p.is_dir() and p.parent.parent == cache and p.parent.name != "pip")


def tree(root: Path) -> dict[str, str]:
    """Every regular file under ``root`` (relative name -> text), bookkeeping dotfiles left out."""
    return {
        str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
    }


# -- directories ------------------------------------------------------------------------


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_a_directory_is_used_in_place(envs: RuntimeEnvs, cache: Path, tmp_path: Path, as_uri: bool) -> None:
    directory = tmp_path / "project"
    directory.mkdir()
    (directory / "main.py").write_text("print(1)")

    assert envs.working_dir(f"file://{directory}" if as_uri else str(directory)) == directory
    assert not cache.exists() or not any(cache.rglob("*")), "a plain directory was copied into the cache"


@pytest.mark.parametrize("name", ["no-such-dir", "no-such-archive.zip", "no-such-archive.tar.gz"])
@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_a_missing_working_dir_is_refused(envs: RuntimeEnvs, tmp_path: Path, name: str, as_uri: bool) -> None:
    missing = tmp_path / name
    with pytest.raises(SetupFailed, match="does not exist"):
        envs.working_dir(f"file://{missing}" if as_uri else str(missing))


def test_a_file_that_is_not_an_archive_is_refused(envs: RuntimeEnvs, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(SetupFailed, match="notes.txt"):
        envs.working_dir(str(notes))


# -- archives ---------------------------------------------------------------------------

SUFFIXES = [".zip", ".tar.gz", ".tgz", ".tar.xz"]
PROJECT = {"run.sh": "echo hi\n", "sub/data.txt": "data\n"}


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("top", ["", "project/"], ids=["flat", "one-top-dir"])
def test_an_archive_is_unpacked_into_the_cache(
    envs: RuntimeEnvs, cache: Path, tmp_path: Path, suffix: str, top: str
) -> None:
    archive = write_archive(
        tmp_path / "src" / f"project{suffix}", [file(top + name, text) for name, text in PROJECT.items()]
    )

    unpacked = envs.working_dir(f"file://{archive}")

    # A single top directory is the working directory itself, as with Ray's remote archives.
    assert tree(unpacked) == PROJECT
    assert unpacked.is_relative_to(cache)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([file("a/x", "1"), file("b/y", "2")], {"a/x": "1", "b/y": "2"}),
        ([file("only.txt", "1")], {"only.txt": "1"}),
        ([file("top/x", "1"), file("side.txt", "2")], {"top/x": "1", "side.txt": "2"}),
        ([file("proj/proj/x", "1"), file("proj/y", "2")], {"proj/x": "1", "y": "2"}),
    ],
    ids=["two-top-dirs", "one-top-file", "top-dir-and-file", "top-dir-holding-its-namesake"],
)
def test_only_a_lone_top_directory_is_flattened(
    envs: RuntimeEnvs, tmp_path: Path, entries: list[Entry], expected: dict[str, str]
) -> None:
    archive = write_archive(tmp_path / "src" / "layout.zip", entries)
    assert tree(envs.working_dir(str(archive))) == expected


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_an_archive_is_unpacked_once_and_reused(envs: RuntimeEnvs, cache: Path, tmp_path: Path, suffix: str) -> None:
    archive = write_archive(tmp_path / "src" / f"project{suffix}", [file(name, text) for name, text in PROJECT.items()])

    first = envs.working_dir(str(archive))
    (first / "left-by-job-1").write_text("still here")
    second = envs.working_dir(f"file://{archive}")
    third = RuntimeEnvs(cache).working_dir(str(archive))  # a restarted agent: same cache on disk

    assert first == second == third
    assert (second / "left-by-job-1").read_text() == "still here", "the archive was unpacked again"
    assert unpacked_dirs(cache) == [first]


def test_a_changed_archive_is_not_served_from_the_cache(envs: RuntimeEnvs, tmp_path: Path) -> None:
    archive = tmp_path / "src" / "project.zip"
    write_archive(archive, [file("version.txt", "1")])
    first = envs.working_dir(str(archive))

    write_archive(archive, [file("version.txt", "2")])
    second = envs.working_dir(str(archive))

    assert (second / "version.txt").read_text() == "2"
    assert (first / "version.txt").read_text() == "1"


def test_concurrent_jobs_share_one_unpack(envs: RuntimeEnvs, cache: Path, tmp_path: Path) -> None:
    entries = [file(f"project/f{i}.txt", str(i) * 1000) for i in range(200)]
    archive = write_archive(tmp_path / "src" / "big.tar.gz", entries)
    barrier = threading.Barrier(4)
    results: list[Path | BaseException] = []

    def prepare() -> None:
        barrier.wait()
        try:
            results.append(envs.working_dir(str(archive)))
        except BaseException as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(results) == 4 and all(isinstance(r, Path) for r in results), results
    assert len(set(results)) == 1
    assert tree(results[0]) == {f"f{i}.txt": str(i) * 1000 for i in range(200)}  # type: ignore[arg-type]
    assert unpacked_dirs(cache) == [results[0]]


# -- unsafe archives ----------------------------------------------------------------------

UNSAFE = [
    (".zip", [file("ok.txt"), file("../evil.txt")], "../evil.txt"),
    (".zip", [file("sub/../../evil.txt")], "evil.txt"),
    (".zip", [file("/tmp/poolq-unsafe-evil.txt")], "/tmp/poolq-unsafe-evil.txt"),
    (".zip", [symlink("outward", "../evil-target")], "outward"),
    (".zip", [symlink("sub/outward", "../../evil-target")], "outward"),
    (".zip", [symlink("rooted", "/etc/passwd")], "rooted"),
    (".tar.gz", [file("ok.txt"), file("../evil.txt")], "../evil.txt"),
    (".tgz", [file("a/../../evil.txt")], "evil.txt"),
    (".tar.xz", [file("../evil.txt")], "../evil.txt"),
    (".tar.gz", [file("/tmp/poolq-unsafe-evil.txt")], "poolq-unsafe-evil.txt"),
    (".tar.gz", [symlink("outward", "../evil-target"), file("outward/evil.txt")], "outward"),
    (".tar.gz", [symlink("rooted", "/etc")], "rooted"),
    (".tar.gz", [file("inside.txt"), hardlink("hard", "../evil-target")], "hard"),
    (".tar.gz", [device("null")], "null"),
]


@pytest.mark.parametrize(
    ("suffix", "entries", "named"),
    UNSAFE,
    ids=[
        "zip-dotdot",
        "zip-dotdot-inside-path",
        "zip-absolute",
        "zip-symlink-out",
        "zip-nested-symlink-out",
        "zip-absolute-symlink",
        "tar-dotdot",
        "tgz-dotdot-inside-path",
        "tarxz-dotdot",
        "tar-absolute",
        "tar-symlink-then-write-through-it",
        "tar-absolute-symlink",
        "tar-hardlink-out",
        "tar-device",
    ],
)
def test_an_unsafe_archive_is_refused(
    envs: RuntimeEnvs, cache: Path, tmp_path: Path, suffix: str, entries: list[Entry], named: str
) -> None:
    archive = write_archive(tmp_path / "src" / f"bad{suffix}", entries)

    with pytest.raises(SetupFailed) as refused:
        envs.working_dir(f"file://{archive}")

    assert named in str(refused.value), "the message does not name the offending entry"
    assert not [p for p in tmp_path.rglob("*evil*") if p.parent != archive.parent], "an entry was written outside"
    assert not Path("/tmp/poolq-unsafe-evil.txt").exists()
    assert unpacked_dirs(cache) == [], "a refused archive left a directory in the cache"
    with pytest.raises(SetupFailed):  # refused again, never served half-unpacked from the cache
        envs.working_dir(str(archive))


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_links_that_stay_inside_are_allowed(envs: RuntimeEnvs, tmp_path: Path, suffix: str) -> None:
    archive = write_archive(
        tmp_path / "src" / f"links{suffix}",
        [
            file("data/real.txt", "real"),
            symlink("shortcut", "data/real.txt"),
            symlink("data/sibling", "../data/real.txt"),
        ],
    )

    unpacked = envs.working_dir(str(archive))

    assert (unpacked / "data" / "real.txt").read_text() == "real"
    if suffix != ".zip":  # zipfile writes a link as a file holding its target; tar makes the link
        assert (unpacked / "shortcut").read_text() == "real"
        assert (unpacked / "data" / "sibling").read_text() == "real"


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_corrupt_archive_is_refused(envs: RuntimeEnvs, cache: Path, tmp_path: Path, suffix: str) -> None:
    archive = tmp_path / f"corrupt{suffix}"
    archive.write_bytes(os.urandom(4096))

    with pytest.raises(SetupFailed, match=f"corrupt{suffix}"):
        envs.working_dir(str(archive))
    assert unpacked_dirs(cache) == []


# -- uploaded packages (gcs://_ray_pkg_….zip) ------------------------------------------------


def test_a_package_is_fetched_once_and_keeps_its_layout(cache: Path) -> None:
    fetched: list[str] = []
    payload = zip_bytes([file("pkgdir/main.py", "print(1)")])

    def fetch(tenant: str, uri: str) -> bytes | None:
        fetched.append((tenant, uri))
        return payload

    envs = RuntimeEnvs(cache, fetch)
    first = envs.working_dir("gcs://_ray_pkg_abc123.zip", "team-a")
    second = envs.working_dir("gcs://_ray_pkg_abc123.zip", "team-a")
    other = envs.working_dir("gcs://_ray_pkg_abc123.zip", "team-b")

    # Ray zips a directory's contents without a top directory: nothing is flattened.
    assert tree(first) == {"pkgdir/main.py": "print(1)"}
    assert first == second
    # Each tenant's packages are its own: another tenant's same name is fetched for it.
    assert other != first
    assert fetched == [("team-a", "gcs://_ray_pkg_abc123.zip"), ("team-b", "gcs://_ray_pkg_abc123.zip")]


@pytest.mark.parametrize(
    ("fetch", "also_named"),
    [
        (None, None),
        (lambda tenant, uri: None, None),
        (lambda tenant, uri: zip_bytes([file("../evil.txt")]), "../evil.txt"),
        (lambda tenant, uri: b"not a zip at all", None),
    ],
    ids=["no-fetcher", "not-uploaded", "unsafe-entry", "not-a-zip"],
)
def test_an_unusable_package_is_refused(
    cache: Path, tmp_path: Path, fetch: Callable[[str, str], bytes | None] | None, also_named: str | None
) -> None:
    with pytest.raises(SetupFailed) as refused:
        RuntimeEnvs(cache, fetch).working_dir("gcs://_ray_pkg_gone.zip")
    assert "_ray_pkg_gone.zip" in str(refused.value), "the message does not name the package"
    if also_named:
        assert also_named in str(refused.value)
    assert not list(tmp_path.rglob("*evil*"))


# -- pip ----------------------------------------------------------------------------------


def venv_python(venv: Path, code: str) -> str:
    done = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize(
    "spec",
    [None, [], {"packages": []}, {"packages": None}],
    ids=["none", "empty-list", "empty-object", "null-packages"],
)
def test_no_requirements_means_no_environment(envs: RuntimeEnvs, cache: Path, spec: Any) -> None:
    assert envs.pip_env(spec) is None
    assert not (cache / "pip").exists()


@pytest.mark.slow
@pytest.mark.parametrize("form", ["list", "object", "object-with-pip-check"])
def test_requirements_are_installed_into_a_cached_environment(
    envs: RuntimeEnvs, cache: Path, tmp_path: Path, form: str
) -> None:
    wheel = str(build_wheel(tmp_path / "wheels"))
    spec: Any = {
        "list": [wheel],
        "object": {"packages": [wheel]},
        "object-with-pip-check": {"packages": [wheel], "pip_check": True},
    }[form]

    venv = envs.pip_env(spec)

    assert venv is not None and venv.is_relative_to(cache)
    assert venv_python(venv, "import poolq_probe; print(poolq_probe.VALUE)") == "probe-42"
    (venv / "left-by-job-1").write_text("still here")
    assert envs.pip_env(spec) == venv
    assert RuntimeEnvs(cache).pip_env(spec) == venv  # a restarted agent reuses it too
    assert (venv / "left-by-job-1").exists(), "the environment was rebuilt"


@pytest.mark.slow
def test_different_requirements_get_different_environments(envs: RuntimeEnvs, tmp_path: Path) -> None:
    one = build_wheel(tmp_path / "one", value="one")
    two = build_wheel(tmp_path / "two", name="poolq_other", value="two")

    first = envs.pip_env([str(one)])
    second = envs.pip_env([str(one), str(two)])

    assert first is not None and second is not None and first != second
    assert (
        venv_python(second, "import poolq_probe, poolq_other; print(poolq_probe.VALUE, poolq_other.VALUE)") == "one two"
    )
    assert venv_python(first, "import importlib.util as u; print(u.find_spec('poolq_other') is None)") == "True"


@pytest.mark.slow
def test_concurrent_jobs_share_one_environment(envs: RuntimeEnvs, cache: Path, tmp_path: Path) -> None:
    wheel = str(build_wheel(tmp_path / "wheels"))
    barrier = threading.Barrier(3)
    results: list[Path | None | BaseException] = []

    def prepare() -> None:
        barrier.wait()
        try:
            results.append(envs.pip_env([wheel]))
        except BaseException as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)

    assert len(results) == 3 and all(isinstance(r, Path) for r in results), results
    assert len(set(results)) == 1
    assert [p for p in (cache / "pip").iterdir() if p.is_dir()] == [results[0]]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make_requirement", "in_message"),
    [
        (lambda tmp: str(tmp / "nowhere" / "missing_pkg-0.1-py3-none-any.whl"), "missing_pkg-0.1-py3-none-any.whl"),
        (lambda tmp: str(_not_a_wheel(tmp)), "broken_pkg-0.1-py3-none-any.whl"),
    ],
    ids=["missing-file", "broken-wheel"],
)
def test_a_failed_install_is_reported_and_not_cached(
    envs: RuntimeEnvs, cache: Path, tmp_path: Path, make_requirement: Callable[[Path], str], in_message: str
) -> None:
    requirement = make_requirement(tmp_path)

    for attempt in range(2):  # a failure is never remembered as a ready environment
        with pytest.raises(SetupFailed) as failed:
            envs.pip_env([requirement])
        assert "pip install" in str(failed.value), f"attempt {attempt}"
        assert in_message in str(failed.value), f"attempt {attempt}: pip's error is not in the message"


def _not_a_wheel(tmp: Path) -> Path:
    path = tmp / "broken_pkg-0.1-py3-none-any.whl"
    path.write_bytes(b"this is not a zip file")
    return path


@pytest.mark.parametrize(
    ("pip_version", "installed"),
    [
        (None, None),
        ("==22.0.2;python_version=='3.8.11'", "==22.0.2"),  # as Ray sends it; the marker is not evaluated
        ("22.0.2", "==22.0.2"),
        (" >=22, <24 ", ">=22, <24"),
    ],
)
def test_pip_version_becomes_a_pip_requirement(pip_version: str | None, installed: str | None) -> None:
    assert _pip_spec({"packages": ["x"], "pip_version": pip_version}) == (["x"], installed, False)


# -- what pip sees ------------------------------------------------------------------------------

# A PEP 517 backend inside the project itself (no build requirements, so nothing to download):
# building the wheel records the environment the build ran in, then hands over a prebuilt wheel.
RECORDING_BACKEND = """
import json, os, shutil

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with open({record!r}, "w") as handle:
        json.dump(dict(os.environ), handle)
    return os.path.basename(shutil.copy({wheel!r}, wheel_directory))
"""


def recording_project(directory: Path, record: Path, wheel: Path) -> Path:
    """A local project whose build writes os.environ to ``record``."""
    directory.mkdir(parents=True)
    (directory / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "recorder"\nbackend-path = ["."]\n'
    )
    (directory / "recorder.py").write_text(RECORDING_BACKEND.format(record=str(record), wheel=str(wheel)))
    return directory


@pytest.mark.slow
def test_pip_runs_without_the_agents_secrets(
    envs: RuntimeEnvs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POOLQ_REDIS_URL", "redis://:secret-password@127.0.0.1:6379/0")
    monkeypatch.setenv("POOLQ_AUTH", "tokens")
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")  # an operator's pip setting
    monkeypatch.setenv("NO_PROXY", "internal.example")
    record = tmp_path / "build-env.json"
    project = recording_project(tmp_path / "project", record, build_wheel(tmp_path / "wheels"))

    venv = envs.pip_env([str(project)])

    assert venv is not None and venv_python(venv, "import poolq_probe; print(poolq_probe.VALUE)") == "probe-42"
    seen = json.loads(record.read_text())
    assert not [name for name in seen if name.startswith("POOLQ_")], "pip saw the agent's settings"
    assert "secret-password" not in record.read_text()
    assert seen["PIP_DISABLE_PIP_VERSION_CHECK"] == "1" and seen["NO_PROXY"] == "internal.example"
    assert seen["PATH"].endswith(os.environ["PATH"]) and seen["HOME"] == os.environ["HOME"]  # pip prepends its own


# -- archive bombs and a full disk --------------------------------------------------------------



def compressible(count: int, size: int) -> list[Entry]:
    """``count`` files of ``size`` "0"s: megabytes that pack into a few kilobytes."""
    return [file(f"bomb/f{i}.txt", "0" * size) for i in range(count)]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_an_archive_that_unpacks_past_the_limit_is_refused(cache: Path, tmp_path: Path, suffix: str) -> None:
    archive = write_archive(tmp_path / "src" / f"bomb{suffix}", compressible(16, 300 * KiB))  # 4.7 MiB
    assert archive.stat().st_size < 64 * KiB

    with pytest.raises(SetupFailed) as refused:
        RuntimeEnvs(cache, max_unpacked_bytes=1 * MiB).working_dir(str(archive))

    message = str(refused.value)
    assert f"archive bomb{suffix} unpacks to more than 1 MiB (the node's limit, POOLQ_MAX_UNPACKED_BYTES)" in message
    assert "1.2 MiB in its first 4 entries" in message, message  # how far past the limit, when it stopped
    assert unpacked_dirs(cache) == [], "a refused archive left a directory in the cache"


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_an_archive_with_too_many_entries_is_refused(cache: Path, tmp_path: Path, suffix: str) -> None:
    archive = write_archive(tmp_path / "src" / f"many{suffix}", [file(f"f{i}", "") for i in range(11)])

    with pytest.raises(
        SetupFailed, match=r"archive many\S+ has more than 10 entries \(the node's limit, POOLQ_MAX_ARCHIVE_ENTRIES\)"
    ):
        RuntimeEnvs(cache, max_archive_entries=10).working_dir(str(archive))
    assert unpacked_dirs(cache) == []
    # At the limit it is fine.
    assert len(tree(RuntimeEnvs(cache, max_archive_entries=11).working_dir(str(archive)))) == 11


def test_a_package_that_unpacks_past_the_limit_is_refused(cache: Path) -> None:
    payload = zip_bytes(compressible(8, 256 * KiB))
    envs = RuntimeEnvs(cache, lambda tenant, uri: payload, max_unpacked_bytes=1 * MiB)

    with pytest.raises(SetupFailed, match=r"archive _ray_pkg_bomb.zip unpacks to more than 1 MiB"):
        envs.working_dir("gcs://_ray_pkg_bomb.zip")


def lie_about_sizes(archive: Path, declared: int) -> None:
    """Rewrite a zip's central directory so that every entry claims ``declared`` "0"s."""
    data = bytearray(archive.read_bytes())
    crc = zlib.crc32(b"0" * declared)
    at = data.find(b"PK\x01\x02")
    while at != -1:
        struct.pack_into("<I", data, at + 16, crc)
        struct.pack_into("<I", data, at + 24, declared)
        at = data.find(b"PK\x01\x02", at + 4)
    archive.write_bytes(bytes(data))


def test_a_zip_whose_sizes_lie_writes_no_more_than_it_declares(cache: Path, tmp_path: Path) -> None:
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for i in range(4):
            zipped.writestr(f"f{i}.txt", "0" * (4 * MiB))  # 16 MiB in truth
    lie_about_sizes(archive, 1000)

    unpacked = RuntimeEnvs(cache, max_unpacked_bytes=4000).working_dir(str(archive))

    # zipfile stops each entry at its declared size: the declared total bounds what is written.
    assert tree(unpacked) == {f"f{i}.txt": "0" * 1000 for i in range(4)}


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, mounted for this test."""
    with tiny_tmpfs(tmp_path / "disk", 1 * MiB) as mount:
        yield mount


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_a_full_disk_while_unpacking_is_reported(full_disk: Path, tmp_path: Path, suffix: str) -> None:
    archive = write_archive(tmp_path / "src" / f"big{suffix}", compressible(8, 512 * KiB))  # 4 MiB
    cache = full_disk / "cache"

    with pytest.raises(SetupFailed) as failed:
        RuntimeEnvs(cache).working_dir(str(archive))

    assert f"the node's disk is full: archive big{suffix} could not be unpacked" in str(failed.value)
    assert unpacked_dirs(cache) == []
    assert sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) == 0, "the partial unpack was left"
