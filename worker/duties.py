"""Periodic duties, run by every placement worker and done once at a time under a Redis lock.

There is no beat process to forget (docs/architecture.md). Each tick, whichever worker holds
the lock:

- fails jobs whose scheduling deadline passed (also when no attempt was ever made);
- puts back in line jobs whose failed attempt will run again, once their backoff ends;
- makes blocked shapes whose backoff ended ready again;
- puts back in line jobs claimed by a worker that died (expired leases);
- declares nodes whose heartbeat expired lost, failing their jobs as NODE_LOST;
- re-sends a placement wake-up when jobs wait and none is on its way (lost messages);
- removes terminal jobs past their retention, oldest first, and packages no job uses;
- puts back on the queue the messages of poolq.submit consumers that stopped;
- forgets tenants left with no job, and recounts the others' status counts;
- keeps a sample of the queue and the placement counters every 10 s, for an hour (poolq/history.py).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter, defaultdict

import redis

from poolq import history, keys, packages, queues
from poolq.model import ARRAY, TERMINAL_STATUSES, ErrorType, JobFields, JobStatus, scheduling_progress
from poolq.redis_io import now_ms
from poolq.store import WAKE_TTL_MS, Ending, JobStore, Submitted
from worker.intake import Intake, return_taken
from worker.placement import timeout_message
from worker.scheduler import Held, Scheduler, give_up_poison, requeue

log = logging.getLogger("poolq.duties")

BATCH = 500
RESOLVE_BATCH = 1000  # dependents one resolve.lua run takes
SHAPE_IDLE_MS = 3_600_000  # a claimed job holds its lease for seconds, never this long
STALLED_S = 5.0  # a process with ready jobs and unconsumed wake-ups that placed nothing for this long


def metric_reason(reason: str) -> str:
    """A reason as a metric label: custom resource names (chosen by users, unbounded)
    become ``custom resource``, so the series stay few."""
    name, sep, kind = reason.partition(": ")
    if sep and name not in ("CPU", "Memory", "GPU"):
        return f"custom resource: {kind}"
    return reason


class Duties:
    def __init__(self, store: JobStore, scheduler: Scheduler, intake: Intake | None = None):
        self.store = store
        self.redis: redis.Redis = store.redis
        self.settings = store.settings
        self.scheduler = scheduler
        self.intake = intake
        self._next_tenant_check = 0
        self._tenant_cursor = 0
        self._intake_silent = False
        self._sampled_slot = -1

    def tick(self) -> bool:
        """Run every duty once if no other worker is; True if this one did."""
        # The lock expires soon after a tick should end, so a worker killed while holding
        # it delays the duties by about a second, not more; it is renewed between duties.
        lock = self.redis.lock(keys.lock("duties"), timeout=max(1.0, self.settings.duty_interval_s * 4))
        if not lock.acquire(blocking=False):
            return False
        try:
            now = now_ms(self.redis)
            for duty in (
                self.resolve_dependencies,
                self.expire_deadlines,
                self.end_broken_gangs,
                self.retry_due,
                self.unblock_due,
                self.recover_claims,
                self.reap_nodes,
                self.purge_terminal,
                self.expire_packages,
                self.recover_intake,
                self.forget_idle_shapes,
                self.forget_idle_tenants,
                self.sample_history,
            ):
                duty(now)
                try:
                    lock.reacquire()
                except redis.exceptions.LockError:
                    return True  # a long duty outlived the lock: another worker carries on
            self.rewake()
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:
                pass  # it expired during a long tick; another worker may hold it now
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.duty_interval_s):
            try:
                self.tick()
                self.watch_consumers()
            except redis.RedisError as exc:
                log.warning("periodic duties skipped a tick: %s", exc)
            except Exception:
                log.exception("periodic duties failed a tick")

    def watch_consumers(self) -> None:
        """This process's consumers must keep consuming.

        Celery's consumer of wake-ups can stop for good while its process lives (seen
        after kombu logged "Couldn't ack"): when jobs are ready and wake-ups wait on the
        queue while this process has not placed for STALLED_S, place from here. A
        poolq.submit consumer that stopped beating is reported; the sweep of any worker
        puts its messages back on the queue (recover_intake).
        """
        if self.scheduler.idle_s() > STALLED_S and self.redis.zcard(keys.SHAPES_READY):
            if self.redis.llen(queues.PLACEMENT):
                log.warning("placement wake-ups are not being consumed here; placing from the duties thread")
                self.scheduler.place_waiting()
        if self.intake is not None:
            silent = not self.intake.alive(self.settings.intake_lease_s)
            if silent and not self._intake_silent:
                log.error(
                    "the poolq.submit consumer of this process stopped beating; its messages go back on the queue"
                )
            self._intake_silent = silent

    def expire_deadlines(self, now: int) -> int:
        refs = self.redis.zrangebyscore(keys.DEADLINES, "-inf", now, start=0, num=BATCH)
        if not refs:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for job_ref in refs:
            pipe.hgetall(keys.job(job_ref))
        jobs = pipe.execute()
        sigs = sorted({fields[JobFields.SHAPE] for fields in jobs if fields.get(JobFields.SHAPE)})
        for sig in sigs:
            pipe.hgetall(keys.shape(sig))
        shapes = dict(zip(sigs, pipe.execute()))
        failed = 0
        for job_ref, fields in zip(refs, jobs):
            if not fields.get(JobFields.SHAPE):
                self.redis.zrem(keys.DEADLINES, job_ref)  # the job is gone
                continue
            attempts, reason_list = scheduling_progress(fields, shapes.get(fields[JobFields.SHAPE]))
            timeout_ms = fields.get(JobFields.TIMEOUT_MS)
            _, submission_id = keys.split_ref(job_ref)
            if fields.get(JobFields.STATUS) == ARRAY:  # its tasks not created yet fail in one step
                message = timeout_message(submission_id, int(timeout_ms or 0), attempts, reason_list)
                ended = self.store.arrays.expire(job_ref, message)
                failed += ended
                self.redis.zrem(keys.DEADLINES, job_ref)  # done, or its tasks have their own deadlines
                if ended:
                    pipe = self.redis.pipeline(transaction=False)
                    for reason in reason_list or [{"reason": "no placement attempt"}]:
                        pipe.hincrby(keys.STATS, f"schedule_failures:{metric_reason(reason['reason'])}", ended)
                    pipe.execute()
                continue
            moved = Ending.MOVED == self.store.finish(
                job_ref,
                JobStatus.FAILED,
                error_type=ErrorType.SCHEDULE_TIMEOUT,
                message=timeout_message(submission_id, int(timeout_ms or 0), attempts, reason_list),
                from_statuses=[JobStatus.PENDING],
                expected_node="",
                mode="deadline",
                extra={JobFields.ATTEMPTS: str(attempts), JobFields.REASONS: json.dumps(reason_list)},
            )
            failed += moved
            if moved:
                pipe = self.redis.pipeline(transaction=False)
                for reason in reason_list or [{"reason": "no placement attempt"}]:
                    pipe.hincrby(keys.STATS, f"schedule_failures:{metric_reason(reason['reason'])}", 1)
                pipe.execute()
            if not moved and self.redis.hget(keys.job(job_ref), JobFields.STATUS) != JobStatus.PENDING:
                self.redis.zrem(keys.DEADLINES, job_ref)
        return failed

    def end_broken_gangs(self, now: int) -> None:
        """A gang one member of which ended before the gang was placed can never be placed
        whole: end its other waiting members as that member ended (finish.lua names the
        gang in poolq:gangs:broken in the step that ends the member)."""
        sigs = self.redis.srandmember(keys.GANGS_BROKEN, BATCH)
        for sig in sigs or []:
            spec = self.redis.hget(keys.shape(sig), "spec")
            members = [ref for ref, _ in json.loads(spec)["members"]] if spec else []
            pipe = self.redis.pipeline(transaction=False)
            for ref in members:
                pipe.hmget(keys.job(ref), [JobFields.STATUS, JobFields.NODE, JobFields.ERROR_TYPE, JobFields.MESSAGE])
            states = dict(zip(members, pipe.execute())) if members else {}
            ended = [(r, s) for r, s in states.items() if s[0] in TERMINAL_STATUSES and not s[1]]
            if ended:
                first, (status, _, error_type, message) = ended[0]
                gang = json.loads(spec or "{}").get("gang", "")
                for ref, state in states.items():
                    if state[0] != JobStatus.PENDING or state[1]:
                        continue
                    self.store.finish(
                        ref,
                        JobStatus(status),
                        error_type=ErrorType(error_type) if error_type else None,
                        message=f"gang {gang}: member {keys.split_ref(first)[1]} ended {status} before the gang "
                        f"was placed ({message})",
                        from_statuses=[JobStatus.PENDING],
                        expected_node="",
                    )
            self.redis.srem(keys.GANGS_BROKEN, sig)

    def resolve_dependencies(self, now: int) -> None:
        """The dependents of jobs that ended: put in line those whose last dependency ended,
        end FAILED those whose afterok dependency did not succeed (resolve.lua). Ending one
        queues its own dependents, which the next run (this one, while it lasts) resolves."""
        queued = 0
        for _ in range(BATCH):
            placed_in_line, more, to_fail = self.store.scripts.resolve(
                keys=[keys.RESOLVE, keys.DEPENDENCY_FAILED, keys.SHAPES_READY, keys.SHAPES_BLOCKED, keys.DEADLINES],
                args=[keys.JOB_PREFIX, keys.shape(""), RESOLVE_BATCH],
            )
            queued += placed_in_line
            # (read only when there are some: an idle tick costs one round trip)
            failed = self.redis.hscan(keys.DEPENDENCY_FAILED, count=BATCH)[1] if to_fail else {}
            for job_ref, message in failed.items():  # finish.lua ends each once, however often it is asked
                self.store.finish(
                    job_ref,
                    JobStatus.FAILED,
                    error_type=ErrorType.DEPENDENCY_FAILED,
                    message=message,
                    from_statuses=[JobStatus.PENDING],
                    expected_node="",
                )
                self.redis.hdel(keys.DEPENDENCY_FAILED, job_ref)
            if not more and not failed:
                break
        if queued:
            self._wake_placement()

    def retry_due(self, now: int) -> None:
        """Put back in line the jobs whose failed attempt's backoff has ended (retry_due.lua)."""
        refs = self.redis.zrangebyscore(keys.RETRIES, "-inf", now, start=0, num=BATCH)
        if not refs:
            return
        pipe = self.redis.pipeline(transaction=False)
        for job_ref in refs:
            pipe.hget(keys.job(job_ref), JobFields.SHAPE)
        sigs = [sig or "" for sig in pipe.execute()]
        key_list = [keys.RETRIES, keys.SHAPES_READY, keys.SHAPES_BLOCKED]
        args: list[str] = []
        for job_ref, sig in zip(refs, sigs):
            key_list += [keys.job(job_ref), keys.shape_queue(sig)]
            args += [job_ref, sig]
        if self.store.scripts.retry_due(keys=key_list, args=args):
            self._wake_placement()

    def unblock_due(self, now: int) -> None:
        sigs = self.redis.zrangebyscore(keys.SHAPES_BLOCKED, "-inf", now, start=0, num=BATCH)
        if sigs and self.scheduler.unblock(sigs):
            self._wake_placement()

    def recover_claims(self, now: int) -> None:
        """Return to the line the jobs of claims whose worker died (their lease expired).

        Celery does not count redeliveries, so poolq counts deaths itself, and only
        where it knows the culprit: every job of a dead claim becomes a suspect, claimed
        alone next time (claim.lua), and a dead claim of one job counts against that
        job. At MAX_LOST_CLAIMS the job is given up: a job that kills every worker
        cannot loop forever, nor take others with it. A worker that was only paused
        finds, when it resumes, that its claim no longer holds the jobs (reserve.lua).
        """
        expired = self.redis.zrangebyscore(keys.CLAIMED, "-inf", now, start=0, num=BATCH)
        if not expired:
            return
        pipe = self.redis.pipeline(transaction=False)
        for job_ref in expired:
            pipe.hget(keys.CLAIMS, job_ref)
            pipe.hget(keys.job(job_ref), JobFields.SHAPE)
        answers = pipe.execute()
        holders = {job_ref: (answers[2 * i], answers[2 * i + 1]) for i, job_ref in enumerate(expired)}
        sizes = Counter(claim_id for claim_id, _ in holders.values() if claim_id)
        by_shape: dict[str, list[Held]] = defaultdict(list)
        for job_ref, (claim_id, sig) in holders.items():
            if claim_id is None or sig is None:  # ended or deleted: nothing holds it any more
                pipe.zrem(keys.CLAIMED, job_ref)
                pipe.hdel(keys.CLAIMS, job_ref)
                continue
            by_shape[sig].append(Held(job_ref, claim_id, lost=sizes[claim_id] == 1))
        pipe.execute()
        for sig, members in by_shape.items():
            give_up_poison(self.store, requeue(self.store.scripts, sig, members, suspect=True))
        log.info("returned %d jobs claimed by a worker that stopped to the line", len(expired))
        self._wake_placement()

    def reap_nodes(self, now: int) -> None:
        cutoff = now - int(self.settings.node_ttl_s * 1000)
        for node_id in self.redis.zrangebyscore(keys.HEARTBEATS, "-inf", cutoff, start=0, num=BATCH):
            failed = self.scheduler.admin.declare_lost(node_id)
            log.warning(
                "node %s lost (no heartbeat for %gs); failed %d jobs", node_id, self.settings.node_ttl_s, len(failed)
            )

    def purge_terminal(self, now: int) -> None:
        """Remove terminal jobs past retention, and the oldest beyond the count limit."""
        expired = self.redis.zrangebyscore(
            keys.TERMINAL, "-inf", now - self.settings.retention_s * 1000, start=0, num=BATCH
        )
        excess = self.redis.zcard(keys.TERMINAL) - self.settings.max_terminal_jobs
        if excess > 0:
            expired = list(dict.fromkeys(expired + self.redis.zrange(keys.TERMINAL, 0, min(excess, BATCH) - 1)))
        if expired:
            self.store.purge(expired)

    def expire_packages(self, now: int) -> None:
        packages.expire(self.redis, self.store.scripts, now, self.settings.retention_s)

    def recover_intake(self, now: int) -> None:
        """Put back on the queue what stopped consumers of poolq.submit had taken."""
        cutoff = now - int(self.settings.intake_lease_s * 1000)
        for consumer in self.redis.zrangebyscore(keys.INTAKE_CONSUMERS, "-inf", cutoff, start=0, num=BATCH):
            moved = return_taken(self.store, consumer, cutoff)
            if moved > 0:
                log.warning("put %d queue messages taken by stopped consumer %s back on the queue", moved, consumer)

    def forget_idle_shapes(self, now: int) -> None:
        """Shapes no job has used for SHAPE_IDLE_MS: nothing of them stays in Redis."""
        for sig in self.redis.zrangebyscore(keys.SHAPES_IDLE, "-inf", now - SHAPE_IDLE_MS, start=0, num=BATCH):
            self.store.scripts.forget_shape(
                keys=[keys.shape(sig), keys.shape_queue(sig), keys.SHAPES_READY, keys.SHAPES_BLOCKED, keys.SHAPES_IDLE],
                args=[sig],
            )

    def forget_idle_tenants(self, now: int) -> None:
        """Tenants with no job left (retention removed their last): nothing of them stays.
        The others have their PENDING and RUNNING counts checked against their jobs
        (``JobStore.recount``), so that a count that drifted is right again.

        Checked at most once a minute, a slice of the tenants at a time."""
        if now < self._next_tenant_check:
            return
        self._next_tenant_check = now + 60_000
        self._tenant_cursor, tenants = self.redis.sscan(keys.TENANTS, self._tenant_cursor, count=BATCH)
        pipe = self.redis.pipeline(transaction=False)
        for tenant in tenants:
            pipe.zcard(keys.tenant_jobs(tenant))
        for tenant, jobs in zip(tenants, pipe.execute()):
            if jobs and self.store.recount(tenant):
                log.warning("the status counts of tenant %s were off; recounted from its jobs", tenant)
            if jobs == 0:
                self.store.scripts.forget_tenant(
                    keys=[
                        keys.TENANTS,
                        keys.TENANTS_SERVED,
                        keys.tenant_counts(tenant),
                        keys.tenant_usage(tenant),
                        keys.tenant_active(tenant),
                        keys.tenant_jobs(tenant),
                        keys.STATS,
                        keys.FAIR_SHARE,
                        keys.tenant_stems(tenant),
                        keys.tenant_changes(tenant),
                    ],
                    args=[tenant, *(outcome.value for outcome in Submitted)],
                )

    def sample_history(self, now: int) -> None:
        """Offer this slot's sample once; the first worker to offer one keeps it."""
        slot = history.slot_of(now)
        if slot != self._sampled_slot:
            history.sample(self.redis, now)
            self._sampled_slot = slot

    def rewake(self) -> None:
        """Jobs wait and no wake-up is on its way (a message was lost): send one."""
        if self.redis.zcard(keys.SHAPES_READY):
            self._wake_placement()

    def _wake_placement(self) -> None:
        if self.redis.set(keys.wake(queues.PLACEMENT), "1", nx=True, px=WAKE_TTL_MS):
            self.store.wake(queues.PLACEMENT)
