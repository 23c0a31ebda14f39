"""The rule behind poolq's fault handling (docs/faults.md), step by step, in-process on the real Redis.

Every Lua step is safe to run twice and answers the second time from what the first
did; claims fence off a placement worker that was paused past its lease; a limit can
never be mistaken for a resource. Each test here reproduces a defect found by review
(the fault issue's items 1, 3, 6, 7, 8 and 11) and fails on the code before its fix.
Lost replies over a real socket and paused processes are in tests/faults/.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from api_shim.app import App
from poolq import keys
from poolq.errors import Conflict
from poolq.nodes import NodeAdmin, capacity_of
from poolq.quotas import set_quota
from poolq.settings import Settings
from poolq.store import JobStore
from poolq.store import finish_keys as store_finish_keys
from tests import kit
from tests.kit import GiB, add_node
from tests.wsgi import call
from worker.duties import Duties
from worker.scheduler import Decision, Scheduler
from worker.scheduler import claim as claim_script
from worker.scheduler import reserve as reserve_script


def body(submission_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "entrypoint": "true",
        "runtime_env": {"working_dir": "/tmp"},
        "submission_id": submission_id,
        "entrypoint_num_cpus": 1,
        "entrypoint_memory": 134217728,
        **fields,
    }


def submit(app: App, job: dict[str, Any], tenant: str = "default", timeout_ms: int = 0) -> None:
    kit.submit(app, job, tenant=tenant, timeout_ms=timeout_ms)


def job_fields(client: redis.Redis, submission_id: str, tenant: str = "default") -> dict[str, str]:
    return dict(client.hgetall(keys.job(keys.ref(tenant, submission_id))))


def claim(store: JobStore, claim_id: str, sigs: list[str], tenants: list[str], lease_ms: int = 30_000) -> list[Any]:
    """claim.lua, called as Scheduler.round calls it."""
    return list(claim_script(store.scripts, claim_id, sigs, tenants, 256, lease_ms, 60_000))


def reserve(store: JobStore, claim_id: str, job_ref: str, node_id: str, seq: int, requests: str) -> int:
    """reserve.lua for one decision, as Scheduler._reserve calls it; returns its code."""
    sig = store.redis.hget(keys.job(job_ref), "shape") or ""
    decision = Decision(job_ref, sig, node_id, keys.split_ref(job_ref)[0], seq, requests)
    results, _ = reserve_script(store.scripts, claim_id, [decision], store.settings)
    return int(results[0])


# -- item 1: limits are not resources ---------------------------------------------------


def test_a_rate_quota_does_not_break_placement(app: App, store: JobStore, admin: NodeAdmin, redis_client: redis.Redis) -> None:
    """`quota set --rate 200` stored "200.0" beside the resource limits, and the placement
    round's int() on it failed every claimed job of every tenant."""
    add_node(admin, "n1", pool="default")
    set_quota(store.redis, "team-a", rate=200.0, max_pending=50)
    submit(app, body("app-rated"), tenant="team-a")
    submit(app, body("app-other"), tenant="team-b")
    Scheduler(store).place_waiting()
    assert job_fields(redis_client, "app-rated", "team-a").get("node") == "n1"
    assert job_fields(redis_client, "app-other", "team-b").get("node") == "n1"


def test_a_resource_named_like_a_limit_is_not_checked_against_it(app: App, store: JobStore, admin: NodeAdmin,
                                                                 redis_client: redis.Redis) -> None:
    add_node(admin, "n1", pool="default", resources={"max_pending": 500, "rate": 500})
    set_quota(store.redis, "team-a", max_pending=5, rate=1000.0, burst=1000)
    submit(app, body("app-custom", entrypoint_resources={"max_pending": 100, "rate": 100}), tenant="team-a")
    Scheduler(store).place_waiting()
    assert job_fields(redis_client, "app-custom", "team-a").get("node") == "n1"


