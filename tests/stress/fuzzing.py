"""A fuzzer for the daemon's wire protocol, and a client that must not notice it.

The fuzzer plays *sessions*: it opens a raw connection, usually sends ``hello``, sends a
list of frames that hypothesis draws, half-closes the socket and reads until the daemon
closes its end. The frames are valid requests of every operation in
``sharedict.api.protocol`` except ``shutdown`` (which stops the daemon by design), the
same with arguments of wrong types or extreme sizes, bad request ids, unknown
operations, byte-level mutations of valid frames, truncated frames, frames that announce
more than the protocol's limit, and random bytes.

After every session the daemon must still run, and the session must have ended within
``SESSION_TIMEOUT``: a connection the daemon neither answers nor closes counts as stuck.
A reply with the ``InternalError`` code means that a handler failed in a way it did not
expect, which the run counts as a finding too.
Meanwhile a ``WellBehavedClient`` keeps using the normal ``Dict`` and ``Lock`` API and
records every error it meets.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from sharedict import Dict, Lock
from sharedict.api import protocol
from sharedict.api.errors import CODE_BY_ERROR, InternalError

SESSION_TIMEOUT = 30.0
RECV_SIZE = 1 << 16

# Every operation of the protocol, found by name so that a new one is fuzzed too.
FUZZED_OPERATIONS = sorted(
    value
    for name, value in vars(protocol).items()
    if name.isupper() and isinstance(value, str) and value != protocol.SHUTDOWN
)

FUZZ_DICT_NAMES = [f"fuzz-{number}" for number in range(4)]
FUZZ_LOCK_NAMES = [f"fuzz-lock-{number}" for number in range(3)]
BYSTANDER_DICT = "well-behaved"
BYSTANDER_LOCK = "well-behaved-lock"

_U64_MAX = 2**64 - 1


# Building blocks.

extreme_integers = st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63 - 1, -(2**63), _U64_MAX])
extreme_floats = st.sampled_from([0.0, -0.0, 1e-300, 1e308, float("inf"), float("-inf"), float("nan")])

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=_U64_MAX)
    | extreme_integers
    | st.floats()
    | extreme_floats
    | st.text(max_size=30)
    | st.binary(max_size=30),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=15,
)

environment_names = st.sampled_from(["main", "fuzz-env"]) | st.text(max_size=70)
dict_names = st.sampled_from(FUZZ_DICT_NAMES) | st.text(max_size=70)
lock_names = st.sampled_from(FUZZ_LOCK_NAMES) | st.text(max_size=70)
owners = st.binary(min_size=0, max_size=70)
keys = st.binary(max_size=40) | st.sampled_from([b"S" + str(number).encode() for number in range(20)])
values = st.binary(max_size=200)
durations = st.none() | st.floats(min_value=0.0, max_value=0.05) | extreme_floats | extreme_integers


@dataclass
class FuzzContext:
    """What the plausible requests may refer to: ids of the fuzzer's own dicts."""

    dict_ids: list[bytes]


def encode(message: Any) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


request_ids = st.integers(min_value=0, max_value=_U64_MAX) | extreme_integers.filter(lambda number: number >= 0)
bad_request_ids = (
    st.integers(min_value=-(2**63), max_value=-1)
    | st.floats()
    | st.text(max_size=5)
    | st.none()
    | st.booleans()
    | st.lists(st.integers(min_value=-(2**63), max_value=_U64_MAX), max_size=2)
)
unknown_operations = st.text(max_size=20).filter(lambda op: op not in FUZZED_OPERATIONS + [protocol.SHUTDOWN]) | (
    st.sampled_from([None, 1, b"get", ["get"], {"op": "get"}, "GET", "get ", "x" * 5000])
)


