"""``Lock`` against a real daemon: exclusion, leases, fencing tokens, holder death, async forms."""

from __future__ import annotations

import asyncio
import copy
import gc
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from helpers import wait_for_child
from sharedict import Dict, InvalidError, Lock, LockNotOwnedError, LockTimeoutError
from sharedict.api import cli, protocol
from sharedict.api.transport import Request

WAIT_TIMEOUT = 60.0

INCREMENT_SCRIPT = """
import sys, time
from sharedict import Dict, Lock

counter = Dict.from_name("counter")
lock = Lock.from_name("counter")
use_lock = sys.argv[1] == "locked"
print("ready", flush=True)
sys.stdin.readline()
for _ in range(200):
    if use_lock:
        lock.acquire()
    value = counter["n"]
    time.sleep(0.001)  # widens the window between the read and the write
    counter["n"] = value + 1
    if use_lock:
        lock.release()
"""

HOLDER_SCRIPT = """
import sys, time
from sharedict import Lock

lock = Lock.from_name(sys.argv[1], lease=None)
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_TIMEOUT:.0f} s waiting until {what}")
        time.sleep(0.01)


def lock_entry(daemon: Any, name: str) -> dict[str, Any] | None:
    """Return the daemon's status entry of a held lock, or None when nobody holds it."""
    status = daemon.client().call(Request(protocol.STATUS))
    for entry in status["locks"]:
        if entry["name"] == name:
            return entry
    return None


def waiter_count(daemon: Any, name: str) -> int:
    entry = lock_entry(daemon, name)
    return 0 if entry is None else entry["waiters"]


def run_incrementers(child_env: dict[str, str], mode: str) -> int:
    """Run 8 processes that each add 1 to a counter 200 times; return the final count."""
    counter = Dict.from_name("counter", create_if_missing=True)
    counter["n"] = 0
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", INCREMENT_SCRIPT, mode],
            env=child_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    try:
        # Start the loops together, once every process has imported sharedict.
        for process in processes:
            assert process.stdout.readline() == "ready\n"
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        for process in processes:
            assert process.wait(timeout=240) == 0
    finally:
        for process in processes:
            process.kill()
            process.wait()
    return counter["n"]


# Mutual exclusion.


def test_counter_under_lock_loses_no_update(daemon, child_env):
    assert run_incrementers(child_env, "locked") == 1600


def test_counter_without_lock_loses_updates(daemon, child_env):
    assert run_incrementers(child_env, "unlocked") < 1600


def test_two_lock_objects_exclude_each_other(daemon):
    first = Lock.from_name("pair")
    second = Lock.from_name("pair")
    assert first.acquire()
    assert second.acquire(blocking=False) is False
    first.release()
    assert second.acquire(blocking=False) is True
    second.release()


def test_second_acquire_by_holder_waits(daemon):
    lock = Lock.from_name("reentry")
    assert lock.acquire()
    assert lock.acquire(timeout=0.1) is False
    lock.release()


def test_locked_reports_any_holder(daemon):
    holder = Lock.from_name("state")
    observer = Lock.from_name("state")
    assert observer.locked() is False
    holder.acquire()
    assert observer.locked() is True
    holder.release()
    assert observer.locked() is False


def test_held_lock_survives_closing_idle_connections(daemon):
    client = daemon.client()
    lock = Lock.from_name("pinned", client=client)
    lock.acquire()
    client.close()
    assert Lock.from_name("pinned").acquire(blocking=False) is False
    lock.release()
    assert lock.locked() is False


# Timeouts.


def test_acquire_returns_false_after_timeout(daemon):
    holder = Lock.from_name("busy")
    holder.acquire()
    assert Lock.from_name("busy").acquire(timeout=0.2) is False


def test_nonblocking_acquire_returns_false_when_held(daemon):
    holder = Lock.from_name("busy")
    holder.acquire()
    assert Lock.from_name("busy").acquire(blocking=False) is False


def test_nonblocking_acquire_takes_free_lock(daemon):
    lock = Lock.from_name("free")
    assert lock.acquire(blocking=False) is True
    assert lock.token is not None


def test_timed_out_waiter_leaves_queue(daemon):
    holder = Lock.from_name("queue")
    holder.acquire()
    assert Lock.from_name("queue").acquire(timeout=0.1) is False
    assert waiter_count(daemon, "queue") == 0


