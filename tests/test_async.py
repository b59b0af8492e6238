"""The ``.aio`` API: parity with the blocking API, pipelining, cancellation, loops and threads.

Every test runs against a real daemon. ``asyncio.run`` gives each test a loop of its own,
so each test also checks that connections open and close with their loops.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import os
import random
import json
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import sharedict
from sharedict import (
    AlreadyExistsError,
    AsyncUsageWarning,
    ConnectionLostError,
    DaemonUnavailableError,
    Dict,
    Lock,
    NotFoundError,
)
from sharedict.api import aio, operation, protocol
from sharedict.api.config import Settings
from sharedict.api.dict import PAGE_SIZE
from sharedict.api.transport import Client, Request

WAIT_TIMEOUT = 30.0


@pytest.fixture
def kv(daemon) -> Dict:
    return Dict.from_name("kv", create_if_missing=True)


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which operations have warned, so that each test sees its first warning."""
    monkeypatch.setattr(operation, "_warned", set())


def wait_until(condition: Callable[[], bool], description: str) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_TIMEOUT} s waiting until {description}")
        time.sleep(0.01)


async def wait_until_async(condition: Callable[[], bool], description: str) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_TIMEOUT} s waiting until {description}")
        await asyncio.sleep(0)


def process_state(pid: int) -> str:
    """The state letter of a process in /proc, such as R, S or T (stopped)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def daemon_connections() -> int:
    """The number of connections the daemon serves, this status request's own included."""
    return Client.default().call(Request(protocol.STATUS))["connections"]


def settled_daemon_connections() -> int:
    """Wait until the daemon serves only the blocking connections of this process; return their number.

    The connections of the event loops of earlier tests close in the background, and
    the daemon may still count one of them for a moment.
    """
    client = Client.default()
    wait_until(lambda: daemon_connections() == len(client._idle), "the connections of earlier tests are closed")
    return len(client._idle)


# Parity: the same arguments give the same results, errors and stored state.

SEED = {"a": 1, "b": [2, 3]}

PARITY_CASES = [
    ("get", ("a",), {}),
    ("get", ("missing", "fallback"), {}),
    ("get", ([1, 2],), {}),
    ("__getitem__", ("b",), {}),
    ("__getitem__", ("missing",), {}),
    ("__contains__", ("a",), {}),
    ("contains", ("missing",), {}),
    ("len", (), {}),
    ("put", ("c", {"nested": (1, 2)}), {}),
    ("put", ("a", "other"), {"skip_if_exists": True}),
    ("put", ("new", "value"), {"skip_if_exists": True}),
    ("put", ("lock", threading.Lock()), {}),
    ("__setitem__", ("a", None), {}),
    ("update", ({"d": 4},), {"e": 5}),
    ("update", ([("f", 6), ("g", 7)],), {}),
    ("update", ([("f",)],), {}),
    ("pop", ("a",), {}),
    ("pop", ("missing", "fallback"), {}),
    ("pop", ("missing",), {}),
    ("__delitem__", ("b",), {}),
    ("__delitem__", ("missing",), {}),
    ("clear", (), {}),
]


def _outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        return ("returned", call())
    except Exception as exc:
        return ("raised", type(exc), str(exc))


def _seeded(name: str) -> Dict:
    handle = Dict.from_name(name, create_if_missing=True)
    handle.clear()
    handle.update(SEED)
    return handle


def test_aio_matches_blocking(daemon) -> None:
    for method, args, kwargs in PARITY_CASES:
        handle = _seeded("parity")
        with warnings.catch_warnings():
            # Outside an event loop, a blocking call has nothing to warn about.
            warnings.simplefilter("error", AsyncUsageWarning)
            blocking = _outcome(lambda: getattr(handle, method)(*args, **kwargs))
        blocking_state = list(handle.items())

        handle = _seeded("parity")
        awaited = _outcome(lambda: asyncio.run(getattr(handle, method).aio(*args, **kwargs)))
        awaited_state = list(handle.items())

        assert awaited == blocking, f"{method}{args} {kwargs}"
        assert awaited_state == blocking_state, f"{method}{args} {kwargs}"


