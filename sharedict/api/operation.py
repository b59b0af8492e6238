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

A blocking call made inside a running event loop still works, but stalls the loop for
the time of its requests. Each operation warns about it once per process with an
``AsyncUsageWarning`` that names its ``.aio`` form; silence it with
``warnings.filterwarnings("ignore", category=sharedict.AsyncUsageWarning)``.
"""

from __future__ import annotations

import functools
import warnings
from asyncio import _get_running_loop  # unlike get_running_loop(), returns None outside a loop
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any

from sharedict.api.aio import call_async
from sharedict.api.errors import AsyncUsageWarning
from sharedict.api.transport import Client, Request

OperationBody = Generator[Any, Any, Any]


class Item:
    """An item that an iterating operation hands to its caller."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


# Names of the operations that have warned about a blocking call inside an event loop.
_warned: set[str] = set()


def _warn_if_in_event_loop(name: str, aio_form: str | None = None) -> None:
    """Warn, once per operation, when a blocking call runs inside an event loop.

    Call it from the ``__call__`` of a bound operation: the warning points at the line
    two frames up, the caller's.
    """
    if _get_running_loop() is None or name in _warned:
        return
    _warned.add(name)
    if aio_form is None:
        aio_form = f"await {name}.aio(...)"
    warnings.warn(
        f"{name}() blocks the running event loop until the daemon replies; use `{aio_form}` instead",
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


def iterate_blocking(body: OperationBody, client: Client) -> Iterator[Any]:
    """Drive an iterating operation, yielding its items; closing this closes the operation."""
    try:
        step = body.send(None)
        while True:
            if type(step) is Item:
                yield step.value
                step = body.send(None)
                continue
            try:
                result = client.call(step)
            except BaseException as exc:
                step = body.throw(exc)
            else:
                step = body.send(result)
    except StopIteration:
        return
    finally:
        body.close()


class AsyncItems:
    """The async iterator of an iterating operation, as ``d.items.aio()`` returns it.

    It sends the operation's next request only when its items run out, so nothing is in
    flight while the consumer works on an item. Leaving an ``async for`` early therefore
    needs no clean-up; ``aclose()`` ends the iteration at once.
    """

    __slots__ = ("_body", "_client", "_running")

    def __init__(self, body: OperationBody, client: Client) -> None:
        self._body: OperationBody | None = body
        self._client = client
        self._running = False

    def __aiter__(self) -> AsyncItems:
        return self

    async def __anext__(self) -> Any:
        body = self._body
        if body is None:
            raise StopAsyncIteration
        if self._running:
            raise RuntimeError("anext(): another task is already waiting for the next item of this iterator")

        self._running = True
        try:
            step = body.send(None)
            while type(step) is not Item:
                try:
                    result = await call_async(self._client, step)
                except BaseException as exc:
                    step = body.throw(exc)
                else:
                    step = body.send(result)
        except StopIteration:
            self._body = None
            raise StopAsyncIteration from None
        except BaseException:
            self._body = None  # the operation has ended with this error
            raise
        finally:
            self._running = False
        return step.value

    async def aclose(self) -> None:
        """End the iteration; later ``__anext__`` calls raise ``StopAsyncIteration``."""
        body, self._body = self._body, None
        if body is not None:
            body.close()


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
        """Run the operation on the running event loop's connection and return its result."""
        client = _client_of(self._instance, kwargs)
        body = self._function(self._instance, *args, **kwargs)

        # The same driver as run_blocking(), written out here so that a call creates no
        # second coroutine.
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

    def __repr__(self) -> str:
        return f"<sharedict operation {self._name}>"


class BoundIteration(BoundOperation):
    """An iterating operation: call it for an iterator, or ``.aio()`` for an async iterator."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        _warn_if_in_event_loop(self._name, f"async for ... in {self._name}.aio()")
        client = _client_of(self._instance, kwargs)
        return iterate_blocking(self._function(self._instance, *args, **kwargs), client)

    def aio(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        """Return an async iterator over the operation's items."""
        client = _client_of(self._instance, kwargs)
        return AsyncItems(self._function(self._instance, *args, **kwargs), client)


class operation:  # noqa: N801 - used as a decorator, like property
    """Make a generator function an operation with a blocking form and an ``.aio`` form.

    An operation assigned to a second name, as in ``__contains__ = contains``, keeps its
    first name, which is the one that warnings suggest.
    """

    bound_class: type[BoundOperation] = BoundOperation

    def __init__(self, function: Callable[..., OperationBody]) -> None:
        self._function = function
        self._name = function.__name__
        self._owner: type | None = None
        functools.update_wrapper(self, function)  # type: ignore[arg-type]

    def __set_name__(self, owner: type, name: str) -> None:
        if self._owner is None:
            self._owner = owner
            self._name = f"{owner.__name__}.{name}"

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return self.bound_class(self._function, instance, self._name)


class iteration(operation):  # noqa: N801
    """Make a generator function an iterating operation, with an ``.aio()`` async iterator."""

    bound_class = BoundIteration