class FrameStrategies:
    """Hypothesis strategies for every kind of frame the fuzzer sends, built once per context.

    Building a strategy costs far more than drawing from it, so each is made here once.
    """

    def __init__(self, context: FuzzContext) -> None:
        self.dict_ids = st.sampled_from(context.dict_ids)
        ids = self.dict_ids | st.binary(min_size=8, max_size=8) | st.binary(max_size=12)
        entry = st.tuples(keys, st.none() | keys, values).map(list)
        shapes: dict[str, list[st.SearchStrategy[Any]]] = {
            protocol.HELLO: [st.just(protocol.PROTOCOL_VERSION), st.integers(min_value=0, max_value=2**31)],
            protocol.DICT_OPEN: [environment_names, dict_names],
            protocol.DICT_CREATE: [environment_names, dict_names, st.booleans()],
            protocol.DICT_BY_ID: [ids],
            protocol.DICT_EPHEMERAL: [environment_names],
            protocol.DICT_LIST: [st.none() | environment_names],
            protocol.DICT_DELETE: [ids],
            protocol.GET: [ids, keys],
            protocol.CONTAINS: [ids, keys],
            protocol.LEN: [ids],
            protocol.PUT: [ids, keys, st.none() | keys, values, st.booleans()],
            protocol.UPDATE: [ids, st.lists(entry, max_size=8)],
            protocol.POP: [ids, keys],
            protocol.CLEAR: [ids],
            protocol.SCAN: [
                ids,
                st.integers(min_value=0, max_value=_U64_MAX),
                st.integers(min_value=1, max_value=_U64_MAX),
                st.booleans(),
                st.booleans(),
            ],
            protocol.STATUS: [],
            protocol.LOCK_ACQUIRE: [environment_names, lock_names, owners, durations, durations],
            protocol.LOCK_RELEASE: [environment_names, lock_names, owners],
            protocol.LOCK_EXTEND: [environment_names, lock_names, owners],
            protocol.LOCK_CANCEL: [environment_names, lock_names, owners],
            protocol.LOCK_HELD: [environment_names, lock_names],
        }
        missing = set(FUZZED_OPERATIONS) - shapes.keys()
        assert not missing, f"the fuzzer has no argument shapes for {sorted(missing)}"

        # (operation, plausible arguments) for every operation.
        self.requests = st.one_of(
            [st.tuples(st.just(op), st.tuples(*shape).map(list)) for op, shape in sorted(shapes.items())]
        )
        self.frames = st.one_of(
            self._valid(),
            self._valid(),
            self._wrong_types(),
            self._wrong_types(),
            self._huge_counts(),
            self._bad_request_ids(),
            self._unknown_operations(),
            self._mutated(),
            self._mutated(),
            self._truncated(),
            self._oversized(),
            st.binary(min_size=1, max_size=200),
            self._large_values(),
        )

    def _valid(self) -> st.SearchStrategy[bytes]:
        return st.tuples(request_ids, self.requests).map(lambda drawn: encode([drawn[0], drawn[1][0], *drawn[1][1]]))

    def _wrong_types(self) -> st.SearchStrategy[bytes]:
        """A known operation with arguments of random types and counts, or with one of them replaced."""

        @st.composite
        def build(draw: st.DrawFn) -> bytes:
            op, arguments = draw(self.requests)
            if arguments and draw(st.booleans()):
                position = draw(st.integers(min_value=0, max_value=len(arguments) - 1))
                arguments[position] = draw(msgpack_values)
            else:
                arguments = draw(st.lists(msgpack_values, max_size=8))
            return encode([draw(request_ids), op, *arguments])

        return build()

    def _huge_counts(self) -> st.SearchStrategy[bytes]:
        """Too many entries, huge positions and page sizes, and headers that claim 4 billion items."""

        @st.composite
        def build(draw: st.DrawFn) -> bytes:
            kind = draw(st.sampled_from(["update", "scan", "array", "string", "map", "long_name"]))
            dict_id = draw(self.dict_ids)
            request_id = draw(request_ids)
            if kind == "update":
                count = protocol.MAX_UPDATE_ENTRIES + draw(st.integers(min_value=1, max_value=5))
                return encode([request_id, protocol.UPDATE, dict_id, [[b"k", None, b"v"]] * count])
            if kind == "scan":
                return encode([request_id, protocol.SCAN, dict_id, _U64_MAX, _U64_MAX, True, True])
            head = msgpack.packb(request_id)
            if kind == "array":
                # An update whose entries claim 2**32-1 items and hold none.
                packed_id = msgpack.packb(dict_id, use_bin_type=True)
                return frame_of(b"\x94" + head + msgpack.packb(protocol.UPDATE) + packed_id + b"\xdd\xff\xff\xff\xff")
            if kind == "string":
                return frame_of(b"\x93" + head + b"\xdb\xff\xff\xff\xffget")
            if kind == "map":
                return frame_of(b"\x93" + head + b"\xa3get\xdf\xff\xff\xff\xff")
            name = "n" * draw(st.integers(min_value=65, max_value=1 << 20))
            return encode([request_id, protocol.DICT_OPEN, "main", name])

        return build()

    def _bad_request_ids(self) -> st.SearchStrategy[bytes]:
        return st.tuples(bad_request_ids, self.requests).map(
            lambda drawn: encode([drawn[0], drawn[1][0], *drawn[1][1]])
        )

    def _unknown_operations(self) -> st.SearchStrategy[bytes]:
        return st.tuples(request_ids, unknown_operations, st.lists(msgpack_values, max_size=3)).map(
            lambda drawn: encode([drawn[0], drawn[1], *drawn[2]])
        )

    def _mutated(self) -> st.SearchStrategy[bytes]:
        """A valid frame with bytes flipped, inserted or deleted, its header included.

        The positions come from a ``Random`` that hypothesis seeds, which is much faster
        than drawing each of them through hypothesis.
        """

        def mutate(drawn: tuple[bytes, Any]) -> bytes:
            data, rng = bytearray(drawn[0]), drawn[1]
            for _ in range(rng.randint(1, 4)):
                position = rng.randrange(max(1, len(data)))
                action = rng.choice(["flip", "insert", "delete", "header"])
                if action == "flip" and data:
                    data[position % len(data)] ^= rng.randint(1, 255)
                elif action == "insert":
                    data[position:position] = rng.randbytes(rng.randint(1, 8))
                elif action == "delete":
                    del data[position : position + rng.randint(1, 8)]
                else:
                    data[:4] = rng.randbytes(4)
            return bytes(data)

        return st.tuples(self._valid(), st.randoms(use_true_random=True)).map(mutate)

    def _truncated(self) -> st.SearchStrategy[bytes]:
        return st.tuples(self._valid(), st.floats(min_value=0, max_value=1, exclude_max=True)).map(
            lambda drawn: drawn[0][: int(len(drawn[0]) * drawn[1])]
        )

    def _oversized(self) -> st.SearchStrategy[bytes]:
        sizes = st.integers(min_value=protocol.MAX_FRAME_SIZE + 1, max_value=2**32 - 1)
        return st.tuples(sizes, st.binary(max_size=64)).map(lambda drawn: struct.pack(">I", drawn[0]) + drawn[1])

    def _large_values(self) -> st.SearchStrategy[bytes]:
        """A valid put of a value of up to 4 MiB: a frame that arrives over many ``recv`` calls."""
        sizes = st.integers(min_value=64 << 10, max_value=4 << 20)
        return st.tuples(request_ids, self.dict_ids, keys, sizes).map(
            lambda drawn: encode([drawn[0], protocol.PUT, drawn[1], drawn[2], None, bytes(drawn[3]), False])
        )


