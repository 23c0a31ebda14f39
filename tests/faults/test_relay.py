"""The lost-reply relay (tests/faults/relay.py), against a real redis-server.

What the chaos test relies on: a script run through the relay takes effect in Redis
while the client times out; every other command, pipelines and transactions included,
passes through unchanged and in order.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.faults.conftest import RestartableRedis
from tests.faults.relay import Relay, command_end, reply_end

SET_KEY = "redis.call('SET', KEYS[1], ARGV[1]) return 1"
TIMEOUT_S = 0.5  # poolq's Redis socket timeout (Settings.redis_timeout_s)


@pytest.fixture
def relay(redis_server: RestartableRedis) -> Iterator[Relay]:
    relay = Relay(redis_server.port, seed=1, probability=1.0).start()
    yield relay
    relay.stop()


@pytest.fixture(params=[2, 3], ids=["RESP2", "RESP3"])
def relayed(relay: Relay, redis_server: RestartableRedis, request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """A client with poolq's 0.5 s socket timeout that never sends a command twice, through
    the relay, speaking RESP2 or RESP3 (redis-py's default)."""
    client = redis.Redis.from_url(relay.url(redis_server.password), socket_timeout=TIMEOUT_S,
                                  retry=Retry(NoBackoff(), 0), decode_responses=True, protocol=request.param)
    yield client
    client.close()


def timed(call: Any) -> tuple[Any, float]:
    began = time.monotonic()
    return call(), time.monotonic() - began


def test_a_script_takes_effect_but_its_reply_is_lost(relay: Relay, relayed: redis.Redis, redis_client: Any) -> None:
    with pytest.raises(redis.TimeoutError):
        relayed.eval(SET_KEY, 1, "k", "v")
    assert redis_client.get("k") == "v"
    assert relay.delayed == 1
    assert relayed.get("k") == "v"  # the client dials again and carries on


def test_other_commands_pass_through_at_once(relay: Relay, relayed: redis.Redis) -> None:
    assert relayed.set("a", "1")
    value, took = timed(lambda: relayed.get("a"))
    assert (value, relayed.incr("a"), relayed.hset("h", mapping={"x": "1"}), relayed.hgetall("h")) == \
        ("1", 2, 1, {"x": "1"})
    assert took < 0.4  # well under the shortest hold (0.6 s)
    assert relay.delayed == 0


def test_nested_replies_keep_commands_and_replies_paired(relay: Relay, relayed: redis.Redis, redis_client: Any) -> None:
    entry = relayed.xadd("s", {"n": "1"})
    assert relayed.xrange("s") == [(entry, {"n": "1"})]  # an array of arrays of arrays
    assert relayed.hmget("h", ["missing", "also"]) == [None, None]  # nils inside an array
    relay.delaying = False
    assert relayed.eval("return {1, {2, {3, 'x'}}, false}", 0) == [1, [2, [3, "x"]], None]
    relay.delaying = True
    with pytest.raises(redis.TimeoutError):
        relayed.eval(SET_KEY, 1, "after", "nested")
    assert redis_client.get("after") == "nested"


def test_pipelines_and_transactions(relay: Relay, relayed: redis.Redis, redis_client: Any) -> None:
    for transaction in (False, True):
        pipe = relayed.pipeline(transaction=transaction)
        pipe.set("p", "1").incr("p").get("p")
        assert pipe.execute() == [True, 2, "2"]
    pipe = relayed.pipeline(transaction=False)
    pipe.set("q", "1").eval(SET_KEY, 1, "q2", "2").get("q")
    with pytest.raises(redis.TimeoutError):  # the script's reply, in the middle, is held back
        pipe.execute()
    assert redis_client.mget("q", "q2") == ["1", "2"]
    pipe = relayed.pipeline(transaction=True)
    pipe.set("t", "1").eval(SET_KEY, 1, "t2", "2")
    with pytest.raises(redis.TimeoutError):  # EXEC answers for the transaction's script
        pipe.execute()
    assert redis_client.mget("t", "t2") == ["1", "2"]


def test_replies_stay_in_order_on_one_connection(relay: Relay, redis_server: RestartableRedis) -> None:
    """A held reply holds back those behind it on its connection (inline commands too)."""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as sock:
        sock.sendall(f"AUTH {redis_server.password}\r\n".encode())
        sock.sendall(b"*3\r\n$4\r\nEVAL\r\n$8\r\nreturn 7\r\n$1\r\n0\r\n\r\nPING\r\n")
        began, received = time.monotonic(), b""
        while received.count(b"\r\n") < 3:
            received += sock.recv(100)
        assert received == b"+OK\r\n:7\r\n+PONG\r\n"
        assert time.monotonic() - began >= 0.6


def test_subscriptions_pass_through(relay: Relay, relayed: redis.Redis, redis_client: Any) -> None:
    pubsub = relayed.pubsub()
    pubsub.subscribe("ch")
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    redis_client.publish("ch", "hello")
    message = pubsub.get_message(timeout=2)
    assert message and message["data"] == "hello"
    pubsub.close()


def test_no_delays_once_healed(relay: Relay, relayed: redis.Redis) -> None:
    relay.delaying = False
    _, took = timed(lambda: relayed.eval(SET_KEY, 1, "k", "v"))
    assert took < 0.4 and relay.delayed == 0


def test_a_stopped_redis_closes_relayed_connections(relay: Relay, relayed: redis.Redis,
                                                     redis_server: RestartableRedis) -> None:
    relay.delaying = False
    assert relayed.ping()
    redis_server.stop()
    with pytest.raises(redis.ConnectionError):
        relayed.ping()
    redis_server.restart()
    assert relayed.ping()


def test_parsers() -> None:
    assert command_end(b"*2\r\n$3\r\nget\r\n$1\r\nk\r\n") == (b"GET", 20)
    assert command_end(b"*2\r\n$3\r\nget\r\n$1\r\nk") is None
    assert command_end(b"ping\r\n") == (b"PING", 6)
    assert command_end(b"\r\n") == (None, 2)
    assert command_end(b"pi") is None
    resp2 = [b"+OK\r\n", b"-ERR x\r\n", b":5\r\n", b"$-1\r\n", b"*-1\r\n", b"$3\r\nabc\r\n",
             b"*3\r\n:1\r\n*2\r\n$1\r\na\r\n$-1\r\n*0\r\n"]
    resp3 = [b"_\r\n", b",1.5\r\n", b"#t\r\n", b"(123\r\n", b"!3\r\nERR\r\n", b"=7\r\ntxt:abc\r\n",
             b"%2\r\n+a\r\n:1\r\n+b\r\n*1\r\n_\r\n", b"~1\r\n+x\r\n", b">2\r\n+message\r\n+x\r\n",
             b"|1\r\n+ttl\r\n:3\r\n$1\r\nv\r\n"]
    for reply in resp2 + resp3:
        assert reply_end(reply + b"+next\r\n") == len(reply), reply
        assert reply_end(reply[:-1]) is None, reply
    with pytest.raises(ValueError):
        reply_end(b"?1\r\n")
