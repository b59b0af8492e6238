"""Each operation written once, driving both the blocking call and its ``.aio`` twin.

An operation is a generator function. It yields a ``Request`` whenever it needs the
daemon and receives the result (or has the error thrown in); an iterating operation also
yields ``Item`` objects, which become the items its caller sees. The blocking driver
sends requests through a ``Client``'s blocking pool, the async driver through the event
loop's connection, and neither knows what the operation does.

    class Dict:
        @operation
        def get(self, key, default=None):
            found, value = yield Request(GET, self._id, encode_key(key)[0])
            return load_value(value) if found else default

    d.get("k")                 # blocking
    await d.get.aio("k")       # async
"""

from __future__ import annotations

import asyncio
import functools
import warnings
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any

from sharedict.api.errors import AsyncUsageWarning
from sharedict.api.transport import Client, Request

OperationBody = Generator[Any, Any, Any]


class Item:
    """An item that an iterating operation hands to its caller."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


_warned: set[str] = set()


def _warn_if_in_event_loop(name: str) -> None:
    if asyncio._get_running_loop() is None or name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"the blocking call {name}() blocks the running event loop; use `await {name}.aio(...)` "
        f"(or `async for ... in {name}.aio()` for iteration) instead",
        AsyncUsageWarning,
        stacklevel=3,
    )


def _client_of(instance: Any, kwargs: dict[str, Any]) -> Client:
    return kwargs.get("client") or getattr(instance, "_client", None) or Client.default()


def run_blocking(body: OperationBody, client: Client) -> Any:
    """Drive an operation to its end with blocking requests and return its result."""
    try:
        request = body.send(None)
        while True:
            try:
                result = client.call(request)
            except BaseException as exc:  # the operation decides what an error means
                request = body.throw(exc)
            else:
                request = body.send(result)
    except StopIteration as stop:
        return stop.value


async def run_async(body: OperationBody, client: Client) -> Any:
    """Drive an operation to its end with async requests and return its result."""
    from sharedict.api.aio import call_async

    try:
        request = body.send(None)
        while True:
            try:
                result = await call_async(client, request)
            except BaseException as exc:
                request = body.throw(exc)
            else:
                request = body.send(result)
    except StopIteration as stop:
        return stop.value


def iterate_blocking(body: OperationBody, client: Client) -> Iterator[Any]:
    """Drive an iterating operation, yielding its items; closing this closes the operation."""
    with _closing(body):
        step = body.send(None)
        while True:
            if isinstance(step, Item):
                yield step.value
                step = body.send(None)
                continue
            try:
                result = client.call(step)
            except BaseException as exc:
                step = body.throw(exc)
            else:
                step = body.send(result)


async def iterate_async(body: OperationBody, client: Client) -> AsyncIterator[Any]:
    from sharedict.api.aio import call_async

    with _closing(body):
        step = body.send(None)
        while True:
            if isinstance(step, Item):
                yield step.value
                step = body.send(None)
                continue
            try:
                result = await call_async(client, step)
            except BaseException as exc:
                step = body.throw(exc)
            else:
                step = body.send(result)


class _closing:
    """Close the operation when its driver stops, and end iteration at its return."""

    def __init__(self, body: OperationBody) -> None:
        self.body = body

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> bool:
        self.body.close()
        return kind is StopIteration


class BoundOperation:
    """An operation bound to its object: call it to block, or await ``.aio(...)``."""

    __slots__ = ("_function", "_instance", "_name")

    def __init__(self, function: Callable[..., OperationBody], instance: Any, name: str) -> None:
        self._function = function
        self._instance = instance
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _warn_if_in_event_loop(self._name)
        client = _client_of(self._instance, kwargs)
        return run_blocking(self._function(self._instance, *args, **kwargs), client)

    async def aio(self, *args: Any, **kwargs: Any) -> Any:
        client = _client_of(self._instance, kwargs)
        return await run_async(self._function(self._instance, *args, **kwargs), client)

    def __repr__(self) -> str:
        return f"<sharedict operation {self._name}>"


class BoundIteration(BoundOperation):
    """An iterating operation: call it for an iterator, or ``.aio()`` for an async iterator."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        _warn_if_in_event_loop(self._name)
        client = _client_of(self._instance, kwargs)
        return iterate_blocking(self._function(self._instance, *args, **kwargs), client)

    def aio(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        client = _client_of(self._instance, kwargs)
        return iterate_async(self._function(self._instance, *args, **kwargs), client)


class operation:  # noqa: N801 - used as a decorator, like property
    """Make a generator function an operation with a blocking form and an ``.aio`` form."""

    bound_class: type[BoundOperation] = BoundOperation

    def __init__(self, function: Callable[..., OperationBody]) -> None:
        self._function = function
        self._name = function.__name__
        functools.update_wrapper(self, function)  # type: ignore[arg-type]

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = f"{owner.__name__}.{name}"

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return self.bound_class(self._function, instance, self._name)


class iteration(operation):  # noqa: N801
    """Make a generator function an iterating operation, with an ``.aio()`` async iterator."""

    bound_class = BoundIteration
