"""The lost-reply relay: a TCP proxy between one process and Redis that forwards every byte
unchanged, but holds back some replies to writes past the client's socket timeout.

poolq's Redis clients give up after 0.5 s (``Settings.redis_timeout_s``). A reply held
back 0.6-1.0 s answers a command that has already taken effect in Redis, while the
client sees a timeout: the "lost reply" of a real network, which a stopped or killed
Redis never produces (there, the command either ran and was answered or did not run).

To know which reply answers which command, the relay parses RESP minimally: commands
(client to server) are arrays of bulk strings or inline lines, replies (server to
client) are RESP2 or RESP3 values (redis-py 8 speaks RESP3 unless told otherwise). Each
connection keeps a FIFO of what it sent; a reply is held back only on its own
connection, so the replies keep their order. Inside MULTI the held reply is EXEC's.
RESP3 pushes answer no command. After SUBSCRIBE or MONITOR, or anything the parser does
not know, replies no longer pair with commands: that connection is passed through as is.
"""

from __future__ import annotations

import collections
import random
import socket
import threading
from typing import Callable, Iterable

DELAYED = frozenset({b"EVAL", b"EVALSHA", b"FCALL"})  # scripts: every write poolq makes that matters
UNPAIRED = frozenset({b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE", b"MONITOR"})

# What the reply side does with the reply to each command (the FIFO's entries).
PLAIN, CANDIDATE, SWITCH = "plain", "candidate", "switch"

# Reply types by their first byte.
LINES = b"+-:_,#("  # simple string, error, integer, null, double, boolean, big number
BLOBS = b"$!="  # bulk string, bulk error, verbatim string: a length, then that many bytes
AGGREGATES = {ord("*"): 1, ord("~"): 1, ord(">"): 1, ord("%"): 2}  # elements per counted item
PUSH = ord(">")  # RESP3 out-of-band data (pub/sub, tracking): no command's reply


def command_end(buf: bytes | bytearray, pos: int = 0) -> tuple[bytes | None, int] | None:
    """The upper-cased name of the command at ``pos`` and where it ends; None while it is
    incomplete. The name is None for an empty inline line (Redis does not answer it)."""
    found = command_head(buf, pos)
    return None if found is None else (found[0], found[2])


def command_head(buf: bytes | bytearray, pos: int = 0) -> tuple[bytes | None, bytes | None, int] | None:
    """The command at ``pos``: its upper-cased name, its first argument (an EVALSHA's
    script, say) and where it ends; None while it is incomplete."""
    if pos >= len(buf):
        return None
    if buf[pos] != ord("*"):  # an inline command: one line of words
        line_end = buf.find(b"\n", pos)
        if line_end < 0:
            return None
        words = bytes(buf[pos:line_end]).split()
        return (words[0].upper() if words else None), (words[1] if len(words) > 1 else None), line_end + 1
    line_end = buf.find(b"\r\n", pos)
    if line_end < 0:
        return None
    count, pos = int(buf[pos + 1 : line_end]), line_end + 2
    name: bytes | None = None
    first: bytes | None = None
    for i in range(count):
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        start = line_end + 2
        end = start + int(buf[pos + 1 : line_end])  # buf[pos] is "$"
        if end + 2 > len(buf):
            return None
        if i == 0:
            name = bytes(buf[start:end]).upper()
        elif i == 1:
            first = bytes(buf[start:end])
        pos = end + 2
    return name, first, pos


def reply_end(buf: bytes | bytearray, pos: int = 0) -> int | None:
    """Where the RESP2 or RESP3 reply at ``pos`` ends (nested aggregates, nils and attributes
    included); None while it is incomplete. ValueError for anything else."""
    remaining = 1  # values still to read, counting the elements of aggregates begun
    while remaining:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        kind, size, at = buf[pos], _size(buf, pos, line_end), pos
        pos = line_end + 2
        if kind in BLOBS and size >= 0:
            pos += size + 2
            if pos > len(buf):
                return None
        elif kind in AGGREGATES:
            remaining += max(size, 0) * AGGREGATES[kind]
        elif kind == ord("|"):  # attributes: their pairs, then the reply they annotate
            remaining += 2 * size + 1
        elif kind not in LINES and kind not in BLOBS:
            raise ValueError(f"not a RESP reply: {bytes(buf[at:at + 20])!r}")
        remaining -= 1
    return pos


def _size(buf: bytes | bytearray, pos: int, line_end: int) -> int:
    """The length or count a blob or an aggregate starts with (ValueError for an unknown type)."""
    return int(buf[pos + 1 : line_end]) if buf[pos] not in LINES else 0


class Relay:
    """Listens on a loopback port of its own and relays each connection to Redis at
    ``upstream_port``, holding back the replies to scripts with probability ``probability``
    while ``delaying`` is true."""

    def __init__(self, upstream_port: int, *, seed: object, probability: float = 0.1,
                 delay_s: tuple[float, float] = (0.6, 1.0), delayed: Iterable[bytes] = DELAYED, delaying: bool = True,
                 scripts: Iterable[str] | None = None, limit: int | None = None):
        self.upstream = ("127.0.0.1", upstream_port)
        self.probability, self.delay_s, self.delayed_commands = probability, delay_s, frozenset(delayed)
        self.delaying = delaying
        # Only the replies to these scripts (their SHA1s, for EVALSHA), and at most ``limit`` of them.
        self.scripts = None if scripts is None else frozenset(sha.encode() for sha in scripts)
        self.limit = limit
        self.delayed = 0  # replies held back so far
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.links: set[_Link] = set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]

    def url(self, password: str) -> str:
        return f"redis://:{password}@127.0.0.1:{self.port}/0"

    def start(self) -> "Relay":
        threading.Thread(target=self._accept, name=f"relay-{self.port}", daemon=True).start()
        return self

    def stop(self) -> None:
        self.closed.set()
        self.listener.close()
        with self.lock:
            links = list(self.links)
        for link in links:
            link.close()

    def hold_for(self, tag: str) -> float:
        """How long to hold back the reply to a command of this kind (0: not at all)."""
        with self.lock:
            if tag != CANDIDATE or not self.delaying or self.rng.random() >= self.probability:
                return 0.0
            if self.limit is not None and self.delayed >= self.limit:
                return 0.0
            self.delayed += 1
            return self.rng.uniform(*self.delay_s)

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=2)
            except OSError:  # Redis is down: so is the relayed connection
                client.close()
                continue
            link = _Link(self, client, upstream)
            with self.lock:
                self.links.add(link)
            link.start()

    def forget(self, link: "_Link") -> None:
        with self.lock:
            self.links.discard(link)


