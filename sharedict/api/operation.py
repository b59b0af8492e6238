"""Each operation written once, driving both the blocking call and its ``.aio`` twin.

An operation is a generator function. It yields a ``Request`` whenever it needs the
daemon and receives the result (or has the error thrown in); an iterating operation also
yields ``Items``, a batch of the items that its caller iterates over, with the read to
send meanwhile.

The blocking driver sends requests through a ``Client``'s blocking pool, the async driver
through the event loop's connection, and neither depends on what the operation does.

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

import asyncio
import contextlib
import functools
import inspect
import sys
import warnings
from asyncio import _get_running_loop  # unlike get_running_loop(), returns None outside a loop
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator
from typing import Any

from sharedict.api.aio import call_async
from sharedict.api.async_call import AsyncCall
from sharedict.api.errors import AsyncUsageWarning
from sharedict.api.transport import Client, PendingRead, Request, check_client

OperationBody = Generator[Any, Any, Any]

_NO_ITEM = object()


class Items:
    """A batch of items that an iterating operation hands to its caller.

    ``items`` is an iterable, read lazily, so an item that fails to decode raises when
    the caller reaches it. ``prefetch`` is a read that the driver sends before it hands
    out the items, so that the daemon works on it while the caller works through them.
    After the last item the operation receives the result of ``prefetch``, or has its
    error thrown in, or receives None when there is no ``prefetch``. At most one read is
    sent ahead at a time, so an operation that reads pages keeps at most two in memory.
    """

    __slots__ = ("items", "prefetch")

    def __init__(self, items: Iterable[Any], prefetch: Request | None = None) -> None:
        self.items = items
        self.prefetch = prefetch


# Names of the operations that have warned about a blocking call inside an event loop.
_warned: set[str] = set()


def _warn_if_in_event_loop(name: str, aio_form: str | None = None, blocking_form: str | None = None) -> None:
    """Warn, once per operation, when a blocking call runs inside an event loop.

    Call it from the ``__call__`` of a bound operation, or from the ``__enter__`` or
    ``__exit__`` that calls the operation: the warning points at the line two frames
    up, the caller's. ``blocking_form`` names what the caller wrote, such as a ``with``
    statement, when that is not a call of the operation.
    """
    if _get_running_loop() is None or name in _warned:
        return
    _warned.add(name)
    if aio_form is None:
        aio_form = f"await {name}.aio(...)"
    if blocking_form is None:
        blocking_form = f"{name}()"
    warnings.warn(
        f"{blocking_form} blocks the running event loop until the daemon replies; use `{aio_form}` instead",
        AsyncUsageWarning,
        stacklevel=3,
    )


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
    prefetch: PendingRead | None = None
    try:
        step = body.send(None)
        while True:
            if type(step) is not Items:
                try:
                    result = client.call(step)
                except BaseException as exc:
                    step = body.throw(exc)
                else:
                    step = body.send(result)
                continue

            if step.prefetch is not None:
                prefetch = client.start(step.prefetch)
            yield from step.items
            if prefetch is None:
                step = body.send(None)
                continue
            pending, prefetch = prefetch, None
            try:
                result = pending.result()
            except BaseException as exc:
                step = body.throw(exc)
            else:
                step = body.send(result)
    except StopIteration:
        return
    finally:
        if prefetch is not None:
            # The caller stopped early, or an item failed: the read sent ahead is not needed.
            prefetch.cancel()
        body.close()


class AsyncItems:
    """The async iterator of an iterating operation, as ``d.items.aio()`` returns it.

    The read that a batch of items sends ahead runs as a task of the event loop, so it
    goes out once the consumer awaits something. Leaving an ``async for`` early cancels
    that task when the iterator is freed, and ``aclose()`` cancels it and ends the
    iteration at once; the reply is dropped when it arrives.
    """

    __slots__ = ("_body", "_client", "_method", "_running", "_items", "_prefetch")

    def __init__(self, body: OperationBody, client: Client, name: str) -> None:
        self._body: OperationBody | None = body
        self._client = client
        self._method = name.rpartition(".")[2]  # "keys" of "Dict.keys", for messages
        self._running = False
        self._items: Iterator[Any] | None = None
        self._prefetch: asyncio.Task[Any] | None = None

    def __aiter__(self) -> AsyncItems:
        return self

    def __await__(self) -> Generator[Any, None, Any]:
        # Awaiting an iterator is a common slip; without this, Python's message names
        # neither the iterator nor the fix.
        method = self._method
        raise TypeError(
            f"an async iterator of a dict is not awaitable; iterate it with `async for item in d.{method}.aio()`, "
            f"or collect it with `[item async for item in d.{method}.aio()]`"
        )

    def __iter__(self) -> Iterator[Any]:
        # The same slip with a plain for loop, or list().
        method = self._method
        raise TypeError(
            f"an async iterator of a dict cannot be iterated with `for`; use `async for item in d.{method}.aio()` "
            f"in async code, or `for item in d.{method}()` in blocking code"
        )

    async def __anext__(self) -> Any:
        body = self._body
        if body is None:
            raise StopAsyncIteration
        if self._running:
            raise RuntimeError("anext(): another task is already waiting for the next item of this iterator")

        self._running = True
        try:
            while True:
                if self._items is not None:
                    item = next(self._items, _NO_ITEM)
                    if item is not _NO_ITEM:
                        return item
                    self._items = None
                    prefetch, self._prefetch = self._prefetch, None
                    if prefetch is None:
                        step = body.send(None)
                    else:
                        try:
                            result = await prefetch
                        except BaseException as exc:
                            step = body.throw(exc)
                        else:
                            step = body.send(result)
                else:
                    step = body.send(None)

                while type(step) is not Items:
                    try:
                        result = await call_async(self._client, step)
                    except BaseException as exc:
                        step = body.throw(exc)
                    else:
                        step = body.send(result)
                if step.prefetch is not None:
                    self._prefetch = asyncio.get_running_loop().create_task(call_async(self._client, step.prefetch))
                self._items = iter(step.items)
        except StopIteration:
            self._end()
            raise StopAsyncIteration from None
        except BaseException:
            self._end()  # the operation has ended with this error
            raise
        finally:
            self._running = False

    def _end(self) -> None:
        self._body = None
        self._items = None
        self._cancel_prefetch()

    def _cancel_prefetch(self) -> None:
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is None:
            return
        if not prefetch.done():
            loop = prefetch.get_loop()
            if loop.is_closed():
                return
            if _get_running_loop() is loop:
                prefetch.cancel()
            else:
                # The garbage collector may free the iterator on another thread, while the
                # loop closes.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(prefetch.cancel)
        elif not prefetch.cancelled():
            prefetch.exception()  # retrieved, so that asyncio does not log an error that no caller awaits

    async def aclose(self) -> None:
        """End the iteration; later ``__anext__`` calls raise ``StopAsyncIteration``."""
        body, self._body = self._body, None
        self._items = None
        self._cancel_prefetch()
        if body is not None:
            body.close()

    def __del__(self) -> None:
        self._cancel_prefetch()


class BoundOperation:
    """An operation bound to its object: call it to block, or await ``.aio(...)``."""

    __slots__ = ("_function", "_instance", "_name", "_client_position")

    def __init__(
        self, function: Callable[..., OperationBody], instance: Any, name: str, client_position: int | None
    ) -> None:
        self._function = function
        self._instance = instance
        self._name = name
        self._client_position = client_position

    def _client_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Client:
        """Return the client that the call names, else the object's, else the default one."""
        position = self._client_position
        if position is not None:
            # Only an operation with a ``client`` parameter reads one: to update() or
            # put(), ``client`` is a key like any other.
            client = check_client(args[position] if position < len(args) else kwargs.get("client"))
            if client is not None:
                return client
        return getattr(self._instance, "_client", None) or Client.default()

    # The methods below take ``self`` positionally only, so that a keyword named
    # ``self``, as in ``d.update(self=1)``, reaches the operation.

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        _warn_if_in_event_loop(self._name)
        client = self._client_of(args, kwargs)
        return run_blocking(self._function(self._instance, *args, **kwargs), client)

    def aio(self, /, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        """Return an awaitable that runs the operation on the event loop's connection.

        Inside a running event loop it is an ``AsyncCall``, which starts at once and which
        ``asyncio.gather`` runs without a task per call. Outside one, as in
        ``asyncio.run(d.get.aio(key))``, it is a coroutine, the only awaitable that
        ``asyncio.run()`` takes.
        """
        loop = _get_running_loop()
        if loop is None:
            coroutine = self._run_async(*args, **kwargs)
            # Python's warning about a coroutine that is never awaited names it by this.
            coroutine.__qualname__ = f"{self._name}.aio"
            return coroutine
        client = self._client_of(args, kwargs)
        return AsyncCall(loop, client, self._function(self._instance, *args, **kwargs))

    async def _run_async(self, /, *args: Any, **kwargs: Any) -> Any:
        client = self._client_of(args, kwargs)
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

    def __call__(self, /, *args: Any, **kwargs: Any) -> Iterator[Any]:
        _warn_if_in_event_loop(self._name, f"async for ... in {self._name}.aio()")
        client = self._client_of(args, kwargs)
        return iterate_blocking(self._function(self._instance, *args, **kwargs), client)

    def aio(self, /, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        """Return an async iterator over the operation's items."""
        client = self._client_of(args, kwargs)
        return AsyncItems(self._function(self._instance, *args, **kwargs), client, self._name)


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
        self._client_position = _client_position(function)
        functools.update_wrapper(self, function)  # type: ignore[arg-type]

    def __set_name__(self, owner: type, name: str) -> None:
        if self._owner is None:
            self._owner = owner
            # Messages name the operation as callers write it, such as Dict.objects.list.
            self._name = f"{getattr(owner, 'api_name', owner.__name__)}.{name}"

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        # A new object each time: one kept in the instance would make a cycle that only
        # the garbage collector frees, and a dropped Lock must release its lock at once.
        return self.bound_class(self._function, instance, self._name, self._client_position)

    def __call__(self, instance: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Call the operation through its class, as in ``Dict.get(d, key)``, like a method."""
        return self.__get__(instance)(*args, **kwargs)


def _client_position(function: Callable[..., OperationBody]) -> int | None:
    """Return where a call passes the ``client`` parameter of an operation.

    That is its index among the positional arguments after ``self``, a number past any
    call's arguments when it is keyword-only, or None when there is no such parameter.
    """
    parameters = list(inspect.signature(function).parameters.values())[1:]
    for index, parameter in enumerate(parameters):
        if parameter.name != "client":
            continue
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
            return sys.maxsize
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            return index
    return None


class iteration(operation):  # noqa: N801
    """Make a generator function an iterating operation, with an ``.aio()`` async iterator."""

    bound_class = BoundIteration
