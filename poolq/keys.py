"""Every Redis key poolq uses, built in one place.

A *job ref* is ``"<tenant>:<submission_id>"``; neither part can contain ``:``
(tenant ``[A-Za-z0-9._-]``, id ``app-[a-z0-9-]``), so the ref is unambiguous and
the job key is ``poolq:job:<ref>``. Sets and queues store refs.

| key | type | meaning |
|---|---|---|
| poolq:job:<tenant>:<id> | hash | the job record (fields: poolq.model.JobFields); an array's record (status ARRAY: template, count, cursor, its tasks' counts; poolq/lua/lib/array.lua), whose task i is the job <id>-<i> |
| poolq:job:<tenant>:<id>:dependents | set | jobs waiting on this one: each its kind (ok: afterok, any: afterany), a bar, its ref |
| poolq:resolve | list | refs of jobs that ended with dependents waiting: resolve.lua takes them in order |
| poolq:gangs:broken | set | sigs of gang shapes a member of which ended before the gang was placed: the duties end the others |
| poolq:dependency_failed | hash | ref -> message: jobs whose afterok dependency failed, for the duties to end |
| poolq:log:<tenant>:<id> | list | tail of the job's output in chunks, at most POOLQ_MAX_LOG_BYTES in all |
| poolq:tenant:<tenant>:jobs | zset | id -> seq: the tenant's jobs, for listing newest first |
| poolq:tenant:<tenant>:active | zset | id -> seq: the tenant's PENDING and RUNNING jobs |
| poolq:tenant:<tenant>:counts | hash | status -> number of the tenant's jobs in it (an array's tasks not yet created count as PENDING) |
| poolq:tenant:<tenant>:stems | hash | stem -> number of the tenant's jobs (not array tasks) named <stem>-<digits>: keeps array task ids free |
| poolq:tenant:<tenant>:changes | stream | the tenant's change feed: id, s (status, or ARRAY, DELETED), n (node) per change of a job's status or node, the last 100,000 (poolq/lua/lib/changes.lua; the steps build its key from the tenant's other keys) |
| poolq:tenant:<tenant>:usage | hash | resource -> amount reserved by the tenant's placed jobs |
| poolq:quota:<tenant> | hash | resource -> amount the tenant's placed jobs may hold together |
| poolq:limits:<tenant> | hash | the tenant's other limits: max_pending, rate, burst |
| poolq:rate:<tenant> | hash | the tenant's request token bucket: tokens, at (ms) |
| poolq:tenants | set | tenants with jobs (for metrics); a tenant left with none is forgotten |
| poolq:seq | string | counter giving each submission its place in line |
| poolq:deadlines | zset | ref -> deadline ms, for jobs not yet placed that have one |
| poolq:retries | zset | ref -> ms: jobs whose failed attempt will run again, when their backoff ends |
| poolq:terminal | zset | ref -> end ms, for retention (oldest terminal removed first) |
| poolq:shape:<sig> | hash | one placement *shape*: spec (what its jobs ask for), attempts, reasons |
| poolq:shape:<sig>:q | zset | ref -> seq: unplaced jobs of that shape, oldest first; an array with tasks left to create is one member, its ref followed by "~" |
| poolq:shapes:ready | zset | sig -> seq of its oldest job: shapes to try now |
| poolq:shapes:blocked | zset | sig -> ms: shapes whose head did not fit, and when to retry |
| poolq:shapes:idle | zset | sig -> ms: shapes whose queue emptied; forgotten after an hour idle |
| poolq:claimed | zset | ref -> lease expiry ms: jobs a placement worker is placing |
| poolq:claims | hash | ref -> id of the claim holding it: only that claim may reserve or requeue it |
| poolq:claim:<id> | string | a claim's answer, kept for its lease, so that a retried claim answers the same |
| poolq:suspects | zset | ref -> ms: jobs claimed by a worker that died; each is next claimed alone |
| poolq:tenants:served | zset | tenant -> ms of its last placement: who goes first in a round |
| poolq:fairshare | hash | tenant -> its decayed use of CPU (milli-CPU-seconds, half-life POOLQ_FAIR_SHARE_HALF_LIFE_S) as of "<tenant>@" (ms) |
| poolq:kick | string | set when capacity was freed or added: retry blocked shapes |
| poolq:waitmark | string | a counter each group commit writes before WAIT when POOLQ_REDIS_WAIT_REPLICAS is set: WAIT then covers every earlier write |
| poolq:nodes | set | node ids |
| poolq:node:<id> | hash | node: pool, labels, kind, state, drained, cap:<R>, res:<R>, hold, taken (capacity kept for a preempting job) |
| poolq:node:<id>:jobs | set | refs of jobs holding a reservation on the node |
| poolq:node:<id>:inbox | zset | ref -> seq: jobs placed on the node that its agent has not started |
| poolq:heartbeats | zset | node id -> last heartbeat ms (agent nodes only) |
| poolq:inventory:log | stream | node ids whose state changed; placement caches follow it |
| poolq:wake:<queue> | string | a wake-up message for that Celery queue is on its way |
| poolq:lock:<duty> | string | a periodic duty's lock (holder token, with expiry) |
| poolq:stats | hash | counters for /metrics: submissions:<tenant>:<outcome>, invalid_messages, placement_le:<ms> (cumulative), placement_count, placement_sum_ms, schedule_failures:<reason>, run_le:<status>:<ms or inf> (one bucket per run), run_sum_ms:<status>, completed:<status>:<error_type>, retried:<error_type> |
| poolq:history | hash | the last hour's samples (poolq/history.py): 10 s slot number -> JSON of its time, jobs waiting and the placement counters then; slots older than the hour are dropped as new ones land |
| poolq:stats:http | hash | API requests, added to by every API process about once a second: n;<method>;<route>;<status>, sum_us;<method>;<route>, le;<method>;<route>;<ms> (<route> the route template) (one bucket per request) |
| poolq:pkg:<tenant>:<name> | string | a tenant's uploaded working_dir package (zip bytes) |
| poolq:packages | zset | "<tenant>:<name>" -> ms of last use: removed after retention unless a live job uses it |
| poolq:tenant:<tenant>:pkgsize | hash | package name -> bytes, for the tenant's package budget |
| poolq:tenant:<tenant>:pkguse | hash | package name -> PENDING and RUNNING jobs that use it |
| poolq:intake:consumers | zset | consumer id -> ms of its last beat: consumers of the poolq.submit queue |
| poolq:taken:<consumer> | list | queue messages a consumer took and has not finished handling |
| poolq:intake:delayed | zset | message -> ms when it goes back on the queue (its tenant was full) |
| poolq:tokens | set | ids of API tokens |
| poolq:token:<id> | hash | an API token: tenant, digest (SHA-256 of the token), created |
| poolq:tailkey | string | the key that signs log-tail tickets (poolq/tokens.py), random, made once |
"""