OBJECTS_CASES = [
    ("create", ("existing",), {}),
    ("create", ("existing",), {"allow_existing": True}),
    ("create", ("bad name!",), {}),
    ("delete", ("absent",), {}),
    ("delete", ("absent",), {"allow_missing": True}),
    ("list", (), {"max_objects": -1}),
    ("list", (), {"created_before": "not a time"}),
    ("list", (), {"environment_name": "other"}),
]


def test_objects_aio_matches_blocking(daemon) -> None:
    Dict.objects.create("existing")
    for method, args, kwargs in OBJECTS_CASES:
        blocking = _outcome(lambda: getattr(Dict.objects, method)(*args, **kwargs))
        awaited = _outcome(lambda: asyncio.run(getattr(Dict.objects, method).aio(*args, **kwargs)))
        names = [handle.name for handle in Dict.objects.list()]

        assert awaited == blocking, f"objects.{method}{args} {kwargs}"
        assert names == ["existing"], f"objects.{method}{args} {kwargs}"


def test_missing_dict_raises_not_found(daemon) -> None:
    missing = Dict.from_name("absent")
    blocking = _outcome(lambda: missing.get("k"))
    awaited = _outcome(lambda: asyncio.run(missing.get.aio("k")))

    assert awaited[:2] == ("raised", NotFoundError)
    assert awaited == blocking


def test_info_and_hydrate_aio(daemon) -> None:
    handle = Dict.from_name("described", create_if_missing=True)

    async def main() -> tuple[Any, Any]:
        return await handle.hydrate.aio(), await handle.info.aio()

    hydrated, info = asyncio.run(main())
    assert hydrated is handle
    assert info == Dict.from_name("described").info()


def test_objects_aio(daemon) -> None:
    async def main() -> tuple[list[str], list[str]]:
        await Dict.objects.create.aio("first")
        await Dict.objects.create.aio("second")
        await Dict.objects.create.aio("second", allow_existing=True)
        with pytest.raises(AlreadyExistsError):
            await Dict.objects.create.aio("second")
        before = sorted(handle.name for handle in await Dict.objects.list.aio())

        await Dict.objects.delete.aio("first")
        await Dict.objects.delete.aio("first", allow_missing=True)
        with pytest.raises(NotFoundError):
            await Dict.objects.delete.aio("first")
        return before, [handle.name for handle in await Dict.objects.list.aio(max_objects=5)]

    before, after = asyncio.run(main())
    assert before == ["first", "second"]
    assert after == ["second"]


def test_ephemeral_async_with(daemon) -> None:
    async def main() -> tuple[list[Any], Dict]:
        async with Dict.ephemeral() as tmp:
            await tmp.update.aio({"a": 1})
            items = [item async for item in tmp.items.aio()]
        return items, tmp

    items, tmp = asyncio.run(main())
    assert items == [("a", 1)]
    with pytest.raises(NotFoundError):
        tmp.len()


def test_async_iterators_match_blocking(kv: Dict) -> None:
    kv.update({f"key-{i}": i for i in range(50)})
    kv["key-0"] = "overwritten"

    async def main() -> tuple[list[Any], ...]:
        keys = [key async for key in kv.keys.aio()]
        values = [value async for value in kv.values.aio()]
        items = [item async for item in kv.items.aio()]
        return keys, values, items

    keys, values, items = asyncio.run(main())
    assert keys == list(kv.keys())
    assert values == list(kv.values())
    assert items == list(kv.items())


# Pipelining: many requests on one connection, each with its own reply.


def test_gather_10000_gets_return_own_values(kv: Dict) -> None:
    count = 10_000
    kv.update({f"key-{i}": f"value-{i}" for i in range(count)})
    order = list(range(count))
    random.Random(7).shuffle(order)

    async def main() -> list[Any]:
        return await asyncio.gather(*(kv.get.aio(f"key-{i}") for i in order))

    values = asyncio.run(main())
    assert len(values) == count
    for i, value in zip(order, values):
        assert value == f"value-{i}", f"get.aio('key-{i}') returned {value!r}"