# -- item 3: a claim is safe to repeat; a failed round gives its jobs back ---------------


def test_a_claim_sent_twice_answers_the_same_jobs_and_claims_no_more(app: App, store: JobStore,
                                                                     redis_client: redis.Redis) -> None:
    for i in range(3):
        submit(app, body(f"app-c{i}"))
    sig = job_fields(redis_client, "app-c0")["shape"]
    first = claim(store, "w1.1", [sig], ["default"])
    submit(app, body("app-c3"))  # arrives between the lost reply and the retry
    again = claim(store, "w1.1", [sig], ["default"])
    assert again == first and len(first) == 9
    assert redis_client.zcard(keys.CLAIMED) == 3
    assert redis_client.zrange(keys.shape_queue(sig), 0, -1) == ["default:app-c3"]


def test_a_round_that_fails_gives_its_jobs_back_at_once(app: App, store: JobStore, admin: NodeAdmin,
                                                        redis_client: redis.Redis) -> None:
    """A placement round that raised anything but a Redis error left its claimed jobs to
    the 30 s lease, past their deadlines: they failed SCHEDULE_TIMEOUT with free nodes."""
    add_node(admin, "n1", pool="default")
    submit(app, body("app-r1"), timeout_ms=600_000)
    submit(app, body("app-r2"), timeout_ms=600_000)
    redis_client.hset(keys.node("n1"), "cap:CPU", "eight")  # a node record that breaks the round
    scheduler = Scheduler(store)
    with pytest.raises(ValueError):
        scheduler.place_waiting()
    assert redis_client.zcard(keys.CLAIMED) == 0, "the failed round's jobs wait out a lease"
    sig = job_fields(redis_client, "app-r1")["shape"]
    assert set(redis_client.zrange(keys.shape_queue(sig), 0, -1)) == {"default:app-r1", "default:app-r2"}
    # They come back as suspects, each claimed alone; repaired, the node takes them.
    redis_client.hset(keys.node("n1"), "cap:CPU", "8000")
    redis_client.xadd(keys.INVENTORY_LOG, {"n": "n1"})
    scheduler.place_waiting()
    assert {job_fields(redis_client, i).get("node") for i in ("app-r1", "app-r2")} == {"n1"}


def test_a_job_that_fails_every_round_it_is_alone_in_is_given_up(app: App, store: JobStore, admin: NodeAdmin,
                                                                 redis_client: redis.Redis) -> None:
    add_node(admin, "n1", pool="default")
    submit(app, body("app-poison"), timeout_ms=600_000)
    redis_client.hset(keys.node("n1"), "cap:CPU", "eight")
    scheduler = Scheduler(store)
    for _ in range(3):
        with pytest.raises(ValueError):
            scheduler.place_waiting()
    scheduler.place_waiting()  # nothing left to place
    fields = job_fields(redis_client, "app-poison")
    assert fields["status"] == "FAILED" and fields["error_type"] == "INVALID_REQUEST", fields
    assert "placement stopped 3 times" in fields["message"]


# -- item 7 and fencing: only the claim holding a job may reserve or requeue it ------------


def test_a_worker_paused_past_its_lease_cannot_place_the_jobs_the_sweep_gave_away(
    app: App, store: JobStore, admin: NodeAdmin, redis_client: redis.Redis
) -> None:
    add_node(admin, "n1", pool="default")
    submit(app, body("app-p1"))
    sig = job_fields(redis_client, "app-p1")["shape"]
    flat = claim(store, "paused.1", [sig], ["default"], lease_ms=1)
    seq = int(flat[2])
    time.sleep(0.05)
    duties = Duties(store, Scheduler(store))
    duties.recover_claims(int(time.time() * 1000) + 10)  # the sweep: the lease expired
    assert redis_client.zrange(keys.shape_queue(sig), 0, -1) == ["default:app-p1"]
    claim(store, "live.1", [sig], ["default"])  # another worker claims it
    # The paused worker resumes and acts on its old claim: refused, nothing touched.
    assert reserve(store, "paused.1", "default:app-p1", "n1", seq, "CPU=1000,memory=134217728") == 5
    assert "node" not in job_fields(redis_client, "app-p1")
    Scheduler(store)._requeue("paused.1", [("default:app-p1", sig, seq)], {})
    assert redis_client.hget(keys.CLAIMS, "default:app-p1") == "live.1"
    assert redis_client.zscore(keys.CLAIMED, "default:app-p1") is not None
    assert redis_client.zcard(keys.shape_queue(sig)) == 0
    # The live claim places it.
    assert reserve(store, "live.1", "default:app-p1", "n1", seq, "CPU=1000,memory=134217728") == 0
    assert job_fields(redis_client, "app-p1")["node"] == "n1"


