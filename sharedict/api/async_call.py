"""``AsyncCall``: the ``.aio`` form of an operation, driven by its replies instead of a task.

Inside a running event loop, ``d.get.aio(key)`` returns an ``AsyncCall``. It is an
asyncio future that runs the operation's generator one step per reply, in the callback
that receives the reply. A coroutine would do the same work, but ``asyncio.gather`` wraps
every coroutine in a task, and the task with its scheduling and its garbage costs more
than the rest of a small call.

Guarantees:
    * The call starts when it is made, as a task does: ``d.put.aio(key, value)`` sends its
      request even if nothing awaits it, unlike a coroutine, which would do nothing and
      warn that it was never awaited.
    * Cancelling the call, or the task that awaits it, withdraws the request in flight
      and throws ``CancelledError`` into the operation at its ``yield``, in a later pass
      of the loop. An operation that catches it can send a follow-up request first, as
      ``Lock.acquire`` does. The call ends cancelled once the operation raises it again.
    * The operation runs in a copy of the context in which the call was made, as a
      task's coroutine does.
    * Each step of the operation runs in a callback of the event loop, so an operation
      must not block, which holds for every operation that yields requests.
    * Retries follow ``call_async``: a request goes out again only when it certainly did
      not reach the daemon, or when it is a read.

The call also passes for a coroutine, so ``asyncio.create_task`` and ``TaskGroup`` take
it, but ``inspect.iscoroutine`` does not.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine, Generator
from typing import Any

from sharedict.api import protocol
from sharedict.api.aio import ATTEMPTS, AsyncConnection, NotSent, ReplyLost, call_async, open_connection
from sharedict.api.errors import error_from_code
from sharedict.api.transport import Client, Request, lost_write_error

OperationBody = Generator[Any, Any, Any]

# The methods of the base class, called directly: super() costs about a third of a
# microsecond per call, and a small call makes several of these.
_future_init = asyncio.Future.__init__
_future_set_result = asyncio.Future.set_result
_future_set_exception = asyncio.Future.set_exception
_future_cancel = asyncio.Future.cancel


class AsyncCall(asyncio.Future):  # type: ignore[type-arg]
    """One call of an operation's ``.aio`` form, awaitable as a future and as a coroutine.

    Making it starts the operation. Only the thread of the loop it was made in may use it.
    """

    # Slots halve the cost of making a call, since a Python subclass of the C future
    # would otherwise get an instance dict.
    __slots__ = ("_client", "_body", "_context", "_request", "_conn", "_request_id", "_task", "_cancel_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop, client: Client, body: OperationBody) -> None:
        _future_init(self, loop=loop)
        self._client = client
        self._body: OperationBody | None = body
        self._context = contextvars.copy_context()
        # The request in flight: on a connection, or sent by a task of call_async when
        # the connection must be opened first or the request sent again.
        self._request: Request | None = None
        self._conn: AsyncConnection | None = None
        self._request_id = 0
        self._task: asyncio.Task[Any] | None = None
        self._cancel_scheduled = False
        self._context.run(self._advance, None, None)

    # The coroutine protocol, for asyncio.create_task(), which takes coroutines only. A
    # task drives it with send() and waits for the future that send() returns.

    def send(self, value: Any) -> Any:
        if self.done():
            raise StopIteration(self.result())
        self._asyncio_future_blocking = True
        return self

    def throw(self, error: Any, value: Any = None, traceback: Any = None) -> Any:
        if value is None:
            value = error() if isinstance(error, type) else error
        if isinstance(value, asyncio.CancelledError) and not self.done():
            # A task that was cancelled before it waited for the call: the call handles
            # the cancellation, and the task waits for the outcome.
            self.cancel()
            return self.send(None)
        raise value

    def close(self) -> None:
        self.cancel()

    # Steps.

    def _advance(self, result: Any, error: BaseException | None) -> None:
        """Run the operation to its next request and send it, or end the call with its outcome."""
        body = self._body
        if body is None:
            return
        try:
            if error is None:
                request = body.send(result)
            else:
                request = body.throw(error)
        except StopIteration as stop:
            self._body = None
            _future_set_result(self, stop.value)
            return
        except asyncio.CancelledError as cancelled:
            self._body = None
            _future_cancel(self, cancelled.args[0] if cancelled.args else None)
            return
        except (KeyboardInterrupt, SystemExit) as exc:
            self._body = None
            _future_set_exception(self, exc)
            raise  # as a task does: these must reach the loop
        except BaseException as exc:  # the operation's error is the call's outcome
            self._body = None
            _future_set_exception(self, exc)
            return
        self._send(request)

    def _send(self, request: Request) -> None:
        self._request = request
        conn = open_connection(self._client, self._loop)
        if conn is None:
            self._send_by_task(request, ATTEMPTS)
            return
        try:
            self._request_id = conn.send(request, self)
        except NotSent:
            self._send_by_task(request, ATTEMPTS - 1)
        except Exception as exc:  # a request too large for a frame: the operation's error
            self._advance(None, exc)
        else:
            self._conn = conn

    def _send_by_task(self, request: Request, attempts: int) -> None:
        # call_async opens the connection when it must, and sends the request again when
        # that is safe. Its task copies the current context, which is the call's.
        self._task = self._loop.create_task(call_async(self._client, request, attempts))
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task is not self._task:
            # cancel() withdrew the task after it ended, with this callback queued already.
            # The operation gets the cancellation instead of the result, as it would
            # for a reply on the connection, so that a lock grant is undone.
            return
        self._task = None
        if task.cancelled():
            error: BaseException | None = asyncio.CancelledError()
        else:
            error = task.exception()
        result = None if error is not None else task.result()
        self._context.run(self._advance, result, error)

    # The connection's calls, as a ReplyReceiver.

    def reply_received(self, status: int, result: Any) -> None:
        self._conn = None
        if status == protocol.STATUS_OK:
            self._context.run(self._advance, result, None)
        else:
            self._context.run(self._advance, None, error_from_code(status, result))

    def connection_broke(self, error: BaseException) -> None:
        self._conn = None
        request = self._request
        assert request is not None
        if type(error) is ReplyLost and request.write:
            self._context.run(self._advance, None, lost_write_error(request))
        elif type(error) is NotSent or type(error) is ReplyLost:
            self._context.run(self._send_by_task, request, ATTEMPTS - 1)
        else:
            self._context.run(self._advance, None, error)

    # Cancelling.

    def cancel(self, msg: Any = None) -> bool:
        """Withdraw the request in flight and throw ``CancelledError`` into the operation.

        Returns False when the call has ended already. The call ends cancelled only when
        the operation lets the ``CancelledError`` through.
        """
        if self.done():
            return False

        if self._conn is not None:
            self._conn.forget(self._request_id)
            self._conn = None
        if self._task is not None:
            self._task.remove_done_callback(self._task_done)
            self._task.cancel()
            self._task = None
        if not self._cancel_scheduled:
            # Later, as a task's cancellation is: the operation's code must not run
            # inside whatever called cancel().
            self._cancel_scheduled = True
            self._loop.call_soon(self._throw_cancellation, msg, context=self._context)
        return True

    def _throw_cancellation(self, msg: Any) -> None:
        self._cancel_scheduled = False
        if not self.done():
            self._advance(None, asyncio.CancelledError(msg) if msg is not None else asyncio.CancelledError())


class UndoableCall(AsyncCall):
    """An ``AsyncCall`` whose result is undone when the task awaiting it cannot receive it.

    A task cancelled after the call ended, but before the task's next step, raises
    ``CancelledError`` and drops the result. A dropped lock grant would leave the lock
    held with no owner to release it, so ``undo(result)`` runs in that case.
    """

    __slots__ = ("_undo",)

    def __init__(
        self, loop: asyncio.AbstractEventLoop, client: Client, body: OperationBody, undo: Callable[[Any], None]
    ) -> None:
        self._undo: Callable[[Any], None] | None = undo
        super().__init__(loop, client, body)

    def __await__(self) -> Generator[Any, None, Any]:
        while not self.done():
            self._asyncio_future_blocking = True
            try:
                yield self
            except asyncio.CancelledError:
                if not self.done():
                    # As in throw(): the operation handles the cancellation, and the
                    # awaiter waits for the outcome.
                    self.cancel()
                    continue
                self._undo_result()
                raise
        return self.result()

    __iter__ = __await__

    def throw(self, error: Any, value: Any = None, traceback: Any = None) -> Any:
        if value is None:
            value = error() if isinstance(error, type) else error
        if isinstance(value, asyncio.CancelledError) and self.done():
            self._undo_result()
        return super().throw(value)

    def _undo_result(self) -> None:
        undo, self._undo = self._undo, None
        if undo is not None and not self.cancelled() and self.exception() is None:
            undo(self.result())


# asyncio.create_task() and TaskGroup.create_task() accept what passes for a coroutine.
Coroutine.register(AsyncCall)