def test_replies_out_of_order_never_cross(kv: Dict) -> None:
    kv.update({f"old-{i}": i for i in range(500)})

    async def main() -> list[Any]:
        calls = []
        for i in range(500):
            # Writes wait for the group commit and reads do not, so replies come back
            # in another order than the requests went out.
            calls.append(kv.put.aio(f"new-{i}", -i))
            calls.append(kv.get.aio(f"old-{i}"))
        return await asyncio.gather(*calls)

    results = asyncio.run(main())
    for i in range(500):
        assert results[2 * i] is True, f"put.aio('new-{i}') returned {results[2 * i]!r}"
        assert results[2 * i + 1] == i, f"get.aio('old-{i}') returned {results[2 * i + 1]!r}"
    assert kv["new-499"] == -499


def test_large_values_among_small_ones(kv: Dict) -> None:
    large = os.urandom(8 << 20)

    async def main() -> list[Any]:
        await kv.put.aio("large", large)
        # The large reply spans many reads of the socket, between small replies.
        return await asyncio.gather(*(kv.get.aio("large" if i % 10 == 0 else "small", i) for i in range(50)))

    values = asyncio.run(main())
    for i, value in enumerate(values):
        expected = large if i % 10 == 0 else i
        assert value == expected, f"call {i} returned another call's value"


def test_one_connection_per_loop(kv: Dict) -> None:
    kv["k"] = "v"
    baseline = settled_daemon_connections()

    async def main() -> int:
        await asyncio.gather(*(kv.get.aio("k") for _ in range(1000)))
        return await asyncio.get_running_loop().run_in_executor(None, daemon_connections)

    assert asyncio.run(main()) == baseline + 1


def test_no_daemon_raises_daemon_unavailable(tmp_path) -> None:
    settings = Settings(socket_path=str(tmp_path / "absent.sock"), data_dir=str(tmp_path / "data"), autostart=False)
    handle = Dict.from_name("kv", client=Client(settings))
    blocking = _outcome(lambda: handle.get("k"))
    awaited = _outcome(lambda: asyncio.run(handle.get.aio("k")))

    assert awaited[:2] == ("raised", DaemonUnavailableError)
    assert awaited == blocking


# Cancellation: the connection stays usable and no call reads another call's reply.


def test_caller_cancelled_while_connecting_leaves_others(kv: Dict) -> None:
    kv["k"] = "v"

    async def main() -> list[Any]:
        tasks = [asyncio.create_task(kv.get.aio("k")) for _ in range(20)]
        await asyncio.sleep(0)  # every task now waits for the connection being opened
        tasks[0].cancel()
        return await asyncio.gather(*tasks[1:])

    assert asyncio.run(main()) == ["v"] * 19



async def _check_own_values(handle: Dict, count: int) -> None:
    values = await asyncio.gather(*(handle.get.aio(f"key-{i}") for i in range(count)))
    for i, value in enumerate(values):
        assert value == i, f"get.aio('key-{i}') returned {value!r} after cancellations"


def test_wait_for_tiny_timeouts_leave_connection_usable(kv: Dict) -> None:
    kv.update({f"key-{i}": i for i in range(1000)})
    # None lets some calls finish while the calls around them time out.
    timeouts = [0, 1e-6, 1e-5, 1e-4, 1e-3, None]

    async def main() -> tuple[int, int]:
        timed_out = 0
        for round_ in range(20):
            calls = [
                asyncio.wait_for(kv.get.aio(f"key-{i}"), timeout=timeouts[(i + round_) % len(timeouts)])
                for i in range(100)
            ]
            for i, result in enumerate(await asyncio.gather(*calls, return_exceptions=True)):
                if isinstance(result, asyncio.TimeoutError):
                    timed_out += 1
                else:
                    assert result == i, f"get.aio('key-{i}') returned {result!r} among timed-out calls"
        await _check_own_values(kv, 1000)
        await wait_until_async(lambda: aio.in_flight(Client.default()) == 0, "no request is in flight")
        return timed_out, aio.in_flight(Client.default())

    timed_out, in_flight = asyncio.run(main())
    assert timed_out > 0
    assert in_flight == 0