def test_a_reservation_sent_twice_is_made_once(app: App, store: JobStore, admin: NodeAdmin,
                                              redis_client: redis.Redis) -> None:
    add_node(admin, "n1", pool="default")
    submit(app, body("app-twice"))
    sig = job_fields(redis_client, "app-twice")["shape"]
    seq = int(claim(store, "w.1", [sig], ["default"])[2])
    assert reserve(store, "w.1", "default:app-twice", "n1", seq, "CPU=1000,memory=134217728") == 0
    assert reserve(store, "w.1", "default:app-twice", "n1", seq, "CPU=1000,memory=134217728") == 0
    assert redis_client.hget(keys.node("n1"), "res:CPU") == "1000"
    assert admin.check() == []


def test_stop_delete_and_resubmit_during_a_round_do_not_place_the_new_job_as_the_old(
    app: App, store: JobStore, admin: NodeAdmin, redis_client: redis.Redis
) -> None:
    """The round claimed the old job; meanwhile it was stopped, deleted and submitted again
    under its id with other resources. The old decision must not place the new job."""
    add_node(admin, "n1", cpus=16, pool="default")
    submit(app, body("app-same", entrypoint_num_cpus=1))
    old = job_fields(redis_client, "app-same")
    flat = claim(store, "w.7", [old["shape"]], ["default"])
    assert call(app, "POST", "/api/jobs/app-same/stop").status == 200
    assert call(app, "DELETE", "/api/jobs/app-same").status == 200
    submit(app, body("app-same", entrypoint_num_cpus=4))
    new = job_fields(redis_client, "app-same")
    assert reserve(store, "w.7", "default:app-same", "n1", int(flat[2]), "CPU=1000,memory=134217728") == 5
    Scheduler(store)._requeue("w.7", [("default:app-same", old["shape"], int(flat[2]))], {})
    assert "node" not in job_fields(redis_client, "app-same")
    assert redis_client.zrange(keys.shape_queue(new["shape"]), 0, -1, withscores=True) == [
        ("default:app-same", float(new["seq"]))
    ]
    assert redis_client.zcard(keys.shape_queue(old["shape"])) == 0
    Scheduler(store).place_waiting()
    assert job_fields(redis_client, "app-same")["res"] == "CPU=4000,memory=134217728"
    assert admin.check() == []


# -- item 6: appending output costs what is appended ------------------------------------


def test_appending_to_a_full_log_tail_does_not_copy_the_tail(app: App, store: JobStore,
                                                             redis_client: redis.Redis) -> None:
    submit(app, body("app-chatty"))
    job_ref = "default:app-chatty"
    limit, chunk = 256 * 1024, b"y\n" * 8192  # 16 KiB per append
    append = store.scripts.log_append
    sent = 0
    for _ in range(40):  # 640 KiB through a 256 KiB tail
        end = append(keys=[keys.log(job_ref), keys.job(job_ref)], args=[chunk, limit, sent])
        sent += len(chunk)
        assert end == sent
    redis_client.config_resetstat()
    for _ in range(20):
        append(keys=[keys.log(job_ref), keys.job(job_ref)], args=[chunk, limit, sent])
        sent += len(chunk)
    stats = redis_client.info("commandstats")
    # Each append pushes its chunk and drops whole chunks: nothing reads or rewrites the tail.
    for command in ("cmdstat_getrange", "cmdstat_set", "cmdstat_get", "cmdstat_lrange"):
        assert command not in stats, stats.get(command)
    assert stats["cmdstat_rpush"]["calls"] == 20
    text, next_offset = store.logs("default", "app-chatty")
    assert next_offset == sent and len(text) <= limit and text.endswith("y\n")
    assert redis_client.llen(keys.log(job_ref)) == limit // len(chunk)