def test_with_raises_lock_timeout_error(daemon):
    holder = Lock.from_name("busy")
    holder.acquire()
    impatient = Lock.from_name("busy", timeout=0.1)
    with pytest.raises(LockTimeoutError, match="'busy' was not acquired within its timeout of 0.1 s"):
        with impatient:
            pass


def test_lock_timeout_error_is_timeout_error():
    assert issubclass(LockTimeoutError, TimeoutError)


def test_lock_timeout_applies_to_acquire(daemon):
    holder = Lock.from_name("busy")
    holder.acquire()
    assert Lock.from_name("busy", timeout=0.1).acquire() is False


# Ownership and leases.


def test_release_without_acquire_raises(daemon):
    with pytest.raises(LockNotOwnedError, match="does not hold it"):
        Lock.from_name("never").release()


def test_lease_expiry_grants_next_waiter(daemon):
    old = Lock.from_name("lease", lease=0.5)
    new = Lock.from_name("lease", lease=None)
    assert old.acquire()
    assert new.acquire(timeout=WAIT_TIMEOUT) is True
    with pytest.raises(LockNotOwnedError, match="lease of 0.5 s ran out"):
        old.release()
    with pytest.raises(LockNotOwnedError):
        old.extend()
    new.extend()
    assert Lock.from_name("lease").acquire(blocking=False) is False
    new.release()


def test_huge_lease_keeps_timer_running(daemon):
    # A lease too long for Condition.wait() once stopped the daemon's timer thread, and
    # with it every later lease and timeout.
    forever = Lock.from_name("centuries", lease=1e10)
    short = Lock.from_name("short", lease=0.5)
    assert forever.acquire()
    assert short.acquire()
    assert Lock.from_name("short").acquire(timeout=WAIT_TIMEOUT) is True
    assert Lock.from_name("centuries").acquire(timeout=0.2) is False


def test_lost_lock_keeps_token_for_fencing(daemon):
    old = Lock.from_name("fence", lease=0.5)
    new = Lock.from_name("fence")
    old.acquire()
    new.acquire(timeout=WAIT_TIMEOUT)
    assert old.token < new.token


def test_failed_release_keeps_token(daemon):
    old = Lock.from_name("kept", lease=0.5)
    new = Lock.from_name("kept")
    old.acquire()
    token = old.token
    new.acquire(timeout=WAIT_TIMEOUT)
    with pytest.raises(LockNotOwnedError):
        old.release()
    assert old.token == token
    with pytest.raises(LockNotOwnedError, match=f"token {token} is not protected"):
        old.extend()
    assert old.token == token
    with pytest.raises(LockNotOwnedError, match=f"token {token} is not protected"):
        old.release()
    assert old.token == token


def test_failed_extend_aio_keeps_token(daemon):
    async def lose_lock() -> tuple[int | None, int | None]:
        old = Lock.from_name("kept-aio", lease=0.5)
        new = Lock.from_name("kept-aio")
        await old.acquire.aio()
        token = old.token
        await new.acquire.aio(timeout=WAIT_TIMEOUT)
        with pytest.raises(LockNotOwnedError):
            await old.extend.aio()
        await new.release.aio()
        return token, old.token

    token, token_after = asyncio.run(lose_lock())
    assert token is not None
    assert token_after == token


def test_with_block_lost_lock_raises_once(daemon):
    old = Lock.from_name("lost-in-with", lease=0.5)
    new = Lock.from_name("lost-in-with")
    with pytest.raises(LockNotOwnedError) as raised:
        with old:
            new.acquire(timeout=WAIT_TIMEOUT)
            old.extend()
    shown = "".join(traceback.format_exception(raised.value))
    assert "During handling of the above exception" not in shown
    assert new.locked()
    new.release()


def test_async_with_block_lost_lock_raises_once(daemon):
    async def lose_lock() -> BaseException:
        old = Lock.from_name("lost-in-async-with", lease=0.5)
        new = Lock.from_name("lost-in-async-with")
        with pytest.raises(LockNotOwnedError) as raised:
            async with old:
                await new.acquire.aio(timeout=WAIT_TIMEOUT)
                await old.extend.aio()
        await new.release.aio()
        return raised.value

    shown = "".join(traceback.format_exception(asyncio.run(lose_lock())))
    assert "During handling of the above exception" not in shown


