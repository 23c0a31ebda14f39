"""Finished job records written straight into Redis, fast, in poolq's own format.

Listing a million jobs needs a million records; making them through HTTP and node
agents would take hours on the benchmark machine. Instead:

1. ``make_template`` makes *one* real finished job with poolq's own code, in-process:
   ``JobStore.submit`` (submit.lua), a placement round of the real ``Scheduler`` onto a
   static node (claim.lua, reserve.lua) and ``JobStore.finish`` (finish.lua) with the
   node agent's success message and exit code 0. The node agent's start.lua would also
   have set ``start_time``; the template gets it too, so that a clone has every field a
   job run by an agent has.
2. ``write_clones`` copies that hash under fresh ids with pipelined HSET, plus the
   entries finish.lua leaves in the tenant's index (``ZADD`` by seq) and in the
   retention index ``poolq:terminal``, and the tenant's status count; sequence numbers
   come from ``poolq:seq`` as submit.lua takes them. The commands go to Redis as raw
   RESP over one socket: redis-py's command packing would take longer than Redis does.
"""

from __future__ import annotations

import json
import socket
from typing import Any, Iterator

import redis

from bench.stack import BenchError, Stack
from poolq import keys
from poolq.model import JobFields, JobStatus
from poolq.nodes import capacity_of
from poolq.settings import Settings
from poolq.store import JobStore

TEMPLATE_NODE = "bench-template-node"
CHUNK = 2000  # records per round trip
PLACEHOLDER = "@@submission_id@@"


def make_template(
    client: redis.Redis, url: str, body: dict[str, Any], tenant: str = "bench-template"
) -> dict[str, str]:
    """One real job, submitted, placed and finished SUCCEEDED by poolq's code; its hash."""
    from poolq.nodes import NodeAdmin
    from worker.scheduler import Scheduler

    settings = Settings(redis_url=url)
    store = JobStore(client, settings, waker=None)
    NodeAdmin(store).upsert(
        TEMPLATE_NODE, pool="bench", labels={}, capacity=capacity_of("64", 1 << 40, "0", {}), kind="static"
    )
    job = store.prepare(dict(body), tenant=tenant, schedule_timeout_ms=0)
    store.submit(job)
    Scheduler(store).round()
    placed_on = client.hget(keys.job(job.ref), JobFields.NODE)
    if placed_on != TEMPLATE_NODE:
        raise BenchError(f"the template job was not placed on {TEMPLATE_NODE} (node: {placed_on!r})")
    if not store.finish(job.ref, JobStatus.SUCCEEDED, message="finished: exit code 0", exit_code=0):
        raise BenchError("the template job could not be finished")
    fields = {str(k): str(v) for k, v in client.hgetall(keys.job(job.ref)).items()}
    fields.setdefault(JobFields.START_TIME, fields.get("placed_time") or fields[JobFields.END_TIME])
    return fields


class Clones:
    """Finished records of one tenant in a stack's Redis, cloned from one real job of ``body``
    (``make_template``) and grown as asked; a context manager (it holds a raw connection)."""

    def __init__(self, stack: Stack, tenant: str, body: dict[str, Any]) -> None:
        assert stack.redis_server is not None
        self.stack, self.tenant, self.count = stack, tenant, 0
        self.template = make_template(stack.redis, stack.url, body)
        self.raw = RawRedis("127.0.0.1", stack.redis_server.port, stack.redis_server.password)

    def grow_to(self, size: int) -> list[str]:
        """Write records until there are ``size``; the ids of those written."""
        ids = write_clones(self.stack.redis, self.raw, self.template, self.tenant, size - self.count, self.count)
        self.count = size
        return ids

    def __enter__(self) -> Clones:
        return self

    def __exit__(self, *_: object) -> None:
        self.raw.close()