def test_task_cancel_leaves_connection_usable(kv: Dict) -> None:
    kv.update({f"key-{i}": i for i in range(1000)})

    async def main() -> int:
        client = Client.default()
        await kv.get.aio("key-0")  # opens the connection
        cancelled = 0
        for steps in range(4):
            tasks = [asyncio.create_task(kv.get.aio(f"key-{i}")) for i in range(200)]
            if steps == 3:
                # Cancel calls whose requests are written, so their replies still arrive.
                await wait_until_async(lambda: aio.in_flight(client) > 100, "most requests are written")
            for _ in range(steps):
                await asyncio.sleep(0)
            for task in tasks[::2]:
                task.cancel()
            for i, result in enumerate(await asyncio.gather(*tasks, return_exceptions=True)):
                if isinstance(result, asyncio.CancelledError):
                    cancelled += 1
                else:
                    assert result == i, f"get.aio('key-{i}') returned {result!r} among cancelled calls"
        await _check_own_values(kv, 1000)
        return cancelled

    assert asyncio.run(main()) > 0


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.TaskGroup is new in Python 3.11")
def test_failed_task_group_leaves_connection_usable(kv: Dict) -> None:
    kv.update({f"key-{i}": i for i in range(1000)})

    class Boom(Exception):
        pass

    async def fail_soon() -> None:
        await kv.get.aio("key-0")
        raise Boom

    async def main() -> None:
        with pytest.raises(ExceptionGroup) as failure:  # noqa: F821 - a builtin since 3.11
            async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined]
                for i in range(500):
                    group.create_task(kv.get.aio(f"key-{i}"))
                    group.create_task(kv.put.aio(f"written-{i}", i))
                group.create_task(fail_soon())
        assert failure.group_contains(Boom)
        await _check_own_values(kv, 1000)

    asyncio.run(main())


def test_cancelled_writes_are_all_or_nothing(kv: Dict) -> None:
    groups, size = 200, 5
    kv.update({f"group-{g}-{j}": "old" for g in range(groups) for j in range(size)})

    async def main() -> None:
        calls = []
        for g in range(groups):
            write = kv.update.aio({f"group-{g}-{j}": f"new-{g}" for j in range(size)})
            calls.append(asyncio.wait_for(write, timeout=[0, 1e-5, 1e-4, 1e-3, 1e-2][g % 5]))
        await asyncio.gather(*calls, return_exceptions=True)
        # The daemon applies one connection's writes in order, so once this write is
        # answered, every cancelled write that went out has landed.
        await kv.put.aio("barrier", True)

    asyncio.run(main())
    stored = dict(kv.items())
    outcomes = set()
    for g in range(groups):
        values = {stored[f"group-{g}-{j}"] for j in range(size)}
        assert values in ({"old"}, {f"new-{g}"}), f"group {g} was written in part: {values}"
        outcomes.add(values.pop() == "old")
    assert outcomes, "no group was checked"


def test_cancelled_put_then_get_reads_its_own_reply(kv: Dict) -> None:
    kv["stable"] = "stable"

    async def main() -> list[Any]:
        results = []
        for i in range(200):
            task = asyncio.create_task(kv.put.aio(f"p-{i}", i))
            await asyncio.sleep(0)
            task.cancel()
            results.append(await kv.get.aio("stable"))
        return results

    assert asyncio.run(main()) == ["stable"] * 200
    stored = dict(kv.items())
    for i in range(200):
        assert stored.get(f"p-{i}", i) == i, f"cancelled put of p-{i} stored {stored[f'p-{i}']!r}"


# The awaitable that .aio() returns inside a running loop.