def test_acquire_after_lost_lock_replaces_token(daemon):
    old = Lock.from_name("again", lease=0.5)
    new = Lock.from_name("again")
    old.acquire()
    new.acquire(timeout=WAIT_TIMEOUT)
    with pytest.raises(LockNotOwnedError):
        old.release()
    lost_token = old.token
    new.release()
    assert old.acquire(timeout=WAIT_TIMEOUT) is True
    assert old.token > lost_token
    old.release()
    assert old.token is None


def test_extend_restarts_lease(daemon):
    lock = Lock.from_name("extend", lease=30)
    lock.acquire()
    first = lock_entry(daemon, "extend")["lease_remaining"]
    wait_until(lambda: lock_entry(daemon, "extend")["lease_remaining"] < first - 0.05, "the lease has run for 0.05 s")
    before = lock_entry(daemon, "extend")["lease_remaining"]
    lock.extend()
    assert lock_entry(daemon, "extend")["lease_remaining"] > before


def test_no_lease_holds_until_release(daemon):
    lock = Lock.from_name("forever", lease=None)
    lock.acquire()
    assert lock_entry(daemon, "forever")["lease_remaining"] is None


# Holder death and daemon restarts.


def test_killed_holder_frees_lock_at_once(daemon, child_env):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER_SCRIPT, "doomed"], env=child_env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        waiter = Lock.from_name("doomed")
        acquired_at: list[float] = []

        def wait_for_lock() -> None:
            if waiter.acquire(timeout=WAIT_TIMEOUT):
                acquired_at.append(time.monotonic())

        thread = threading.Thread(target=wait_for_lock)
        thread.start()
        wait_until(lambda: waiter_count(daemon, "doomed") == 1, "the waiter is queued")
        killed_at = time.monotonic()
        holder.kill()
        holder.wait()
        thread.join()
    finally:
        holder.kill()
        holder.wait()
    assert acquired_at, "the waiter did not get the lock of the killed holder"
    assert acquired_at[0] - killed_at < 1.0
    assert lock_entry(daemon, "doomed")["holder_pid"] == os.getpid()


def test_tokens_increase_across_restart(daemon):
    lock = Lock.from_name("tokens")
    tokens = []
    for _ in range(100):
        lock.acquire()
        tokens.append(lock.token)
        lock.release()
    assert all(earlier < later for earlier, later in zip(tokens, tokens[1:]))

    daemon.restart(crash=True)
    lock.acquire()
    assert lock.token > tokens[-1]


def test_restart_frees_held_lock(daemon):
    old = Lock.from_name("restart", lease=None)
    old.acquire()
    daemon.restart(crash=True)
    new = Lock.from_name("restart")
    assert new.acquire(blocking=False) is True
    with pytest.raises(LockNotOwnedError, match="connection to the daemon closed"):
        old.release()
    assert new.locked() is True


def test_forked_child_does_not_own_parent_lock(daemon):
    lock = Lock.from_name("forked")
    lock.acquire()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            if lock.token is None:
                try:
                    lock.release()
                except LockNotOwnedError:
                    status = 0
        finally:
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0, "the child saw a token or could release the lock"
    assert Lock.from_name("forked").acquire(blocking=False) is False
    lock.release()


@pytest.mark.parametrize("mutex", ["connections", "state"])
def test_forked_child_locks_while_parent_holds_mutex(daemon, mutex):
    lock = Lock.from_name(f"fork-{mutex}")
    lock.acquire()
    lock.release()

    # A parent's thread inside acquire(), release() or extend() holds these mutexes, and
    # a fork copies them held into a child where that thread does not exist.
    parent_mutex = lock._connections._mutex if mutex == "connections" else lock._state_lock
    with parent_mutex:
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                if lock.acquire(timeout=5):
                    lock.release()
                    status = 0
            finally:
                os._exit(status)

    assert wait_for_child(pid, 20) == 0


@pytest.mark.parametrize("copy_function", [copy.copy, copy.deepcopy], ids=["copy", "deepcopy"])
def test_copied_lock_holds_nothing(daemon, copy_function):
    holder = Lock.from_name("copied", lease=None)
    assert holder.acquire()
    duplicate = copy_function(holder)

    assert duplicate.token is None
    assert duplicate.name == "copied"
    assert duplicate.lease is None
    with pytest.raises(LockNotOwnedError):
        duplicate.release()
    assert duplicate.acquire(blocking=False) is False
    holder.release()
    assert duplicate.acquire(blocking=False) is True
    duplicate.release()