class RawRedis:
    """A bare RESP connection: send many commands, read their one-line replies."""

    def __init__(self, host: str, port: int, password: str | None):
        self.sock = socket.create_connection((host, port), timeout=300)
        self.buffer = b""
        if password:
            self.execute([b"AUTH", password.encode()])

    def execute(self, *commands: list[bytes]) -> list[bytes]:
        self.sock.sendall(b"".join(encode(c) for c in commands))
        return self.replies(len(commands))

    def send_packed(self, data: bytes, count: int) -> list[bytes]:
        self.sock.sendall(data)
        return self.replies(count)

    def replies(self, count: int) -> list[bytes]:
        """``count`` one-line replies (integers, simple strings); an error reply raises."""
        out: list[bytes] = []
        while len(out) < count:
            end = self.buffer.find(b"\r\n")
            if end < 0:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise ConnectionError("redis closed the connection")
                self.buffer += chunk
                continue
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            if line.startswith(b"-"):
                raise redis.ResponseError(line[1:].decode(errors="replace"))
            out.append(line)
        return out

    def close(self) -> None:
        self.sock.close()


def encode(parts: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(_bulk(part) for part in parts)


def _bulk(part: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(part), part)


def clone_ids(start: int, count: int) -> Iterator[str]:
    """Ids shaped like the server's (``app-`` and a UUID's 36 characters), unique per number."""
    for n in range(start, start + count):
        yield f"app-{n:08x}-0000-4000-8000-{n:012x}"


def write_clones(
    client: redis.Redis, raw: RawRedis, template: dict[str, str], tenant: str, count: int, first_number: int = 0
) -> list[str]:
    """Write ``count`` finished records of ``tenant`` cloned from ``template``; returns their ids."""
    spec = json.loads(template[JobFields.SPEC])
    spec["submission_id"], spec["tenant_id"] = PLACEHOLDER, tenant
    spec_template = json.dumps(spec, separators=(",", ":"), ensure_ascii=False).encode()
    last_seq = int(client.incrby(keys.SEQ, count))
    seq = last_seq - count + 1
    varying = (JobFields.SPEC, JobFields.FINGERPRINT, JobFields.SEQ)
    constant = [(k.encode(), v.encode()) for k, v in template.items() if k not in varying]
    # HSET key spec S fp F seq N <the constant pairs>: everything after "seq N" is the same.
    hset_head = b"*%d\r\n$4\r\nHSET\r\n" % (2 + 2 * (len(constant) + len(varying)))
    hset_tail = b"".join(_bulk(name) + _bulk(value) for name, value in constant)
    index_zadd = b"*4\r\n$4\r\nZADD\r\n" + _bulk(keys.tenant_jobs(tenant).encode())
    terminal_zadd = (
        b"*4\r\n$4\r\nZADD\r\n" + _bulk(keys.TERMINAL.encode()) + _bulk(template[JobFields.END_TIME].encode())
    )
    ids = list(clone_ids(first_number, count))
    for start in range(0, count, CHUNK):
        packed: list[bytes] = []
        for submission_id in ids[start : start + CHUNK]:
            id_bytes = submission_id.encode()
            job_ref = keys.ref(tenant, submission_id).encode()
            seq_bytes = str(seq).encode()
            packed += [
                hset_head,
                _bulk(keys.job(job_ref.decode()).encode()),
                b"$4\r\nspec\r\n",
                _bulk(spec_template.replace(PLACEHOLDER.encode(), id_bytes)),
                b"$2\r\nfp\r\n",
                _bulk(b"%032x" % seq),
                b"$3\r\nseq\r\n",
                _bulk(seq_bytes),
                hset_tail,
                index_zadd,
                _bulk(seq_bytes),
                _bulk(id_bytes),
                terminal_zadd,
                _bulk(job_ref),
            ]
            seq += 1
        raw.send_packed(b"".join(packed), 3 * len(ids[start : start + CHUNK]))
    if hasattr(keys, "tenant_counts"):  # the tenant's status counts, where poolq keeps them
        client.hincrby(keys.tenant_counts(tenant), JobStatus.SUCCEEDED.value, count)
    if hasattr(keys, "TENANTS"):
        client.sadd(keys.TENANTS, tenant)
    return ids
