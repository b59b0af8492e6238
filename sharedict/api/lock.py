"""``Lock``: a named lock that every thread, process and event loop of the machine shares.

    lock = Lock.from_name("deploy", lease=30)
    with lock:                             # waits until acquired
        deploy(fencing_token=lock.token)
    async with lock: ...                   # and await lock.acquire.aio(timeout=5)

The daemon holds locks in memory. It ties each held lock to the connection that acquired
it and frees the lock at once when that connection closes, so a process that dies while
holding a lock loses it. The blocking form therefore takes a connection out of the
client's pool for each acquisition and keeps it there, carrying nothing else, until the
release. The async form holds the lock through its event loop's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import threading
import time
import weakref
from asyncio import _get_running_loop  # unlike get_running_loop(), returns None outside a loop
from collections.abc import Awaitable, Generator
from typing import Any

from sharedict.api import protocol
from sharedict.api.async_call import UndoableCall
from sharedict.api.codec import check_environment, check_name
from sharedict.api.errors import ConnectionLostError, InvalidError, LockNotOwnedError, LockTimeoutError
from sharedict.api.operation import BoundOperation, _warn_if_in_event_loop, operation, run_blocking
from sharedict.api.transport import Client, Request, SyncConnection, _NotSent, _ReplyLost, check_client

OWNER_SIZE = 16
# An acquire whose connection breaks is sent again on a new one, at most this many times
# in all. The daemon frees whatever a closed connection held or awaited, so a new
# attempt can never leave a second hold behind.
ACQUIRE_ATTEMPTS = 3


def _check_seconds(what: str, value: Any, *, positive: bool) -> float | None:
    if value is None:
        return None
    seconds = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond the range of a float
            seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        bound = "greater than 0" if positive else "0 or more"
        raise InvalidError(f"{what}={value!r:.60} is invalid; pass None or a finite number of seconds {bound}")
    return seconds


class _Hold:
    """One acquisition of a lock by a ``Lock`` object.

    ``lost`` is set once the daemon has said that this owner no longer holds the lock.
    The hold is kept even then, so that ``Lock.token`` still shows the token that the
    late work was fenced with.
    """

    __slots__ = ("owner", "token", "pid", "lost")

    def __init__(self, owner: bytes, token: int) -> None:
        self.owner = owner
        self.token = token
        self.pid = os.getpid()
        self.lost = False


class _PinnedConnections:
    """Sends the blocking requests of one ``Lock``, each acquisition on its own connection.

    An acquire takes a connection out of the client's pool. When the lock is granted, the
    connection stays out of the pool, pinned to the owner id of that acquisition, and only
    that acquisition's extend and release use it. It goes back to the pool once the daemon
    holds nothing for it. A connection that saw any error is closed instead, which makes
    the daemon free whatever it still held for it. Other requests use the pool.
    """

    def __init__(self, client: Client | None) -> None:
        self._client = client
        self._mutex = threading.Lock()
        self._pinned: dict[bytes, SyncConnection] = {}

    def client(self) -> Client:
        return self._client or Client.default()

    def forget_after_fork(self) -> None:
        """Start afresh in a forked child, whose pinned connections are its parent's."""
        self._mutex = threading.Lock()
        self._pinned = {}

    def holds(self, owner: bytes) -> bool:
        """Return whether a connection of this process is pinned to ``owner``."""
        with self._mutex:
            conn = self._pinned.get(owner)
            return conn is not None and not conn.closed and conn.pid == os.getpid()

    def call(self, request: Request) -> Any:
        if request.op == protocol.LOCK_ACQUIRE:
            return self._acquire(request)
        if request.op in (protocol.LOCK_RELEASE, protocol.LOCK_EXTEND):
            return self._call_pinned(request)
        return self.client().call(request)

    def _acquire(self, request: Request) -> Any:
        client = self.client()
        conn = client._checkout()
        token = self._send(conn, request)
        if token is None:
            client._checkin(conn)
        else:
            with self._mutex:
                self._pinned[request.args[2]] = conn
        return token

    def _call_pinned(self, request: Request) -> Any:
        owner = request.args[2]
        # The mutex keeps a release and an extend of one hold from using the connection at
        # the same time. Holding it is cheap, because neither request waits for the lock.
        with self._mutex:
            conn = self._pinned.get(owner)
            if conn is None or conn.pid != os.getpid():
                raise _NotPinned
            if conn.closed:
                del self._pinned[owner]
                raise ConnectionLostError(f"the connection that holds the lock closed before {request.op}")
            try:
                result = self._send(conn, request)
            except BaseException:
                del self._pinned[owner]
                raise
            if request.op == protocol.LOCK_RELEASE:
                del self._pinned[owner]
                self.client()._checkin(conn)
            return result

    @staticmethod
    def _send(conn: SyncConnection, request: Request) -> Any:
        try:
            return conn.request(request)
        except (_NotSent, _ReplyLost):
            # The connection is closed already, and the daemon freed what it held.
            raise ConnectionLostError(f"the connection to the daemon broke during {request.op}") from None
        except BaseException:
            conn.close()
            raise