def test_dropped_lock_object_frees_lock(daemon):
    # Without the cycle collector, only reference counting can free the Lock object.
    gc.disable()
    try:
        holder = Lock.from_name("dropped", lease=None)
        assert holder.acquire()
        del holder
        other = Lock.from_name("dropped", lease=None)
        wait_until(lambda: other.acquire(blocking=False), "the dropped holder's lock is free")
        other.release()
    finally:
        gc.enable()


@pytest.mark.parametrize("client", ["oops", 0.5])
def test_lock_with_bad_client_raises(client):
    with pytest.raises(TypeError, match=rf"client={client!r} is not a sharedict Client"):
        Lock.from_name("bad-client", client=client)


# Order.


def test_waiters_granted_in_arrival_order(daemon):
    holder = Lock.from_name("fifo")
    holder.acquire()
    order: list[int] = []

    def take_turn(index: int) -> None:
        lock = Lock.from_name("fifo")
        if lock.acquire(timeout=WAIT_TIMEOUT):
            order.append(index)
            lock.release()

    threads = []
    for index in range(5):
        thread = threading.Thread(target=take_turn, args=(index,))
        thread.start()
        threads.append(thread)
        wait_until(lambda: waiter_count(daemon, "fifo") == index + 1, f"waiter {index} is queued")
    holder.release()
    for thread in threads:
        thread.join()
    assert order == [0, 1, 2, 3, 4]


# Async forms.


def test_async_with_holds_and_releases(daemon):
    async def use_lock() -> tuple[bool, int | None, bool]:
        lock = Lock.from_name("aio")
        async with lock:
            held = await lock.locked.aio()
            token = lock.token
        return held, token, await lock.locked.aio()

    held, token, held_after = asyncio.run(use_lock())
    assert held is True
    assert token is not None
    assert held_after is False


def test_acquire_aio_returns_false_after_timeout(daemon):
    holder = Lock.from_name("aio-busy")
    holder.acquire()

    async def try_lock() -> bool:
        return await Lock.from_name("aio-busy").acquire.aio(timeout=0.1)

    assert asyncio.run(try_lock()) is False


def test_async_with_raises_lock_timeout_error(daemon):
    holder = Lock.from_name("aio-busy")
    holder.acquire()

    async def enter() -> None:
        async with Lock.from_name("aio-busy", timeout=0.1):
            pass

    with pytest.raises(LockTimeoutError):
        asyncio.run(enter())


def test_cancelled_acquire_aio_leaves_no_waiter(daemon):
    holder = Lock.from_name("cancel")
    holder.acquire()

    async def cancel_waiter() -> tuple[int, bool]:
        waiter = Lock.from_name("cancel")
        task = asyncio.create_task(waiter.acquire.aio())
        while waiter_count(daemon, "cancel") == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Checked while this loop's connection is open: closing it would drop any
        # waiter of its own accord.
        waiters = waiter_count(daemon, "cancel")
        await asyncio.to_thread(holder.release)
        return waiters, await waiter.locked.aio()

    waiters, held_after_release = asyncio.run(cancel_waiter())
    assert waiters == 0
    assert held_after_release is False


def test_cancel_racing_grant_leaves_lock_free(daemon):
    async def race() -> list[bool]:
        holder = Lock.from_name("race")
        waiter = Lock.from_name("race")
        still_held = []
        for _ in range(20):
            if not await holder.acquire.aio(blocking=False):
                still_held.append(True)  # a phantom from the last round holds it
                break
            task = asyncio.create_task(waiter.acquire.aio())
            while waiter_count(daemon, "race") == 0:
                await asyncio.sleep(0.005)
            # The grant to the waiter is under way when the cancellation arrives.
            await holder.release.aio()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            else:
                await waiter.release.aio()
            still_held.append(await holder.locked.aio())
        return still_held

    assert asyncio.run(race()) == [False] * 20


async def _await_directly(call: Any) -> Any:
    return await call