class _Link:
    """One relayed connection: a thread per direction, and the FIFO that pairs them."""

    def __init__(self, relay: Relay, client: socket.socket, upstream: socket.socket):
        self.relay, self.client, self.upstream = relay, client, upstream
        for sock in (client, upstream):
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tags: collections.deque[str] = collections.deque()
        self.in_multi = self.multi_delayable = False

    def start(self) -> None:
        threading.Thread(target=self._guard, args=(self._commands,), daemon=True).start()
        threading.Thread(target=self._guard, args=(self._replies,), daemon=True).start()

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.relay.forget(self)

    def _guard(self, pump: Callable[[], None]) -> None:
        try:
            pump()
        except OSError:  # either side closed, or the relay stopped
            pass
        finally:
            self.close()

    def _commands(self) -> None:
        """Client to Redis: note what each complete command expects before forwarding it."""
        buf, passthrough = bytearray(), False
        while data := self.client.recv(65536):
            if not passthrough:
                buf += data
                passthrough = self._note_commands(buf)
            self.upstream.sendall(data)

    def _note_commands(self, buf: bytearray) -> bool:
        """Queue the tags of the complete commands in ``buf`` and drop them from it; True
        once the connection stops pairing replies with commands."""
        pos = 0
        while True:
            try:
                found = command_head(buf, pos)
            except ValueError:  # not RESP: stop pairing (the reply side gives up too)
                return True
            if found is None:
                del buf[:pos]
                return False
            name, first, pos = found
            tag = self._tag(name)
            if tag == CANDIDATE and self.relay.scripts is not None and first not in self.relay.scripts:
                tag = PLAIN
            if tag is not None:
                self.tags.append(tag)
            if tag == SWITCH:
                return True

    def _tag(self, name: bytes | None) -> str | None:
        """What to do with the reply to this command (None: Redis sends none)."""
        if name is None:
            return None
        if self.in_multi:  # queued commands answer +QUEUED; EXEC answers for them all
            if name in (b"EXEC", b"DISCARD"):
                self.in_multi = False
                return CANDIDATE if name == b"EXEC" and self.multi_delayable else PLAIN
            self.multi_delayable |= name in self.relay.delayed_commands
            return PLAIN
        if name == b"MULTI":
            self.in_multi, self.multi_delayable = True, False
            return PLAIN
        if name in UNPAIRED:
            return SWITCH
        return CANDIDATE if name in self.relay.delayed_commands else PLAIN

    def _replies(self) -> None:
        """Redis to client: forward whole replies, holding back the chosen ones in place."""
        buf, passthrough = bytearray(), False
        while data := self.upstream.recv(65536):
            if passthrough:
                self.client.sendall(data)
                continue
            buf += data
            sent = pos = 0
            while True:
                end, tag = self._next_reply(buf, pos)
                if end is None:
                    break
                hold = self.relay.hold_for(tag)
                if hold:
                    self.client.sendall(buf[sent:pos])
                    sent = pos
                    if self.relay.closed.wait(hold):
                        return
                pos = end
                if tag == SWITCH:
                    passthrough, pos = True, len(buf)
                    break
            self.client.sendall(buf[sent:pos])
            del buf[:pos]

    def _next_reply(self, buf: bytearray, pos: int) -> tuple[int | None, str]:
        """Where the reply at ``pos`` ends and the tag of the command it answers; SWITCH
        when replies stop pairing with commands (not RESP, or a reply nobody asked for)."""
        try:
            end = reply_end(buf, pos)
        except ValueError:
            return len(buf), SWITCH
        if end is None:
            return None, PLAIN
        if buf[pos] == PUSH and not (self.tags and self.tags[0] == SWITCH):
            return end, PLAIN  # out of band: it answers no command
        return (end, self.tags.popleft()) if self.tags else (len(buf), SWITCH)
