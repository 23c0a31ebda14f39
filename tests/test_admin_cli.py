"""The operator's commands, ``poolq nodes|quota|token …`` (docs/operations.md): where they
find the stack, ``--json`` on each, and one line — never a traceback — when Redis does
not answer. They run as real ``python -m poolq`` subprocesses against the session's real
redis-server (or against a port where nothing listens)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from poolq.embedded import free_port
from poolq.settings import Settings

# Every admin command, with the arguments it needs.
COMMANDS = [
    ["nodes", "add", "--id", "adm-n1", "--cpus", "2", "--memory", "8Gi"],
    ["nodes", "list"],
    ["nodes", "drain", "adm-n1"],
    ["nodes", "check"],
    ["nodes", "remove", "adm-n1"],
    ["quota", "set", "team-a", "--cpus", "4", "--memory", "16Gi", "--max-pending", "10"],
    ["quota", "show", "team-a"],
    ["quota", "clear", "team-a"],
    ["token", "create", "team-a"],
    ["token", "list"],
    ["token", "revoke", "0123456789ab"],
]


def poolq(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POOLQ_")}
    return subprocess.run([sys.executable, "-m", "poolq", *args], env={**clean, **env}, cwd=cwd, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def as_json(env: dict[str, str], *args: str) -> Any:
    done = poolq(env, *args, "--json")
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return json.loads(done.stdout)


@pytest.mark.processes
@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
def test_a_redis_that_does_not_answer_is_one_line_and_a_non_zero_exit(command: list[str], tmp_path: Path) -> None:
    env = {"POOLQ_REDIS_URL": f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0", "POOLQ_DATA_DIR": str(tmp_path)}
    done = poolq(env, *command)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip()
    assert line.startswith(f"poolq {command[0]} {command[1]}: Redis at redis://:***@127.0.0.1:"), line
    assert "does not answer" in line and "POOLQ_REDIS_URL" in line, line
    assert "s3cret-pw" not in line  # never the password


@pytest.mark.processes
def test_the_url_file_of_a_stopped_stack_names_its_data_directory(tmp_path: Path) -> None:
    (tmp_path / "redis.url").write_text(f"redis://:pw@127.0.0.1:{free_port()}/0\n")
    done = poolq({}, "quota", "show", "team-a", "--data-dir", str(tmp_path))
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert f"no poolq up is running on the data directory {tmp_path}" in done.stderr, done.stderr


@pytest.mark.processes
def test_every_command_answers_json(service_env: dict[str, str], redis_client: Any) -> None:
    env = service_env
    assert as_json(env, *COMMANDS[0]) == {"node_id": "adm-n1", "pool": "default", "added": True}
    [node] = as_json(env, "nodes", "list")
    assert node["node_id"] == "adm-n1" and node["capacity"]["memory"] == 8 * 1024**3
    assert as_json(env, "nodes", "drain", "adm-n1") == {"node_id": "adm-n1", "draining": True}
    assert as_json(env, "nodes", "check") == {"ok": True, "problems": []}
    assert as_json(env, "nodes", "remove", "adm-n1") == {"node_id": "adm-n1", "removed": True, "failed_jobs": []}

    view = {"tenant": "team-a", "resources": {"CPU": 4, "memory": 16 * 1024**3}, "limits": {"max_pending": 10}}
    assert as_json(env, *COMMANDS[5]) == view
    assert as_json(env, "quota", "show", "team-a") == view
    assert as_json(env, "quota", "clear", "team-a") == {"tenant": "team-a", "cleared": True}
    assert as_json(env, "quota", "show", "team-a") == {"tenant": "team-a", "resources": {}, "limits": {}}

    made = as_json(env, "token", "create", "team-a")
    assert set(made) == {"token", "token_id", "tenant"} and made["tenant"] == "team-a"
    assert made["token"].startswith(f"pq_{made['token_id']}_")
    listed = as_json(env, "token", "list")
    assert [(t["token_id"], t["tenant"]) for t in listed] == [(made["token_id"], "team-a")]
    assert made["token"] not in json.dumps(listed)
    assert as_json(env, "token", "revoke", made["token_id"]) == {"revoked": True}
    assert as_json(env, "token", "list") == []


@pytest.mark.processes
def test_text_output_shows_sizes_as_people_write_them(service_env: dict[str, str], redis_client: Any) -> None:
    assert poolq(service_env, *COMMANDS[0]).returncode == 0
    listing = poolq(service_env, "nodes", "list").stdout
    assert " 8.0Gi/8.0Gi " in listing and "8589934592" not in listing, listing
    shown = poolq(service_env, "quota", "set", "team-a", "--memory", "512Mi", "--rate", "5").stdout
    assert shown.splitlines()[0] == "team-a"
    assert any(line.split() == ["memory", "512.0Mi"] for line in shown.splitlines()), shown
    assert any(line.split() == ["rate", "5.0"] for line in shown.splitlines()), shown


@pytest.mark.processes
@pytest.mark.parametrize("amount", ["-1", "1e30", "nan", "inf", "two"])
def test_a_node_of_an_impossible_size_is_refused_naming_the_amount(service_env: dict[str, str], amount: str,
                                                                   redis_client: Any) -> None:
    done = poolq(service_env, "nodes", "add", "--id", "adm-bad", "--cpus", amount, "--memory", "1Gi")
    assert done.returncode != 0 and done.stderr.count("\n") == 1, done.stderr
    assert f"CPU must be a number from 0 to 1,000,000,000, not {amount}" in done.stderr, done.stderr
    assert "adm-bad" not in poolq(service_env, "nodes", "list").stdout


@pytest.mark.processes
def test_data_dir_flag_beats_the_environment(redis_server: Any, tmp_path: Path, redis_client: Any) -> None:
    """--data-dir > POOLQ_DATA_DIR: the URL file of the named directory is the one used."""
    named = tmp_path / "named"
    named.mkdir()
    (named / "redis.url").write_text(redis_server.url + "\n")
    env = {"POOLQ_DATA_DIR": str(tmp_path / "nothing-here")}
    assert poolq(env, "nodes", "list").returncode == 2  # POOLQ_DATA_DIR names a directory without a stack
    done = poolq(env, "nodes", "list", "--json", "--data-dir", str(named), cwd=tmp_path)
    assert done.returncode == 0 and json.loads(done.stdout) == [], done.stderr


@pytest.mark.parametrize(
    ("environ", "flag", "expected"),
    [
        ({"POOLQ_DATA_DIR": "/srv/pq", "XDG_STATE_HOME": "/x", "HOME": "/home/u"}, "/flag", "/flag"),
        ({"POOLQ_DATA_DIR": "/srv/pq", "XDG_STATE_HOME": "/x", "HOME": "/home/u"}, None, "/srv/pq"),
        ({"XDG_STATE_HOME": "/x", "HOME": "/home/u"}, None, "/x/poolq"),
        ({"XDG_STATE_HOME": "relative", "HOME": "/home/u"}, None, "/home/u/.local/state/poolq"),
        ({"HOME": "/home/u"}, None, "/home/u/.local/state/poolq"),
    ],
    ids=["flag", "POOLQ_DATA_DIR", "XDG_STATE_HOME", "relative XDG ignored", "home"],
)
def test_the_data_directory_rule(environ: dict[str, str], flag: str | None, expected: str) -> None:
    assert Settings.from_env(environ, data_dir=flag).data_dir == Path(expected)