# Playing sessions.


INTERNAL_ERROR_CODE = CODE_BY_ERROR[InternalError]


@dataclass
class FuzzStats:
    """Counts of a fuzzing run; ``internal_errors`` keeps the first replies that reported a daemon bug."""

    sessions: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0
    closed_by_daemon: int = 0
    replies: int = 0
    internal_errors: list[str] = field(default_factory=list)
    internal_error_count: int = 0

    def merge(self, other: FuzzStats) -> None:
        self.sessions += other.sessions
        self.frames_sent += other.frames_sent
        self.bytes_sent += other.bytes_sent
        self.closed_by_daemon += other.closed_by_daemon
        self.replies += other.replies
        self.internal_error_count += other.internal_error_count
        self.internal_errors.extend(other.internal_errors[: 10 - len(self.internal_errors)])

    def note_reply(self, body: bytes) -> None:
        self.replies += 1
        reply = msgpack.unpackb(body, raw=False)
        if isinstance(reply, list) and len(reply) == 3 and reply[1] == INTERNAL_ERROR_CODE:
            self.internal_error_count += 1
            if len(self.internal_errors) < 10:
                self.internal_errors.append(str(reply[2]))


def play_session(socket_path: str, hello: bool, session_frames: list[bytes], stats: FuzzStats) -> None:
    """Send one session's frames on a new connection and read until the daemon closes it.

    Raises ``AssertionError`` when the daemon neither closes the connection nor replies
    within ``SESSION_TIMEOUT``.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(SESSION_TIMEOUT)
    try:
        sock.connect(socket_path)
        stats.sessions += 1
        outgoing = [encode([0, protocol.HELLO, protocol.PROTOCOL_VERSION, os.getpid()])] if hello else []
        outgoing.extend(session_frames)
        try:
            for data in outgoing:
                sock.sendall(data)
                stats.frames_sent += 1
                stats.bytes_sent += len(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            # The daemon closed the connection after a frame it could not accept.
            stats.closed_by_daemon += 1

        reader = protocol.FrameReader(max_frame_size=2**32)
        while True:
            try:
                data = sock.recv(RECV_SIZE)
            except ConnectionResetError:
                return
            except TimeoutError:
                raise AssertionError(
                    f"the daemon neither replied nor closed the connection within {SESSION_TIMEOUT} s"
                ) from None
            if not data:
                return
            reader.feed(data)
            for body in reader.frames():
                stats.note_reply(body)
    finally:
        sock.close()


Session = tuple[bool, list[bytes]]


def play_sessions(socket_path: str, sessions: list[Session], stats: FuzzStats) -> None:
    """Play sessions at the same time, each on a connection and a thread of its own."""
    results = [FuzzStats() for _ in sessions]
    failures: list[BaseException] = []

    def play(session: Session, result: FuzzStats) -> None:
        try:
            play_session(socket_path, session[0], session[1], result)
        except BaseException as exc:  # re-raised below, in the thread that runs the test
            failures.append(exc)

    threads = [threading.Thread(target=play, args=pair, daemon=True) for pair in zip(sessions, results)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        stats.merge(result)
    if failures:
        raise failures[0]


def sessions_strategy(context: FuzzContext, max_frames: int) -> st.SearchStrategy[list[Session]]:
    """One to three sessions to play at once; each starts with ``hello`` nine times out of ten."""
    frames = FrameStrategies(context).frames
    session = st.tuples(st.sampled_from([True] * 9 + [False]), st.lists(frames, min_size=1, max_size=max_frames))
    return st.lists(session, min_size=1, max_size=3)


def fuzz(
    socket_path: str,
    context: FuzzContext,
    *,
    frame_goal: int,
    is_daemon_alive: Any,
    stats: FuzzStats,
    max_frames: int = 20,
    sessions_per_round: int = 200,
) -> None:
    """Play hypothesis-drawn sessions, up to three at once, until ``frame_goal`` frames were sent.

    The examples come in rounds of ``sessions_per_round``, each round with a fixed seed
    (0, 1, 2, ...), so that two runs send the same frames, though concurrent sessions
    interleave differently. ``is_daemon_alive()`` is checked after every example, so a
    failure names the sessions that killed the daemon.
    """
    strategy = sessions_strategy(context, max_frames)

    def play(sessions: list[Session]) -> None:
        play_sessions(socket_path, sessions, stats)
        assert is_daemon_alive(), "the daemon died during these sessions"

    round_number = 0
    while stats.frames_sent < frame_goal:
        run_round = settings(
            max_examples=sessions_per_round,
            database=None,
            phases=[Phase.generate],
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )(given(strategy)(play))
        seed(round_number)(run_round)()
        round_number += 1


# The client that must not notice the fuzzer.


@dataclass
class WellBehavedClient:
    """Uses one dict and one lock through the public API in a loop, recording every error."""

    client: Any
    calls: int = 0
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="well-behaved-client", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=SESSION_TIMEOUT)
        if self._thread.is_alive():
            self.errors.append(f"the well-behaved client did not stop within {SESSION_TIMEOUT} s")

    def wait_for_calls(self, count: int, timeout: float = SESSION_TIMEOUT) -> bool:
        target = self.calls + count
        deadline = time.monotonic() + timeout
        while self.calls < target and not self.errors:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return not self.errors

    def _run(self) -> None:
        handle = Dict.from_name(BYSTANDER_DICT, create_if_missing=True, client=self.client)
        lock = Lock.from_name(BYSTANDER_LOCK, lease=30, timeout=SESSION_TIMEOUT, client=self.client)
        round_number = 0
        while not self._stop.is_set():
            try:
                self._one_round(handle, lock, round_number)
            except Exception as exc:  # every error is a finding; record it and go on
                self.errors.append(f"round {round_number}: {type(exc).__name__}: {exc}")
            round_number += 1

    def _one_round(self, handle: Dict, lock: Lock, round_number: int) -> None:
        key = f"key-{round_number % 50}"
        handle[key] = [round_number, key]
        self._expect(handle[key] == [round_number, key], f"get {key} returned another value")
        handle.update({f"batch-{round_number % 7}-{part}": part for part in range(5)})
        self._expect(handle.put(f"once-{round_number}", round_number, skip_if_exists=True), "put-if-absent skipped")
        self._expect(handle.pop(f"once-{round_number}") == round_number, "pop returned another value")
        self._expect(len(handle) == sum(1 for _ in handle.keys()), "len differs from the number of keys")
        with lock:
            self._expect(lock.token is not None, "the lock has no token")
        self.calls += 1

    def _expect(self, condition: bool, message: str) -> None:
        if not condition:
            raise AssertionError(message)


# The daemon process seen from outside.


def process_status(pid: int) -> dict[str, int]:
    """Return the resident memory (bytes) and the thread count of a process."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return {"rss_bytes": int(fields["VmRSS"].split()[0]) * 1024, "threads": int(fields["Threads"])}


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def create_fuzz_dicts(client: Any) -> FuzzContext:
    """Create the fuzzer's dicts, each with a few entries, and return their ids."""
    ids = []
    for name in FUZZ_DICT_NAMES:
        handle = Dict.from_name(name, create_if_missing=True, client=client)
        handle.update({str(number): bytes(number) for number in range(20)})
        ids.append(bytes.fromhex(handle.object_id[3:]))
    return FuzzContext(dict_ids=ids)