def test_a_log_append_sent_twice_appends_once(app: App, store: JobStore) -> None:
    submit(app, body("app-once"))
    job_ref = "default:app-once"
    log_keys = [keys.log(job_ref), keys.job(job_ref)]
    store.scripts.log_append(keys=log_keys, args=[b"hello ", 1024, 0])
    store.scripts.log_append(keys=log_keys, args=[b"hello ", 1024, 0])  # the retry of a lost reply
    store.scripts.log_append(keys=log_keys, args=[b"hello world\n", 1024, 0])  # partly sent before
    assert store.logs("default", "app-once") == ("hello world\n", 12)
    assert store.logs("default", "app-once", offset=6) == ("world\n", 12)


# -- item 8: an old agent's shutdown leaves a new agent's node alone -----------------------


def test_an_old_agent_shutting_down_leaves_the_node_of_a_new_agent_alone(admin: NodeAdmin,
                                                                         redis_client: redis.Redis) -> None:
    capacity = capacity_of(4, 8 * GiB)
    old = admin.upsert("n9", pool="default", labels={}, capacity=capacity, kind="agent", create=False, token="a")
    new = admin.upsert("n9", pool="default", labels={}, capacity=capacity, kind="agent", create=False, token="b")
    assert new == old + 1
    admin.drain("n9", shutdown=True, incarnation=old)
    assert admin.remove("n9", incarnation=old) == []
    fields = redis_client.hgetall(keys.node("n9"))
    assert fields["state"] == "live" and fields["drained"] == "0" and fields["incarnation"] == str(new)
    with pytest.raises(Conflict, match="live node agent"):
        admin.remove("n9")  # an operator: the agent's next heartbeat would bring it back
    admin.remove("n9", incarnation=new)  # the new agent shutting down
    assert not redis_client.exists(keys.node("n9"))


def test_a_registration_sent_twice_makes_one_incarnation(admin: NodeAdmin) -> None:
    capacity = capacity_of(4, 8 * GiB)
    first = admin.upsert("n8", pool="default", labels={}, capacity=capacity, kind="agent", create=False, token="t1")
    assert admin.upsert("n8", pool="default", labels={}, capacity=capacity, kind="agent", create=False, token="t1") == first


# -- item 11: nothing a waiting job needs is forgotten -----------------------------------


def test_a_package_is_kept_while_a_job_that_runs_from_it_waits(store: JobStore, redis_client: redis.Redis,
                                                              settings: Settings) -> None:
    import dataclasses

    short = dataclasses.replace(settings, retention_s=1)
    app = App(short)
    name = "_ray_pkg_0123456789abcdef.zip"
    put = call(app, "PUT", f"/api/packages/gcs/{name}", raw=b"PK\x05\x06" + b"\0" * 18, content_type=None)
    assert put.status == 200, put.body
    submit(app, body("app-waits", runtime_env={"working_dir": f"gcs://{name}"}))  # no node: it waits
    time.sleep(1.2)
    duties = Duties(JobStore(store.redis, short), Scheduler(JobStore(store.redis, short)))
    duties.expire_packages(int(time.time() * 1000))
    assert redis_client.exists(keys.package("default", name)), "the waiting job's package was removed"
    assert call(app, "POST", "/api/jobs/app-waits/stop").status == 200
    time.sleep(1.2)
    duties.expire_packages(int(time.time() * 1000))
    assert not redis_client.exists(keys.package("default", name))
    assert not redis_client.hget(keys.tenant_package_sizes("default"), name)