from __future__ import annotations

PREFIX = "poolq:"

SEQ = PREFIX + "seq"
DEADLINES = PREFIX + "deadlines"
RETRIES = PREFIX + "retries"
RESOLVE = PREFIX + "resolve"
DEPENDENCY_FAILED = PREFIX + "dependency_failed"
GANGS_BROKEN = PREFIX + "gangs:broken"
JOB_PREFIX = PREFIX + "job:"
TERMINAL = PREFIX + "terminal"
SHAPES_READY = PREFIX + "shapes:ready"
SHAPES_BLOCKED = PREFIX + "shapes:blocked"
SHAPES_IDLE = PREFIX + "shapes:idle"
CLAIMED = PREFIX + "claimed"
CLAIMS = PREFIX + "claims"
SUSPECTS = PREFIX + "suspects"
TENANTS_SERVED = PREFIX + "tenants:served"
FAIR_SHARE = PREFIX + "fairshare"
TAIL_KEY = PREFIX + "tailkey"
KICK = PREFIX + "kick"
WAIT_MARK = PREFIX + "waitmark"
NODES = PREFIX + "nodes"
HEARTBEATS = PREFIX + "heartbeats"
INVENTORY_LOG = PREFIX + "inventory:log"
STATS = PREFIX + "stats"
HISTORY = PREFIX + "history"
HTTP_STATS = PREFIX + "stats:http"
TOKENS = PREFIX + "tokens"
TENANTS = PREFIX + "tenants"
PACKAGES = PREFIX + "packages"
INTAKE_CONSUMERS = PREFIX + "intake:consumers"
INTAKE_DELAYED = PREFIX + "intake:delayed"


