"""The lock service: named locks that the daemon holds in memory for its connections.

A lock is held by one owner: a connection together with a random owner id that the client
makes for each acquisition. The daemon frees a lock when its owner releases it, when its
lease runs out, and at once when the owner's connection closes, for example because the
client process died. Waiters never poll. A ``lock_acquire`` that cannot be granted stays
unanswered in a first-come-first-served queue, and the daemon replies when it grants the
lock to it, or with ``None`` when the waiter's timeout runs out.

Each grant carries a fencing token from a durable counter per lock name. The counter is
incremented by the group commit writer, and the grant is sent only once that commit is on
disk, so tokens keep increasing across restarts of the daemon. Held locks are not stored:
a restarted daemon starts with every lock free.

Leases and timeouts run on the monotonic clock, so changes of the wall clock neither
shorten nor lengthen them. One timer thread handles every deadline.

Every request gets exactly one reply while its connection is open. ``lock_acquire`` replies
with the token, or ``None`` when its timeout ran out or a ``lock_cancel`` withdrew it.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sharedict.api import protocol
from sharedict.api.errors import LockNotOwnedError, ProtocolError
from sharedict.daemon.handlers import RequestError, _check_arity, _name, error_code
from sharedict.engine import EngineError

if TYPE_CHECKING:
    from sharedict.daemon.connection import Connection
    from sharedict.engine import GroupCommitWriter, Store

logger = logging.getLogger(__name__)

MAX_TIMER_WAIT = 3600.0
"""Maximum sleep of the timer thread, in seconds, before it checks the deadlines again."""

MAX_OWNER_SIZE = 64

LockKey = tuple[str, str]  # (environment name, lock name)


class _Waiter:
    """An acquire request in a lock's queue, which gets its reply when it is granted or times out."""

    __slots__ = ("key", "conn", "request_id", "owner", "lease", "deadline")

    def __init__(
        self, key: LockKey, conn: Connection, request_id: int, owner: bytes, lease: float | None, deadline: float | None
    ) -> None:
        self.key = key
        self.conn = conn
        self.request_id = request_id
        self.owner = owner
        self.lease = lease
        self.deadline = deadline


class _Hold:
    """The owner of a lock. ``token`` stays None until the token is durable and the grant sent."""

    __slots__ = ("key", "conn", "request_id", "owner", "lease", "token", "expires_at", "acquired_at")

    def __init__(self, waiter: _Waiter) -> None:
        self.key = waiter.key
        self.conn = waiter.conn
        self.request_id = waiter.request_id
        self.owner = waiter.owner
        self.lease = waiter.lease
        self.token: int | None = None
        self.expires_at: float | None = None
        self.acquired_at: float | None = None

    def owned_by(self, conn: Connection, owner: bytes) -> bool:
        return self.conn is conn and self.owner == owner


class _LockState:
    """A lock that is held or awaited. A free lock that nobody awaits has no state."""

    __slots__ = ("holder", "waiters")

    def __init__(self) -> None:
        self.holder: _Hold | None = None
        # Insertion order is arrival order, so the first item is the next to be granted.
        self.waiters: dict[tuple[int, bytes], _Waiter] = {}


def _reply(request_id: int, result: Any) -> bytes:
    return protocol.encode_frame_bytes([request_id, protocol.STATUS_OK, result])


def _counter_name(key: LockKey) -> bytes:
    environment_name, name = key
    return b"lock\x00" + environment_name.encode() + b"\x00" + name.encode()


def _label(key: LockKey) -> str:
    environment_name, name = key
    return f"lock {name!r}" if environment_name == "main" else f"lock {name!r} in environment {environment_name!r}"


def _owner(op: str, value: Any) -> bytes:
    if not isinstance(value, bytes) or not 1 <= len(value) <= MAX_OWNER_SIZE:
        raise RequestError(ProtocolError, f"{op}: owner must be 1 to {MAX_OWNER_SIZE} bytes")
    return value


def _seconds(op: str, what: str, value: Any, *, positive: bool) -> float | None:
    """Check an optional duration: None, or a finite number of seconds."""
    if value is None:
        return None
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not valid or value < 0 or (positive and value == 0):
        bound = "greater than 0" if positive else "0 or more"
        raise RequestError(ProtocolError, f"{op}: {what} must be null or a finite number of seconds {bound}")
    return float(value)