def _retrieve_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _NotPinned(Exception):
    """No blocking connection of this process holds the acquisition."""


class _BoundLockOperation(BoundOperation):
    """A ``Lock`` operation whose blocking form sends through the lock's pinned connections."""

    __slots__ = ()

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        _warn_if_in_event_loop(self._name)
        lock = self._instance
        return run_blocking(self._function(lock, *args, **kwargs), lock._connections)


class _BoundAcquire(_BoundLockOperation):
    """``Lock.acquire``, whose ``.aio`` form releases a grant that its cancelled awaiter never saw."""

    __slots__ = ()

    def aio(self, /, *args: Any, **kwargs: Any) -> Awaitable[bool]:
        loop = _get_running_loop()
        if loop is None:
            return super().aio(*args, **kwargs)
        lock = self._instance
        body = self._function(lock, *args, **kwargs)
        return UndoableCall(loop, lock._connections.client(), body, undo=lock._release_unseen_grant)


class _lock_operation(operation):  # noqa: N801 - used as a decorator
    bound_class = _BoundLockOperation


class _acquire_operation(_lock_operation):  # noqa: N801 - used as a decorator
    bound_class = _BoundAcquire


# Every Lock of the process, for the fork hook below.
_locks: weakref.WeakSet[Lock] = weakref.WeakSet()


def _renew_locks_after_fork() -> None:
    # A fork copies each mutex as it is: held, if another thread was inside acquire(),
    # release() or extend() at that moment, by a thread that does not exist in the child.
    for lock in list(_locks):
        lock._state_lock = threading.Lock()
        lock._connections.forget_after_fork()


os.register_at_fork(after_in_child=_renew_locks_after_fork)