@pytest.mark.parametrize("wrap", [lambda call: call, _await_directly], ids=["task-of-call", "coroutine"])
def test_grant_unseen_by_cancelled_task_released(daemon, wrap):
    async def cancel_between_grant_and_step() -> None:
        lock = Lock.from_name("unseen")
        call = lock.acquire.aio()
        # This callback runs before the wake-up that the task registers later, so the
        # cancellation lands after the grant and before the task receives it.
        call.add_done_callback(lambda _: task.cancel())
        task = asyncio.create_task(wrap(call))
        with pytest.raises(asyncio.CancelledError):
            await task
        assert call.result() is True
        assert await lock.locked.aio() is False
        assert await Lock.from_name("unseen").acquire.aio(blocking=False) is True

    asyncio.run(cancel_between_grant_and_step())


def test_cancel_after_sending_task_ended_undoes_grant(daemon):
    async def cancel_with_outcome_queued() -> None:
        lock = Lock.from_name("queued-outcome")
        # The loop has no connection yet, so a task opens one and sends the acquire.
        call = lock.acquire.aio()
        sender = call._task
        assert sender is not None

        # Cancel once the task has ended but before the call has taken its result, the
        # order in which the loop may run the two callbacks.
        sender.remove_done_callback(call._task_done)
        sender.add_done_callback(lambda _: call.cancel())
        sender.add_done_callback(call._task_done)
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await lock.locked.aio() is False

    asyncio.run(cancel_with_outcome_queued())


def test_blocking_release_of_async_hold_raises(daemon):
    async def mix() -> None:
        lock = Lock.from_name("mixed")
        await lock.acquire.aio()
        with pytest.raises(InvalidError, match="acquired with `acquire.aio\\(\\)`"):
            await asyncio.to_thread(lock.release)
        await lock.release.aio()
        assert await lock.locked.aio() is False

    asyncio.run(mix())


def test_async_release_of_blocking_hold_raises(daemon):
    lock = Lock.from_name("mixed")
    lock.acquire()

    async def release() -> None:
        await lock.release.aio()

    with pytest.raises(InvalidError, match="acquired with the blocking `acquire\\(\\)`"):
        asyncio.run(release())
    lock.release()
    assert lock.locked() is False


# Status and arguments.


def test_status_lists_held_lock(daemon):
    lock = Lock.from_name("listed", lease=30)
    lock.acquire()
    entry = lock_entry(daemon, "listed")
    assert entry["holder_pid"] == os.getpid()
    assert entry["token"] == lock.token
    assert 0 < entry["lease_remaining"] <= 30


def test_status_command_shows_lock(daemon, capsys):
    lock = Lock.from_name("shown", lease=30)
    lock.acquire()
    assert cli.main(["status", "--socket", daemon.socket_path]) == 0
    assert "shown" in capsys.readouterr().out


def status_row(daemon: Any, capsys: pytest.CaptureFixture[str], name: str) -> dict[str, str]:
    """Return the cells of lock ``name`` in `sharedict status`, by column."""
    assert cli.main(["status", "--socket", daemon.socket_path]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Cells are separated by two or more spaces; a time has one space inside.
    header = re.split(r" {2,}", next(line for line in lines if line.startswith("name ")).strip())
    row = re.split(r" {2,}", next(line for line in lines if line.startswith(f"{name} ")).strip())
    return dict(zip(header, row))


def test_status_command_shows_no_lease(daemon, capsys):
    lock = Lock.from_name("unleased", lease=None)
    lock.acquire()
    row = status_row(daemon, capsys, "unleased")
    assert row["lease"] == "none"
    assert row["lease remaining"] == "none"


def test_status_command_shortens_huge_lease(daemon, capsys):
    lock = Lock.from_name("centuries", lease=1e300)
    lock.acquire()
    row = status_row(daemon, capsys, "centuries")
    assert row["lease"] == "1e+300 s"
    assert row["lease remaining"] == "1e+300 s"


@pytest.mark.parametrize("lease", [0, -1, float("nan"), float("inf"), True, 10**400])
def test_invalid_lease_raises(lease):
    with pytest.raises(InvalidError, match="lease="):
        Lock.from_name("bad", lease=lease)


def test_invalid_lock_name_raises():
    with pytest.raises(InvalidError, match="invalid lock name"):
        Lock.from_name("no spaces")


def test_timeout_with_nonblocking_raises(daemon):
    with pytest.raises(InvalidError, match="blocking=False"):
        Lock.from_name("args").acquire(timeout=1, blocking=False)
