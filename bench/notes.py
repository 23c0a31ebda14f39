"""What the report says of a target it did not meet: where the time goes, and what would
close the gap. Keyed by (scenario, figure key); shown only when that target is missed.

Each note was written from a profile (py-spy on the API processes, `top` during the
load); re-profile before relying on it after the code changes.
"""

from __future__ import annotations

NOT_MET: dict[tuple[str, str], str] = {
    ("submit", "floor.ratio"): (
        "The floor's route parses the body and runs a one-line script; a poolq submission also validates "
        "the body with marshmallow (about 70 us), normalises it into a record and a shape, and runs "
        "`submit.lua`, which checks the id and fingerprint, the tenant's quota and rate limit, writes the "
        "record, the shape's queue, three indexes and a status count (about 78 us of Redis's CPU a single "
        "submission, the ceiling section, against a few us for the floor's). On two cores shared by Redis, two API processes and the load "
        "generator, the CPU, not the round trips, is the limit: group commit already shares the round trips "
        "of concurrent submissions (docs/architecture.md). Closing the gap would take a cheaper record (fewer indexes written a job) "
        "or more cores."
    ),
    ("submit", "ratio"): (
        "3x the baseline (granian, one `send_task` a request: about 1,900 jobs/s here) would be about 5,600 "
        "single-job submissions a second on two cores shared with Redis and the load generator; the floor's "
        "one-EVALSHA route itself reaches only about 2.7x poolq's rate. During the closed-loop run both cores "
        "are busy: the API processes, "
        "redis-server (the submit script) and the load generator. Of an API process's Python time (py-spy), "
        "the Redis call is the largest piece (argument packing, the socket, the reply), then marshmallow "
        "validation, then the record's normalisation and JSON; granian's own HTTP work does not show. What "
        "would close the gap: more cores (API processes are stateless and scale out), or the batch route, "
        "the design's answer for high-volume producers (several times the baseline, below). Not done: "
        "replacing marshmallow (the design keeps it as the validator) or hand-encoding the Redis protocol."
    ),
    ("batch", "rate"): (
        "A py-spy profile of both API processes under this load (4 connections, 1,000 seed bodies a "
        "request): about two thirds of their Python time prepares the jobs (marshmallow's load about a "
        "third of it, the normalisation into record, shape and fingerprint most of the rest), a quarter is "
        "the one pipeline of `submit.lua` calls, the rest JSON. Through this route a job costs Redis about "
        "42 us (the ceiling section), so one Redis core alone would store at most about 24,000 jobs a "
        "second: the target is above what one Redis core can do, before the API processes take their share "
        "of the same two cores. What would close it: a batch script that writes a batch's records with "
        "fewer commands a job (one shape, one index update a batch), and Redis on a core of its own."
    ),
    ("poll", "get.rate"): (
        "Each GET is one round trip now (read.lua: the hash and, while pending, its shape's; polls that "
        "come together share it, poolq/commit.py). A py-spy profile of the API processes shows about a "
        "third of their busy time in the Redis call (packing, the socket, the reply), the rest in routing, "
        "the record's rendering and its JSON; with two cores shared by Redis and the load generator, the "
        "API processes get about one core between them. More API processes on more cores scale it; one "
        "process's rate is bound by its Python time per request. Grouping the reads took a GET "
        "of a pending job from two round trips to one and from about 4,100 to 5,700 requests a second under "
        "the profiler."
    ),
    ("poll", "etag.rate"): (
        "A 304 saves the answer's body, not the read: the ETag is computed from the record read from "
        "Redis (a digest of what the answer would say), so a 304 costs a read and a hash, most of a 200. "
        "Keeping a per-job version number in Redis would let a 304 skip the record's rendering; not done."
    ),
    ("poll", "ids.states"): (
        "One ?ids= request of 100 reads 100 hashes in one script call and renders 100 records: the "
        "profile of the API processes shows the Redis call (sending 100 keys, parsing 100 hashes) about "
        "40 % of their busy time and rendering and encoding the records about 20 %. So the cost is per "
        "record, about 20 us of API CPU each on this machine, and 100,000 states a second would take two "
        "cores of API processes alone. A states-only answer (status and times, not the whole record) would "
        "be several times cheaper; the change feed (docs/api.md) is the answer for followers of many jobs."
    ),
    ("e2e", "rate"): (
        "One node agent spends about 2.3 ms of CPU a job, the job's own `sh` and `true` included (the "
        "row above): reading its inbox, `start.lua`, the spawn (fork and exec of the joining shell, "
        "docs/running.md), a thread that waits for the exit and ships the log, `finish.lua`. So about "
        "500 jobs a second is 1.2 of the machine's two cores, shared with Redis (0.4-1.1 ms a job's life "
        "in this session's runs, the ceiling section), the API and the placement worker; 800 would need about 1.9 cores for the agent "
        "alone. Several agents on the machine do not help on two cores (the curves section); on a bigger "
        "machine, one agent per few cores does. Not done: a thread pool in place of a thread a job, and "
        "shipping the logs of many jobs in one round trip."
    ),
    ("e2e", "paced.p50"): (
        "A job's path from submission to SUCCEEDED crosses two Celery hops (the placement wake-up and the "
        "node's), a placement round, the agent's start, the job itself, and the finish: each about 1-3 ms "
        "here, so about 10 ms in all: at the target's edge, met in one run of this session (10.0 ms) and "
        "missed by 1 ms in this one. The hops are the first thing to cut: a wake-up is a kombu message that "
        "a consumer takes off a Redis list, acknowledges and deletes."
    ),
    ("memory", "redis.bytes"): (
        "A finished record of the seed's body costs about 1,020 bytes of hash (MEMORY USAGE) and about "
        "340 more for its two index entries (the tenant's sorted set of jobs and the retention index). "
        "Of the hash, the spec JSON is about 530 bytes: the seed's own metadata, env_vars, pip and "
        "working_dir about 330, the submission and tenant ids the key already holds about 90, defaults "
        "written out (`{}`, `0`, `null`) about 80. What would reach 1,000: a spec without the ids and "
        "defaults (about 170 bytes) and one index entry instead of two (about 150). Not done: it changes the "
        "record every reader shares."
    ),
    ("curves", "backlog.10000.10000.rate"): (
        "At the target's edge: one run a size (a backlog is used up by being placed), and this session's "
        "three measurements of it were 9,910, 10,416 and 10,798 a second. One shape places at about 15,000: "
        "what 10,000 shapes add is a cost per shape read, since a round reads shapes until each tenant has "
        "its best 256 jobs in line order (docs/placement.md) and re-scores each shape it read. A k-way merge "
        "of the tenants' shapes by their head's place in line, in claim.lua, would read fewer; not done."
    ),
    ("curves", "backlog.10000.10000.bytes"): (
        "A shape costs about 450 bytes (its spec and its queue), shared by its pending jobs: with one "
        "shape or 100, a pending job costs 1,280-1,380 bytes, within the target; with a shape a job, the "
        "shape's cost is the job's. A shape's keys are removed an hour after its queue empties "
        "(`forget_shape.lua`)."
    ),
}


def not_met_section(unmet: list[tuple[str, str, str, str]]) -> list[str]:
    """Markdown for missed targets: (scenario, key, label, reached) each, with its note."""
    if not unmet:
        return []
    lines = ["## Targets not met", ""]
    for scenario, key, label, reached in unmet:
        note = NOT_MET.get(
            (scenario, key),
            "No analysis recorded for this target yet: profile it (py-spy) and add one to bench/notes.py.",
        )
        lines += [f"- **{scenario}: {label}** reached {reached}. {note}", ""]
    return lines