_CALLER_VALUE: contextvars.ContextVar[str] = contextvars.ContextVar("caller_value", default="unset")


def _read_caller_value() -> str:
    return _CALLER_VALUE.get()


class ReadsContextWhenLoaded:
    """A value that unpickles as the caller's value of ``_CALLER_VALUE``."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _read_caller_value, ()


AWAITING_FORMS: dict[str, Callable[[Any], Any]] = {
    "await": lambda call: call,
    "gather": lambda call: asyncio.gather(call),
    "create_task": lambda call: asyncio.create_task(call),
    "ensure_future": lambda call: asyncio.ensure_future(call),
    "wait_for": lambda call: asyncio.wait_for(call, timeout=WAIT_TIMEOUT),
    "shield": lambda call: asyncio.shield(call),
}


@pytest.mark.parametrize("form", AWAITING_FORMS)
def test_aio_call_in_every_awaiting_form(kv: Dict, form: str) -> None:
    kv["k"] = "v"

    async def main() -> Any:
        return await AWAITING_FORMS[form](kv.get.aio("k"))

    result = asyncio.run(main())
    expected = ["v"] if form == "gather" else "v"
    assert result == expected


def test_aio_call_runs_without_await(kv: Dict) -> None:
    async def main() -> None:
        kv.put.aio("unawaited", 1)
        # The daemon applies one connection's requests in order.
        await kv.put.aio("barrier", True)

    asyncio.run(main())
    assert kv.get("unawaited") == 1


def test_aio_call_runs_in_callers_context(kv: Dict) -> None:
    kv["k"] = ReadsContextWhenLoaded()

    async def read_as(name: str) -> list[Any]:
        _CALLER_VALUE.set(name)
        return await asyncio.gather(kv.get.aio("k"), kv.get.aio("k"))

    async def main() -> list[Any]:
        return await asyncio.gather(read_as("first"), read_as("second"))

    assert asyncio.run(main()) == [["first", "first"], ["second", "second"]]


def test_aio_call_pending_at_loop_end_is_cancelled(daemon, kv: Dict, caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    async def main() -> None:
        await kv.get.aio("k")  # opens the connection
        # A stopped daemon sends no reply, so the loop ends while the call is in flight.
        os.kill(daemon.process.pid, signal.SIGSTOP)
        wait_until(lambda: process_state(daemon.process.pid) == "T", "the daemon is stopped")
        calls.append(asyncio.ensure_future(kv.get.aio("k")))

    try:
        with caplog.at_level("ERROR", logger="asyncio"):
            asyncio.run(main())
            gc.collect()
    finally:
        os.kill(daemon.process.pid, signal.SIGCONT)

    assert calls[0].cancelled()
    assert [record.getMessage() for record in caplog.records] == []


# Event loops and threads.


def test_handle_made_outside_loop_works_in_two_runs(kv: Dict) -> None:
    baseline = settled_daemon_connections()

    async def write_then_read(value: int) -> Any:
        await kv.put.aio("k", value)
        return await kv.get.aio("k")

    first = asyncio.run(write_then_read(1))
    second = asyncio.run(write_then_read(2))

    assert (first, second) == (1, 2)
    # Each loop closed its connection when it shut down.
    wait_until(lambda: daemon_connections() == baseline, "the connections of the finished loops are closed")


def test_loop_closed_without_shutdown_releases_its_connection(kv: Dict) -> None:
    baseline = settled_daemon_connections()
    loop = asyncio.new_event_loop()
    loop.run_until_complete(kv.put.aio("k", 1))
    loop.close()
    assert daemon_connections() == baseline + 1

    # The transport of that connection cannot run its close on the closed loop, so asyncio
    # warns about it when the garbage collector frees it: let that happen here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        assert asyncio.run(kv.get.aio("k")) == 1
        wait_until(lambda: daemon_connections() == baseline, "the closed loop's connection is closed")
        del loop
        gc.collect()


def test_threads_with_own_loops_at_once(kv: Dict) -> None:
    thread_count, calls = 4, 300
    barrier = threading.Barrier(thread_count)
    errors: list[BaseException] = []

    async def work(thread: int) -> None:
        await asyncio.gather(*(kv.put.aio(f"t{thread}-{i}", (thread, i)) for i in range(calls)))
        values = await asyncio.gather(*(kv.get.aio(f"t{thread}-{i}") for i in range(calls)))
        for i, value in enumerate(values):
            assert value == (thread, i), f"thread {thread} read {value!r} for t{thread}-{i}"

    def run(thread: int) -> None:
        try:
            barrier.wait()
            asyncio.run(work(thread))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(thread_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert kv.len() == thread_count * calls


def test_blocking_and_async_in_one_program(kv: Dict) -> None:
    kv["from-blocking"] = 1

    async def main() -> tuple[Any, Any]:
        await kv.put.aio("from-async", 2)
        # Blocking calls belong in executor threads, which run no event loop.
        loop = asyncio.get_running_loop()
        blocking, awaited = await asyncio.gather(
            loop.run_in_executor(None, kv.get, "from-async"),
            kv.get.aio("from-blocking"),
        )
        return blocking, awaited

    with warnings.catch_warnings():
        warnings.simplefilter("error", AsyncUsageWarning)
        assert asyncio.run(main()) == (2, 1)
    assert kv["from-async"] == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_leaves_parent_connection_alone(daemon) -> None:
    client = daemon.client()
    handle = Dict.from_name("kv", create_if_missing=True, client=client)
    handle["k"] = "parent"
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(handle.get.aio("k")) == "parent"

        pid = os.fork()
        if pid == 0:  # the child: a loop of its own, and a connection of its own
            status = 1
            try:
                if asyncio.run(handle.put.aio("k", "child")) is True:
                    status = 0
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)

        assert os.waitstatus_to_exitcode(status) == 0
        assert loop.run_until_complete(handle.get.aio("k")) == "child"
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# Async iteration.


def test_async_iteration_streams_pages(kv: Dict) -> None:
    count = 2 * PAGE_SIZE + 500
    kv.update({f"key-{i}": i for i in range(count)})

    async def main() -> list[Any]:
        keys = []
        async for key in kv.keys.aio():
            if not keys:
                # The later pages are fetched as the iteration reaches them, so an entry
                # appended now is among them.
                await kv.put.aio("appended", -1)
            keys.append(key)
        return keys

    keys = asyncio.run(main())
    assert keys == [f"key-{i}" for i in range(count)] + ["appended"]


def test_async_iteration_break_leaves_connection_clean(kv: Dict) -> None:
    count = 2 * PAGE_SIZE
    kv.update({f"key-{i}": i for i in range(count)})

    async def main() -> tuple[int, int, int]:
        seen = 0
        async for _ in kv.items.aio():
            seen += 1
            if seen == 10:
                break
        gc.collect()
        await asyncio.sleep(0)
        in_flight = aio.in_flight(Client.default())
        await _check_own_values(kv, count)
        return seen, in_flight, await kv.len.aio()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen, in_flight, length = asyncio.run(main())
        gc.collect()

    assert seen == 10
    assert in_flight == 0
    assert length == count
    assert [str(warning.message) for warning in caught] == []


def test_awaited_async_iterator_names_async_for(kv: Dict) -> None:
    async def main() -> None:
        await kv.items.aio()

    with pytest.raises(TypeError, match="async for"):
        asyncio.run(main())


def test_async_iterator_in_for_names_async_for(kv: Dict) -> None:
    with pytest.raises(TypeError, match=r"async for item in d\.keys\.aio\(\)"):
        list(kv.keys.aio())


def test_unawaited_aio_warning_names_operation(kv: Dict) -> None:
    with pytest.warns(RuntimeWarning, match="coroutine 'Dict.get.aio' was never awaited"):
        kv.get.aio("key")  # outside a running loop: a coroutine, dropped at once
        gc.collect()


def test_async_iterator_aclose_ends_iteration(kv: Dict) -> None:
    kv.update({"a": 1, "b": 2})

    async def main() -> tuple[Any, list[Any]]:
        iterator = kv.keys.aio()
        first = await iterator.__anext__()
        await iterator.aclose()
        return first, [key async for key in iterator]

    assert asyncio.run(main()) == ("a", [])


# A blocking call inside a running event loop.


def test_blocking_call_in_loop_warns_once(kv: Dict, fresh_warnings: None) -> None:
    async def main() -> list[Any]:
        kv.put("k", 1)
        return [kv.get("k"), kv.get("k")]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert asyncio.run(main()) == [1, 1]

    get_warnings = [w for w in caught if issubclass(w.category, AsyncUsageWarning) and "Dict.get" in str(w.message)]
    assert len(get_warnings) == 1
    assert "await Dict.get.aio(...)" in str(get_warnings[0].message)
    assert get_warnings[0].filename == __file__


def test_blocking_operator_in_loop_names_aio_form(kv: Dict, fresh_warnings: None) -> None:
    kv["k"] = 1

    async def main() -> tuple[Any, bool]:
        return kv["k"], "k" in kv

    with pytest.warns(AsyncUsageWarning) as caught:
        assert asyncio.run(main()) == (1, True)

    messages = [str(warning.message) for warning in caught]
    assert any("await Dict.__getitem__.aio(...)" in message for message in messages)
    assert any("await Dict.contains.aio(...)" in message for message in messages)


def test_blocking_iteration_in_loop_names_async_for(kv: Dict, fresh_warnings: None) -> None:
    kv["k"] = 1

    async def main() -> list[Any]:
        return list(kv.keys())

    with pytest.warns(AsyncUsageWarning, match=r"async for \.\.\. in Dict\.keys\.aio\(\)"):
        assert asyncio.run(main()) == ["k"]


@pytest.mark.parametrize(
    ("manager", "blocking_form", "aio_form"),
    [
        (Dict.ephemeral, "`with Dict.ephemeral()`", "async with Dict.ephemeral() as d"),
        (lambda: Lock.from_name("with-in-loop"), "`with lock`", "async with lock"),
    ],
    ids=["ephemeral", "lock"],
)
def test_blocking_with_in_loop_names_async_with(
    daemon, fresh_warnings: None, manager: Callable[[], Any], blocking_form: str, aio_form: str
) -> None:
    async def main() -> None:
        with manager():
            pass

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())

    # One warning on entry and one on exit, both at the with statement.
    expected = f"{blocking_form} blocks the running event loop until the daemon replies; use `{aio_form}` instead"
    assert [str(warning.message) for warning in caught] == [expected, expected]
    assert {warning.filename for warning in caught} == {__file__}


def test_blocking_manager_call_in_loop_names_dict_objects(daemon, fresh_warnings: None) -> None:
    async def main() -> None:
        Dict.objects.list()

    with pytest.warns(AsyncUsageWarning, match=r"Dict\.objects\.list\(\) blocks .* `await Dict\.objects\.list\.aio\(\.\.\.\)`"):
        asyncio.run(main())


def test_async_usage_warning_is_exported() -> None:
    assert issubclass(sharedict.AsyncUsageWarning, UserWarning)


# Restarts and broken connections.


@pytest.mark.parametrize("crash", [False, True], ids=["stop", "crash"])
@pytest.mark.parametrize("second", ["read", "write"])
def test_daemon_restart_between_awaited_calls(daemon, kv: Dict, crash: bool, second: str) -> None:
    async def main() -> Any:
        await kv.put.aio("before", 1)
        daemon.restart(crash=crash)
        if second == "read":
            return await kv.get.aio("before")
        return await kv.put.aio("after", 2)

    result = asyncio.run(main())
    expected = 1 if second == "read" else True
    assert result == expected
    assert kv.get("after", 2) == 2


def test_broken_connection_fails_writes_and_retries_reads(daemon, kv: Dict) -> None:
    kv["read"] = "value"

    async def main() -> tuple[list[Any], list[Any]]:
        client = Client.default()
        await kv.get.aio("read")  # opens the connection
        # A stopped daemon reads nothing, so every request below is written but unanswered.
        os.kill(daemon.process.pid, signal.SIGSTOP)
        wait_until(lambda: process_state(daemon.process.pid) == "T", "the daemon is stopped")
        writes = [asyncio.create_task(kv.put.aio(f"w-{i}", i)) for i in range(10)]
        reads = [asyncio.create_task(kv.get.aio("read")) for _ in range(10)]
        await wait_until_async(lambda: aio.in_flight(client) == 20, "all 20 requests are written")

        daemon.kill()
        daemon.start()
        write_results = await asyncio.gather(*writes, return_exceptions=True)
        read_results = await asyncio.gather(*reads, return_exceptions=True)
        return write_results, read_results

    write_results, read_results = asyncio.run(main())
    assert all(isinstance(result, ConnectionLostError) for result in write_results), write_results
    assert all(str(result).startswith(f"dict {kv.name!r}: the connection") for result in write_results), write_results
    assert read_results == ["value"] * 10
    assert [key for key in kv.keys() if key.startswith("w-")] == []


async def _put_in_dict_made_on_first_use() -> Any:
    return await Dict.from_name("made-on-first-use", create_if_missing=True).put.aio("key", "value")


async def _put_in_ephemeral_dict() -> Any:
    async with Dict.ephemeral() as scratch:
        await scratch.put.aio("key", "value")
        return await scratch.get.aio("key")


@pytest.mark.parametrize(
    ("create_op", "scenario", "expected"),
    [
        (protocol.DICT_CREATE, _put_in_dict_made_on_first_use, True),
        (protocol.DICT_EPHEMERAL, _put_in_ephemeral_dict, "value"),
    ],
)
def test_lost_create_sent_again(
    daemon, monkeypatch: pytest.MonkeyPatch, create_op: str, scenario: Callable[[], Any], expected: Any
) -> None:
    send = aio.AsyncConnection.send
    stopped: list[int] = []

    def stop_daemon_before_create(conn: aio.AsyncConnection, request: Request, receiver: Any) -> int:
        # Any lookup before the create gets its reply. The first create gets none, and
        # the create sent again reaches the restarted daemon.
        if request.op == create_op and not stopped:
            stopped.append(daemon.process.pid)
            os.kill(daemon.process.pid, signal.SIGSTOP)
            wait_until(lambda: process_state(daemon.process.pid) == "T", "the daemon is stopped")
        return send(conn, request, receiver)

    monkeypatch.setattr(aio.AsyncConnection, "send", stop_daemon_before_create)

    async def main() -> Any:
        client = Client.default()
        call = asyncio.ensure_future(scenario())
        await wait_until_async(lambda: process_state(daemon.process.pid) == "T", "the create stops the daemon")
        await wait_until_async(lambda: aio.in_flight(client) == 1, "the create request is written")

        daemon.kill()
        daemon.start()
        return await call

    assert asyncio.run(main()) == expected


# The benchmark program.


def test_benchmark_runs_and_writes_json(tmp_path: Path) -> None:
    repository = Path(__file__).resolve().parent.parent
    json_path = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_async", "--gets", "200", "--rounds", "1"]
        + ["--json", str(json_path), "--tmp-dir", str(tmp_path)],
        cwd=repository,
        env={**os.environ, "PYTHONPATH": str(repository)},
        capture_output=True,
        text=True,
        timeout=300,
    )

    # The goal decides between 0 and 1; a tiny run proves nothing about speed.
    assert completed.returncode in (0, 1), completed.stderr
    results = json.loads(json_path.read_text())
    assert results["gathered_aio"]["ops_per_second_median"] > 0
    assert results["blocking"]["ops_per_second_median"] > 0
    assert results["ratio"] > 0
    assert results["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert results["commit"] is not None