class Lock:
    """A named lock with a lease, shared by every thread, process and event loop of the machine.

    Make one with ``Lock.from_name``. Guarantees:
        * Mutual exclusion while the lease lasts: at most one owner holds the lock.
        * Waiters are granted the lock first come, first served, without polling, when
          it is released, when its lease runs out, or when its holder's connection
          closes (for example because the process died).
        * ``token`` is a fencing token that strictly increases with every acquisition
          of the lock's name, also across restarts of the daemon.
        * Only the owner can release or extend: after the lock was lost, ``release()``
          and ``extend()`` raise ``LockNotOwnedError`` and leave the new owner alone.

    A ``Lock`` object is one owner, like a ``threading.Lock``: threads or tasks that share
    it exclude each other, and any of them may release it. The lock is not reentrant: a
    second ``acquire()`` by its holder waits like any other. Release a lock in the form
    that acquired it: ``release()`` after ``acquire()``, ``release.aio()`` after
    ``acquire.aio()`` on the same event loop.
    """

    _name: str
    _environment_name: str
    _lease: float | None
    _timeout: float | None
    _client: Client | None
    _connections: _PinnedConnections
    _state_lock: threading.Lock
    _hold: _Hold | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Lock(...) cannot be constructed directly; use Lock.from_name(...)")

    @staticmethod
    def from_name(
        name: str,
        *,
        lease: float | None = 30.0,
        timeout: float | None = None,
        environment_name: str | None = None,
        client: Client | None = None,
    ) -> Lock:
        """Return a handle on the lock ``name``; no I/O happens until it is used.

        Args:
            name: the lock's name: 1 to 64 ASCII letters, digits, ``-``, ``_`` or ``.``.
            lease: seconds that a holder keeps the lock without calling ``extend()``;
                None holds it until ``release()`` or until the holder disconnects.
            timeout: seconds that ``with lock:`` and ``acquire()`` wait before giving up;
                None waits as long as it takes.
            environment_name: the namespace of the name; default ``main``.
            client: the connections to use; default ``Client.default()``.
        """
        lock = object.__new__(Lock)
        lock._name = check_name(name, "lock name")
        lock._environment_name = check_environment(environment_name)
        lock._lease = _check_seconds("lease", lease, positive=True)
        lock._timeout = _check_seconds("timeout", timeout, positive=False)
        lock._client = check_client(client)
        lock._connections = _PinnedConnections(lock._client)
        lock._state_lock = threading.Lock()
        lock._hold = None
        _locks.add(lock)
        return lock

    @property
    def name(self) -> str:
        return self._name

    @property
    def lease(self) -> float | None:
        """Seconds that a holder keeps the lock without ``extend()``; None for no lease."""
        return self._lease

    @property
    def timeout(self) -> float | None:
        """Seconds that ``acquire()`` and ``with`` wait by default; None waits without limit."""
        return self._timeout

    @property
    def token(self) -> int | None:
        """The fencing token of this object's last acquisition, or None without one.

        The token stays set when the lease runs out, also after ``release()`` or
        ``extend()`` has raised ``LockNotOwnedError`` for it, which is its purpose: a
        resource that remembers the highest token it has seen rejects the late writer.
        It is None before the first acquisition, after a successful ``release()``, and
        in a process forked from the holder.
        """
        hold = self._hold
        if hold is None or hold.pid != os.getpid():
            return None
        return hold.token

    def __repr__(self) -> str:
        options = f", lease={self._lease!r}"
        if self._timeout is not None:
            options += f", timeout={self._timeout!r}"
        if self._environment_name != "main":
            options += f", environment_name={self._environment_name!r}"
        return f"sharedict.Lock.from_name({self._name!r}{options})"

    def __copy__(self) -> Lock:
        # A copy is a new handle on the same lock, holding nothing: a field-by-field copy
        # would share this object's hold and connections, and release its acquisition.
        return Lock.from_name(
            self._name,
            lease=self._lease,
            timeout=self._timeout,
            environment_name=self._environment_name,
            client=self._client,
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> Lock:
        return self.__copy__()

    @property
    def _label(self) -> str:
        if self._environment_name == "main":
            return f"lock {self._name!r}"
        return f"lock {self._name!r} in environment {self._environment_name!r}"

    # Operations: each is written once and has a blocking form and an ``.aio`` form.

    @_acquire_operation
    def acquire(self, timeout: float | None = None, blocking: bool = True) -> Generator[Request, Any, bool]:
        """Wait until this object holds the lock; return False if ``timeout`` ran out first.

        Args:
            timeout: seconds to wait; None uses the lock's ``timeout``, and a lock without
                one waits as long as it takes.
            blocking: False tries once and returns at once; it takes no timeout.

        A cancelled ``acquire.aio()`` leaves nothing behind: it withdraws its place in
        the queue, or releases the lock if the grant crossed the cancellation. A
        wrapper such as ``gather`` or ``shield`` that drops the result of a finished
        acquire leaves the lock held by this object, as ``asyncio.Lock`` would.
        """
        if not blocking:
            if timeout is not None:
                raise InvalidError(f"timeout={timeout!r} was given with blocking=False; pass one or the other")
            wait = 0.0
        else:
            wait = self._timeout if timeout is None else _check_seconds("timeout", timeout, positive=False)
        deadline = None if wait is None else time.monotonic() + wait

        attempt = 1
        while True:
            owner = secrets.token_bytes(OWNER_SIZE)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            request = Request(
                protocol.LOCK_ACQUIRE, self._environment_name, self._name, owner, self._lease, remaining, write=True
            )
            try:
                token = yield request
            except ConnectionLostError:
                if attempt == ACQUIRE_ATTEMPTS:
                    raise
                attempt += 1
                continue
            except asyncio.CancelledError:
                # The request was sent on the event loop's connection, and the cancel goes
                # out on the same one before this task can be interrupted again, so the
                # daemon handles it after the acquire.
                with contextlib.suppress(Exception):
                    yield Request(protocol.LOCK_CANCEL, self._environment_name, self._name, owner)
                raise

            if token is None:
                return False
            with self._state_lock:
                self._hold = _Hold(owner, token)
            return True

    @_lock_operation
    def release(self) -> Generator[Request, Any, None]:
        """Release the lock so that the next waiter gets it.

        Raises ``LockNotOwnedError`` when this object does not hold the lock: it never
        acquired it, or lost it because its lease ran out or its connection closed. The
        lock of a newer owner is left untouched.
        """
        hold = self._current_hold("release")
        yield from self._send_as_owner(protocol.LOCK_RELEASE, hold)
        self._forget(hold)

    @_lock_operation
    def extend(self) -> Generator[Request, Any, None]:
        """Restart the lease, so that the lock is held for ``lease`` more seconds from now.

        Raises ``LockNotOwnedError`` when this object no longer holds the lock.
        """
        hold = self._current_hold("extend")
        yield from self._send_as_owner(protocol.LOCK_EXTEND, hold)

    @_lock_operation
    def locked(self) -> Generator[Request, Any, bool]:
        """Return whether anyone holds the lock."""
        return (yield Request(protocol.LOCK_HELD, self._environment_name, self._name))

    def _current_hold(self, action: str) -> _Hold:
        hold = self._hold
        if hold is None:
            raise LockNotOwnedError(f"{action}() of {self._label} failed: this Lock does not hold it; acquire it first")
        if hold.pid != os.getpid():
            raise LockNotOwnedError(
                f"{action}() of {self._label} failed: the lock is held by process {hold.pid}, which acquired it "
                "before this process was forked; only that process can release or extend it"
            )
        if hold.lost:
            raise LockNotOwnedError(self._lost_message(hold))
        return hold

    def _send_as_owner(self, op: str, hold: _Hold) -> Generator[Request, Any, None]:
        try:
            yield Request(op, self._environment_name, self._name, hold.owner, write=True)
        except _NotPinned:
            raise InvalidError(
                f"{self._label} was acquired with `acquire.aio()`, so this blocking call cannot reach it; "
                "use `await lock.release.aio()` or `await lock.extend.aio()` on the same event loop"
            ) from None
        except (LockNotOwnedError, ConnectionLostError):
            if self._connections.holds(hold.owner):
                # The daemon rejected an async request for a lock that a blocking
                # connection of this object holds, so the lock is still held.
                raise InvalidError(
                    f"{self._label} was acquired with the blocking `acquire()`, so this async call cannot "
                    "reach it; use `lock.release()` or `lock.extend()`"
                ) from None
            hold.lost = True
            raise LockNotOwnedError(self._lost_message(hold)) from None

    def _lost_message(self, hold: _Hold) -> str:
        if self._lease is None:
            cause = "its connection to the daemon closed (for example because the daemon restarted)"
        else:
            cause = f"its lease of {self._lease:g} s ran out, or its connection to the daemon closed"
        return (
            f"{self._label} is no longer held by this Lock: {cause}; another owner may have held it since, so "
            f"work fenced with token {hold.token} is not protected; acquire the lock again"
        )

    def _release_unseen_grant(self, acquired: bool) -> None:
        """Release the lock that an ``acquire.aio()`` got after its awaiter was cancelled."""
        if not acquired:
            return
        # The release runs on the loop's connection and nothing awaits it. Its outcome is
        # retrieved so that asyncio does not log it. If it fails, the lease or the end of
        # the connection frees the lock.
        release = self.release.aio()
        release.add_done_callback(_retrieve_outcome)

    def _forget(self, hold: _Hold) -> None:
        with self._state_lock:
            if self._hold is hold:
                self._hold = None

    # Context managers.

    def __enter__(self) -> Lock:
        _warn_if_in_event_loop("Lock.acquire", "async with lock", "`with lock`")
        if not self.acquire():
            raise LockTimeoutError(self._timeout_message())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: Any) -> None:
        _warn_if_in_event_loop("Lock.release", "async with lock", "`with lock`")
        if isinstance(exc, LockNotOwnedError):
            # The block already raised that the lock was lost, so the release here would
            # only raise the same error again.
            with contextlib.suppress(LockNotOwnedError):
                self.release()
            return
        self.release()

    async def __aenter__(self) -> Lock:
        if not await self.acquire.aio():
            raise LockTimeoutError(self._timeout_message())
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: Any) -> None:
        if isinstance(exc, LockNotOwnedError):
            with contextlib.suppress(LockNotOwnedError):
                await self.release.aio()
            return
        await self.release.aio()

    def _timeout_message(self) -> str:
        return (
            f"{self._label} was not acquired within its timeout of {self._timeout:g} s; another owner holds it. "
            "Pass a longer timeout to Lock.from_name, or use lock.acquire(timeout=...) to handle the wait yourself"
        )