def test_a_shape_is_kept_while_its_jobs_are_claimed(app: App, store: JobStore, redis_client: redis.Redis) -> None:
    submit(app, body("app-held"))
    sig = job_fields(redis_client, "app-held")["shape"]
    claim(store, "w.9", [sig], ["default"])  # its queue empties: the shape is idle
    assert redis_client.zscore(keys.SHAPES_IDLE, sig) is not None
    duties = Duties(store, Scheduler(store))
    duties.forget_idle_shapes(int(time.time() * 1000) + 2 * 3_600_000)  # a long outage later
    assert redis_client.hget(keys.shape(sig), "spec"), "the claimed job's shape was forgotten"
    assert call(app, "POST", "/api/jobs/app-held/stop").status == 200
    duties.forget_idle_shapes(int(time.time() * 1000) + 4 * 3_600_000)
    assert not redis_client.exists(keys.shape(sig))


# -- the ambiguous outcome of a stop ------------------------------------------------------


def test_a_stop_sent_twice_answers_as_the_first(app: App, store: JobStore) -> None:
    submit(app, body("app-stop2"))
    job_ref = "default:app-stop2"
    token = "tok-1"
    args = [job_ref, "", "STOPPED", "STOPPED_BY_USER", "stopped by user request", "", ",PENDING,RUNNING,", 2000,
            "stop", token, "", "1000", 60_000]
    finish_keys = store_finish_keys(job_ref, "", store.redis.hget(keys.job(job_ref), "shape") or "")
    assert store.scripts.finish(keys=finish_keys, args=args)[0] == 1
    assert store.scripts.finish(keys=finish_keys, args=args)[0] == 1  # the retry: still "stopped"
    other = [*args[:-4], "tok-2", "", "1000", 60_000]
    assert store.scripts.finish(keys=finish_keys, args=other)[0] == 0  # another request: already ended
    assert store.redis.hget(keys.tenant_counts("default"), "STOPPED") == "1"
    assert store.redis.hget(keys.STATS, "completed:STOPPED:STOPPED_BY_USER") == "1"  # counted once, for three runs


def test_a_start_sent_twice_answers_the_same_runtime_limit(app: App, store: JobStore, admin: NodeAdmin) -> None:
    """start.lua's repeat (its reply was lost) tells the agent the limit in force and how
    much of it is left, from the deadline the first run recorded."""
    add_node(admin, "n1", pool="default")
    set_quota(store.redis, "default", runtime_limit_s=60)
    submit(app, body("app-lim1", runtime_limit_s=5))
    submit(app, body("app-lim2"))
    Scheduler(store).place_waiting()

    def start(job_ref: str) -> list[Any]:
        return list(store.scripts.start(
            keys=[keys.job(job_ref), keys.node_inbox("n1"), keys.tenant_counts("default"), keys.limits("default")],
            args=[job_ref, "n1", "running on node n1", "inc-1", 30_000],
        ))

    first = start("default:app-lim1")
    assert first == [1, 5000, 1, 5000, "job"]
    time.sleep(0.05)
    again = start("default:app-lim1")
    assert again[0] == 1 and 0 < again[1] < 5000 and again[3:] == [5000, "job"], again
    assert start("default:app-lim2")[3:] == [60_000, "tenant"]  # the tenant's before the node's
    set_quota(store.redis, "default", runtime_limit_s=0)  # none from now on
    assert start("default:app-lim2")[3:] == [60_000, "tenant"]  # as it was when it started
    submit(app, body("app-lim3"))
    Scheduler(store).place_waiting()
    assert start("default:app-lim3")[3:] == [30_000, "node"]