class LockService:
    """Named locks, their waiters and their leases; thread-safe.

    Requests arrive on connection threads, token commits complete on the writer thread,
    and deadlines pass on the service's timer thread. One mutex guards all lock state,
    and replies are sent while it is held, so that each reply matches the state it
    reports. Sending never blocks, so holding the mutex for it is cheap.
    """

    def __init__(self, store: Store, writer: GroupCommitWriter, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._writer = writer
        self._clock = clock
        self._mutex = threading.Lock()
        self._deadline_changed = threading.Condition(self._mutex)
        self._locks: dict[LockKey, _LockState] = {}
        # Deadlines of leases and waiter timeouts: (time, sequence number, hold or waiter).
        # An extend or a grant leaves the old entry behind, to be skipped when it comes up.
        self._deadlines: list[tuple[float, int, _Hold | _Waiter]] = []
        self._deadline_numbers = itertools.count()
        self._compact_at = 1024
        self._stopping = False
        self._timer = threading.Thread(target=self._run_timer, name="sharedict-locks", daemon=True)

    @property
    def operations(self) -> dict[str, Callable[[Connection, int, list[Any]], bytes | None]]:
        """The protocol operations that this service serves, for ``Server.register_operation``."""
        return {
            protocol.LOCK_ACQUIRE: self.acquire,
            protocol.LOCK_RELEASE: self.release,
            protocol.LOCK_EXTEND: self.extend,
            protocol.LOCK_CANCEL: self.cancel,
            protocol.LOCK_HELD: self.held,
        }

    def start(self) -> None:
        self._timer.start()

    def stop(self) -> None:
        """Stop granting locks and stop the timer. Call it before the writer stops."""
        with self._mutex:
            self._stopping = True
            self._deadline_changed.notify()
        if self._timer.is_alive():
            self._timer.join()

    # Operations. Each takes the connection, the request id and the request's arguments,
    # and returns the reply frame, or None when the reply is sent later.

    def acquire(self, conn: Connection, request_id: int, args: list[Any]) -> bytes | None:
        """``[env, name, owner, lease, timeout]``: reply with the token, or None after the timeout."""
        op = protocol.LOCK_ACQUIRE
        _check_arity(op, args, 5)
        key = (_name(op, "environment name", args[0]), _name(op, "lock name", args[1]))
        owner = _owner(op, args[2])
        lease = _seconds(op, "lease", args[3], positive=True)
        timeout = _seconds(op, "timeout", args[4], positive=False)

        with self._mutex:
            if self._stopping:
                # The connection closes with the daemon; the client retries on the next one.
                return None
            state = self._locks.get(key)
            if state is not None and (
                (conn.id, owner) in state.waiters or (state.holder is not None and state.holder.owned_by(conn, owner))
            ):
                raise RequestError(ProtocolError, f"{op}: this owner is already holding or waiting for {_label(key)}")

            deadline = None if timeout is None else self._clock() + timeout
            waiter = _Waiter(key, conn, request_id, owner, lease, deadline)
            if state is None:
                state = self._locks[key] = _LockState()
            if state.holder is None:
                self._grant(state, waiter)
                self._forget_if_idle(key, state)
                return None
            if timeout == 0:
                return _reply(request_id, None)
            state.waiters[(conn.id, owner)] = waiter
            if deadline is not None:
                self._schedule(deadline, waiter)
            return None

    def release(self, conn: Connection, request_id: int, args: list[Any]) -> bytes:
        """``[env, name, owner]``: free the lock; LockNotOwnedError unless this owner holds it."""
        key, owner = self._key_and_owner(protocol.LOCK_RELEASE, args)
        with self._mutex:
            state = self._owned_state(protocol.LOCK_RELEASE, key, conn, owner)
            state.holder = None
            self._grant_next(key, state)
        return _reply(request_id, None)

    def extend(self, conn: Connection, request_id: int, args: list[Any]) -> bytes:
        """``[env, name, owner]``: restart the lease; LockNotOwnedError unless this owner holds it."""
        key, owner = self._key_and_owner(protocol.LOCK_EXTEND, args)
        with self._mutex:
            hold = self._owned_state(protocol.LOCK_EXTEND, key, conn, owner).holder
            if hold.lease is not None and hold.token is not None:
                hold.expires_at = self._clock() + hold.lease
                self._schedule(hold.expires_at, hold)
        return _reply(request_id, None)

    def cancel(self, conn: Connection, request_id: int, args: list[Any]) -> bytes:
        """``[env, name, owner]``: withdraw an acquire, or release the lock if it was granted already.

        A client whose acquire was cancelled cannot know whether the grant crossed its
        cancel request, so this undoes either. The withdrawn acquire gets its reply, None.
        """
        key, owner = self._key_and_owner(protocol.LOCK_CANCEL, args)
        with self._mutex:
            state = self._locks.get(key)
            if state is None:
                return _reply(request_id, None)
            waiter = state.waiters.pop((conn.id, owner), None)
            if waiter is not None:
                conn.send([_reply(waiter.request_id, None)])
            elif state.holder is not None and state.holder.owned_by(conn, owner):
                state.holder = None
                self._grant_next(key, state)
            self._forget_if_idle(key, state)
        return _reply(request_id, None)

    def held(self, conn: Connection, request_id: int, args: list[Any]) -> bytes:
        """``[env, name]``: reply whether anyone holds the lock."""
        op = protocol.LOCK_HELD
        _check_arity(op, args, 2)
        key = (_name(op, "environment name", args[0]), _name(op, "lock name", args[1]))
        with self._mutex:
            state = self._locks.get(key)
            return _reply(request_id, state is not None and state.holder is not None)

    def _key_and_owner(self, op: str, args: list[Any]) -> tuple[LockKey, bytes]:
        _check_arity(op, args, 3)
        key = (_name(op, "environment name", args[0]), _name(op, "lock name", args[1]))
        return key, _owner(op, args[2])

    def _owned_state(self, op: str, key: LockKey, conn: Connection, owner: bytes) -> _LockState:
        state = self._locks.get(key)
        if state is None or state.holder is None or not state.holder.owned_by(conn, owner):
            raise RequestError(
                LockNotOwnedError,
                f"{op}: {_label(key)} is not held by this owner on this connection; it was released, "
                "its lease ran out, or the connection that acquired it closed",
            )
        return state

    # Connections.

    def connection_closed(self, conn: Connection) -> None:
        """Free the locks that ``conn`` held and withdraw its waiters."""
        with self._mutex:
            for key, state in list(self._locks.items()):
                for waiter_key in [waiter_key for waiter_key, waiter in state.waiters.items() if waiter.conn is conn]:
                    del state.waiters[waiter_key]
                hold = state.holder
                if hold is not None and hold.conn is conn:
                    if hold.token is not None:
                        logger.info(
                            "%s freed: its holder pid %d disconnected (connection %d)", _label(key), conn.pid, conn.id
                        )
                    state.holder = None
                    self._grant_next(key, state)
                self._forget_if_idle(key, state)

    # Granting. The callers hold the mutex.

    def _grant(self, state: _LockState, waiter: _Waiter) -> None:
        """Make ``waiter`` the holder and commit its token; the grant is sent once it is durable."""
        hold = _Hold(waiter)
        state.holder = hold
        try:
            self._writer.submit(
                functools.partial(self._next_token, waiter.key), functools.partial(self._token_committed, hold)
            )
        except EngineError as exc:
            logger.warning("%s: not granted to pid %d: %s", _label(waiter.key), waiter.conn.pid, exc)
            state.holder = None
            code, message = error_code(exc)
            waiter.conn.send([protocol.encode_frame_bytes([waiter.request_id, code, message])])

    def _grant_next(self, key: LockKey, state: _LockState) -> None:
        """Grant a free lock to its first waiter, or forget the lock when nobody waits."""
        while state.holder is None and state.waiters and not self._stopping:
            first = next(iter(state.waiters))
            self._grant(state, state.waiters.pop(first))
        self._forget_if_idle(key, state)

    def _next_token(self, key: LockKey, txn: Any) -> int:
        return self._store.next_counter(txn, _counter_name(key))

    def _token_committed(self, hold: _Hold, token: Any, error: BaseException | None) -> None:
        """Send the grant once its token is durable. Runs on the writer thread."""
        with self._mutex:
            state = self._locks.get(hold.key)
            if state is None or state.holder is not hold:
                # Cancelled, or its connection closed, while the token was being committed.
                # The token stays unused, which only leaves a gap in the sequence.
                return
            if error is not None:
                logger.error("committing the fencing token of %s failed: %r", _label(hold.key), error)
                code, message = error_code(error)
                hold.conn.send([protocol.encode_frame_bytes([hold.request_id, code, message])])
                state.holder = None
                self._grant_next(hold.key, state)
                return
            hold.token = token
            hold.acquired_at = time.time()
            if hold.lease is not None:
                # The lease starts with the grant, not with the request.
                hold.expires_at = self._clock() + hold.lease
                self._schedule(hold.expires_at, hold)
            logger.debug("%s granted to pid %d with token %d", _label(hold.key), hold.conn.pid, token)
            hold.conn.send([_reply(hold.request_id, token)])

    def _forget_if_idle(self, key: LockKey, state: _LockState) -> None:
        if state.holder is None and not state.waiters and self._locks.get(key) is state:
            del self._locks[key]

    # Deadlines.

    def _schedule(self, when: float, item: _Hold | _Waiter) -> None:
        if len(self._deadlines) >= self._compact_at:
            # Extends and grants leave stale entries behind; drop them before the heap
            # grows without bound under a steady stream of them.
            self._deadlines = [entry for entry in self._deadlines if self._is_current(entry[0], entry[2])]
            heapq.heapify(self._deadlines)
            self._compact_at = max(1024, 2 * len(self._deadlines))
        heapq.heappush(self._deadlines, (when, next(self._deadline_numbers), item))
        if self._deadlines[0][2] is item:
            self._deadline_changed.notify()

    def _is_current(self, when: float, item: _Hold | _Waiter) -> bool:
        state = self._locks.get(item.key)
        if state is None:
            return False
        if isinstance(item, _Hold):
            return state.holder is item and item.expires_at == when
        return state.waiters.get((item.conn.id, item.owner)) is item and item.deadline == when

    def _run_timer(self) -> None:
        with self._mutex:
            while not self._stopping:
                now = self._clock()
                while self._deadlines and self._deadlines[0][0] <= now:
                    when, _, item = heapq.heappop(self._deadlines)
                    if not self._is_current(when, item):
                        continue
                    try:
                        self._deadline_passed(item)
                    except Exception:
                        # The thread must survive: every later lease depends on it.
                        logger.exception("handling a deadline of %s failed", _label(item.key))
                # A lease of centuries is valid, but Condition.wait() overflows on it, so
                # the thread wakes at least hourly and looks again.
                timeout = min(self._deadlines[0][0] - now, MAX_TIMER_WAIT) if self._deadlines else None
                self._deadline_changed.wait(timeout)

    def _deadline_passed(self, item: _Hold | _Waiter) -> None:
        state = self._locks[item.key]
        if isinstance(item, _Hold):
            logger.warning(
                "%s: the lease of %g s held by pid %d ran out; freeing the lock", _label(item.key), item.lease, item.conn.pid
            )
            state.holder = None
            self._grant_next(item.key, state)
            return
        del state.waiters[(item.conn.id, item.owner)]
        item.conn.send([_reply(item.request_id, None)])
        self._forget_if_idle(item.key, state)

    # Status.

    def status(self) -> list[dict[str, Any]]:
        """Describe the held locks: name, environment, token, holder pid, lease and waiters."""
        with self._mutex:
            now = self._clock()
            locks = []
            for (environment_name, name), state in sorted(self._locks.items()):
                hold = state.holder
                if hold is None or hold.token is None:
                    continue
                locks.append(
                    {
                        "name": name,
                        "environment_name": environment_name,
                        "token": hold.token,
                        "holder_pid": hold.conn.pid,
                        "acquired_at": hold.acquired_at,
                        "lease": hold.lease,
                        "lease_remaining": None if hold.expires_at is None else max(0.0, hold.expires_at - now),
                        "waiters": len(state.waiters),
                    }
                )
            return locks