def ref(tenant: str, submission_id: str) -> str:
    return f"{tenant}:{submission_id}"


def split_ref(job_ref: str) -> tuple[str, str]:
    tenant, _, submission_id = job_ref.partition(":")
    return tenant, submission_id


def job(job_ref: str) -> str:
    return JOB_PREFIX + job_ref


def tenant_stems(tenant: str) -> str:
    return f"{PREFIX}tenant:{tenant}:stems"


ARRAY_MEMBER_SUFFIX = "~"  # an array's member in its shape's queue: its ref and this (claim.lua)


def array_member(array_ref: str) -> str:
    return array_ref + ARRAY_MEMBER_SUFFIX


def task_id(array_id: str, index: int) -> str:
    """The submission id of task ``index`` of an array."""
    return f"{array_id}-{index}"


def dependents(job_ref: str) -> str:
    return JOB_PREFIX + job_ref + ":dependents"  # resolve.lua builds the same from JOB_PREFIX


def log(job_ref: str) -> str:
    return PREFIX + "log:" + job_ref


def tenant_jobs(tenant: str) -> str:
    return f"{PREFIX}tenant:{tenant}:jobs"


def tenant_active(tenant: str) -> str:
    return f"{PREFIX}tenant:{tenant}:active"


def tenant_counts(tenant: str) -> str:
    return f"{PREFIX}tenant:{tenant}:counts"


def tenant_changes(tenant: str) -> str:
    return f"{PREFIX}tenant:{tenant}:changes"  # lib/changes.lua builds the same from the tenant's other keys


def tenant_usage(tenant: str) -> str:
    return f"{PREFIX}tenant:{tenant}:usage"


def quota(tenant: str) -> str:
    return PREFIX + "quota:" + tenant


def limits(tenant: str) -> str:
    return PREFIX + "limits:" + tenant


def claim(claim_id: str) -> str:
    return PREFIX + "claim:" + claim_id


def taken(consumer: str) -> str:
    return PREFIX + "taken:" + consumer


def rate_bucket(tenant: str) -> str:
    return PREFIX + "rate:" + tenant


def shape(sig: str) -> str:
    return PREFIX + "shape:" + sig


def shape_queue(sig: str) -> str:
    return PREFIX + "shape:" + sig + ":q"


def node(node_id: str) -> str:
    return PREFIX + "node:" + node_id


def node_jobs(node_id: str) -> str:
    return PREFIX + "node:" + node_id + ":jobs"


def node_inbox(node_id: str) -> str:
    return PREFIX + "node:" + node_id + ":inbox"


def wake(queue: str) -> str:
    return PREFIX + "wake:" + queue


def package(tenant: str, name: str) -> str:
    return f"{PREFIX}pkg:{tenant}:{name}"


def package_member(tenant: str, name: str) -> str:
    """A package's member in poolq:packages."""
    return f"{tenant}:{name}"


def tenant_package_use(tenant: str) -> str:
    return f"{PREFIX}tenant:{tenant}:pkguse"


def tenant_package_sizes(tenant: str) -> str:
    return f"{PREFIX}tenant:{tenant}:pkgsize"


def token(token_id: str) -> str:
    return PREFIX + "token:" + token_id


def lock(duty: str) -> str:
    return PREFIX + "lock:" + duty
