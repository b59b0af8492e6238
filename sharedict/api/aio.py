"""The async transport: one connection per event loop, many requests in flight on it.

Guarantees:
    * Each request carries an id, and the reply with that id goes to the receiver that
      sent the request, so replies that arrive in any order never cross.
    * Requests made in one pass of the event loop are written to the socket together,
      at the end of the pass, or earlier once ``FLUSH_SIZE`` bytes of them wait and the
      next request comes. Every complete reply in what the socket returns is handled in
      one pass.
    * Cancellation is safe. A cancelled call forgets its request id; its request still
      goes out if it was queued, and its reply is dropped when it arrives. So an operation
      that catches the cancellation can queue a follow-up request (as ``Lock.acquire``
      queues its withdrawal) before anything can interrupt it again. The daemon applies
      each request whole, so a cancelled write happened completely or not at all.
    * Retries follow the blocking transport: a request is sent again only when it
      certainly did not reach the daemon, or when it is a read. A write whose connection
      breaks after it was written raises ``ConnectionLostError``.
    * A connection belongs to one event loop, used from that loop's thread only, and to
      one process: after ``fork()`` the child opens its own. It closes when its loop
      shuts down its async generators, as ``asyncio.run()`` and ``asyncio.Runner`` do.
      The connection of a loop closed without that step is closed when the client next
      opens a connection. Its transport cannot close itself on the closed loop, so
      asyncio emits a ResourceWarning when that transport is freed.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
import threading
import weakref
from collections.abc import AsyncGenerator
from typing import Any, Protocol

import msgpack

from sharedict.api import protocol
from sharedict.api.autostart import start_daemon
from sharedict.api.errors import DaemonUnavailableError, ProtocolError, error_from_code
from sharedict.api.transport import (
    HANDSHAKE_TIMEOUT,
    RECONNECT_PAUSE,
    Client,
    ConnectAttempts,
    Request,
    check_daemon_user,
    lost_write_error,
    reply_timeout_error,
    request_size_error,
)

logger = logging.getLogger(__name__)

# A request goes out at most this many times: a restarted daemon costs one attempt.
ATTEMPTS = 3
_HEADER = protocol.HEADER
# msgpack's defaults since 1.0, raw=False and strict_map_key=True, are the protocol's
# options for decoding; passing them costs a sixth of a microsecond per reply.
_unpackb = msgpack.unpackb
# Queued requests are written early once they reach this many bytes, so that the daemon
# starts on them while the loop is still running the callbacks that make more.
# NOTE: the gain of this overlap on two cores is expected, not measured: the shared test
# machine was too busy to tell it from noise.
FLUSH_SIZE = 64 << 10


class NotSent(Exception):
    """The request never left this process: it is safe to send it again."""


class ReplyLost(Exception):
    """The connection broke after the request was written."""


class ReplyReceiver(Protocol):
    """The sender of a request, to which the connection hands the reply.

    The connection calls exactly one of the two methods, once, from the loop's thread,
    unless the sender has forgotten the request first. Neither may raise.
    """

    def reply_received(self, status: int, result: Any) -> None:
        """Take the reply: ``result`` is the result, or the error message when ``status`` is not 0."""

    def connection_broke(self, error: BaseException) -> None:
        """Take the failure of a broken or closed connection.

        ``error`` is ``NotSent``, ``ReplyLost``, ``ProtocolError``, the daemon's rejection of
        the connection, or ``CancelledError`` when the connection was closed on purpose.
        """


class _ReplyFuture(asyncio.Future):  # type: ignore[type-arg]
    """The future of one reply, for a caller that awaits one request on its own."""

    def reply_received(self, status: int, result: Any) -> None:
        if self.done():
            return  # the caller was cancelled
        if status == protocol.STATUS_OK:
            self.set_result(result)
        else:
            self.set_exception(error_from_code(status, result))

    def connection_broke(self, error: BaseException) -> None:
        if self.done():
            return
        if isinstance(error, asyncio.CancelledError):
            self.cancel()
        else:
            self.set_exception(error)


class AsyncConnection(asyncio.Protocol):
    """A connection of one event loop that carries many requests at once.

    Only the loop's thread may use it. ``send()`` queues a request and hands its reply
    to a ``ReplyReceiver`` later. The queued requests are written together once the loop
    has run the callbacks that are ready, or earlier once they fill ``FLUSH_SIZE``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.closed = False
        self.server_info: dict[str, Any] = {}
        self._sock = sock
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, ReplyReceiver] = {}
        # Frames not yet written, in the order of their request ids. Ids grow by one per
        # request and every write takes all the queued frames, so the requests not yet
        # written are exactly those from ``_first_unsent_id`` on.
        self._unsent: list[bytes] = []
        self._unsent_size = 0
        self._first_unsent_id = 1
        self._flush_scheduled = False
        self._received = bytearray()
        self._next_id = 0
        self._packer = msgpack.Packer(use_bin_type=True)
        self._closer: AsyncGenerator[None, None] | None = None

    @property
    def in_flight(self) -> int:
        """The number of requests written to the socket whose reply has not arrived."""
        first_unsent_id = self._first_unsent_id
        return sum(1 for request_id in self._pending if request_id < first_unsent_id)

    # Requests.

    def send(self, request: Request, receiver: ReplyReceiver) -> int:
        """Queue a request whose reply goes to ``receiver``, and return its id.

        Raises ``RequestSizeError`` for a request too large for a frame, and ``NotSent``
        when the connection is closed. A connection that is closing
        without knowing it yet hands ``NotSent`` to the receiver when it writes the
        request. The receiver is never called before this returns.
        """
        if self._unsent_size >= FLUSH_SIZE:
            # Writing here, before the request joins the queue, means that a write that
            # finds the socket broken fails the requests before it only, and never calls
            # a receiver back while it is still sending.
            self._flush()
        if self.closed:
            raise NotSent
        request_id = self._next_id + 1
        body = self._packer.pack([request_id, request.op, *request.args])
        size = len(body)
        if size > protocol.MAX_FRAME_SIZE:
            raise request_size_error(request, size)

        self._next_id = request_id
        self._pending[request_id] = receiver
        self._unsent.append(_HEADER.pack(size) + body)
        self._unsent_size += _HEADER.size + size
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._scheduled_flush)
        return request_id

    def forget(self, request_id: int) -> None:
        """Forget a cancelled request, so that its reply is dropped when it arrives.

        Its receiver is not called any more, not even when the connection breaks.
        """
        self._pending.pop(request_id, None)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        transport = self._transport
        if not self._unsent:
            return
        if self.closed or transport is None or transport.is_closing():
            self._fail_unsent()
            return

        buffered_before = transport.get_write_buffer_size()
        unsent, self._unsent = self._unsent, []
        first_unsent_id, self._first_unsent_id = self._first_unsent_id, self._next_id + 1
        self._unsent_size = 0
        transport.write(b"".join(unsent))
        if transport.is_closing() and not buffered_before:
            # write() found the socket broken at its first send, typically because the
            # daemon closed it while this connection sat idle: nothing of these frames
            # left the process.
            # NOTE: asyncio's selector transports (Python 3.10 to 3.13) try the socket
            # at once when their buffer is empty. A transport that defers every send
            # makes this case look like a lost reply, so a write raises
            # ConnectionLostError instead of going out again on a new connection.
            self._first_unsent_id = first_unsent_id
            self._fail_unsent()

    def _fail_unsent(self) -> None:
        self.closed = True
        pending = self._pending
        unsent = [pending.pop(request_id, None) for request_id in range(self._first_unsent_id, self._next_id + 1)]
        self._unsent = []
        self._unsent_size = 0
        self._first_unsent_id = self._next_id + 1
        for receiver in unsent:
            if receiver is not None:
                receiver.connection_broke(NotSent())

    # Replies.

    def data_received(self, data: bytes) -> None:
        # The usual read contains whole replies only, and is parsed where it lies. Only the
        # start of a reply cut off at its end is kept, to be completed by the next read.
        if self._received:
            self._received += data
            data, self._received = self._received, bytearray()
        try:
            end = self._resolve_replies(data)
        except (protocol.FrameTooLarge, protocol.MalformedFrame) as exc:
            message = f"the daemon sent an invalid reply ({exc}); restart it with `sharedict stop`"
            self._fail(lambda: ProtocolError(message))
            return
        if end < len(data):
            self._received += memoryview(data)[end:]

    def _resolve_replies(self, data: bytes | bytearray) -> int:
        """Hand each complete reply in ``data`` to its receiver; return where the rest starts."""
        pending = self._pending
        size_limit = protocol.MAX_FRAME_SIZE
        header_size = _HEADER.size
        unpack_header = _HEADER.unpack_from
        length = len(data)
        start = 0
        with memoryview(data) as view:
            while length - start >= header_size:
                (size,) = unpack_header(data, start)
                if size > size_limit:
                    raise protocol.FrameTooLarge(size)
                end = start + header_size + size
                if end > length:
                    break
                try:
                    reply = _unpackb(view[start + header_size : end])
                except Exception as exc:  # msgpack raises several unrelated exception types
                    raise protocol.MalformedFrame(f"frame is not valid msgpack: {exc}") from exc
                start = end

                if type(reply) is not list or len(reply) != 3:
                    raise protocol.MalformedFrame("a reply must be an array of [request id, status, result]")
                request_id, status, result = reply
                receiver = pending.pop(request_id, None)
                if receiver is not None:
                    receiver.reply_received(status, result)
                elif request_id == 0:
                    # The daemon rejected the connection as a whole and is closing it.
                    self._fail(lambda: error_from_code(status, result))
                    return start
                # Any other reply belongs to a forgotten request, and is dropped.
        return start

    # Closing.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ReplyLost)

    def _fail(self, error: Any) -> None:
        """Close, and fail every request: unsent ones with ``NotSent``, sent ones with ``error()``."""
        self._fail_unsent()
        if self._transport is not None:
            self._transport.close()
        # Emptied in place: a reply still being handed out from the same read must find
        # its receiver gone, since the receiver has taken the failure instead.
        receivers = list(self._pending.values())
        self._pending.clear()
        for receiver in receivers:
            receiver.connection_broke(error())

    def close(self) -> None:
        """Close the connection, and cancel the requests still in flight.

        The connection closes when its loop shuts down, or fails to open, so nothing
        waits for those requests any more: a request sent again now would only leave a
        task pending on a closing loop.
        """
        self.closed = True
        receivers = list(self._pending.values())
        self._pending.clear()
        if self._transport is None or self.loop.is_closed():
            # No transport runs the socket, or none can any more because its loop is
            # closed, so the socket is closed here to release the daemon's side.
            self._sock.close()
        else:
            self._transport.close()
        if not self.loop.is_closed():
            for receiver in receivers:
                receiver.connection_broke(asyncio.CancelledError())


# Connections by client and event loop. A client's map lives in
# ``client._async_connections``. Its value for a loop is the open connection, or the task
# that is opening it, which every caller on that loop waits for.

_lock = threading.Lock()
_clients_with_connections: weakref.WeakSet[Client] = weakref.WeakSet()


def _connections_of(client: Client) -> dict[asyncio.AbstractEventLoop, Any]:
    connections = client._async_connections
    if connections is None:
        with _lock:
            connections = client._async_connections
            if connections is None:
                connections = client._async_connections = {}
                _clients_with_connections.add(client)
    return connections


def _forget_connections_after_fork() -> None:
    # The child must not use the parent's sockets. It leaves them open, because closing
    # its copies would not close the parent's connections anyway.
    global _lock
    _lock = threading.Lock()
    for client in list(_clients_with_connections):
        client._async_connections = None
    _clients_with_connections.clear()


os.register_at_fork(after_in_child=_forget_connections_after_fork)


async def _connection(client: Client, loop: asyncio.AbstractEventLoop) -> AsyncConnection:
    """Return the loop's open connection, opening it first if needed."""
    connections = _connections_of(client)
    entry = connections.get(loop)
    if isinstance(entry, asyncio.Task) and entry.done():
        # The opening finished, and its callback has not yet replaced it with its result.
        entry = None if entry.cancelled() or entry.exception() else entry.result()
    if isinstance(entry, AsyncConnection) and not entry.closed:
        return entry
    if not isinstance(entry, asyncio.Task):
        # The opening runs as a task of its own, so that a caller that is cancelled
        # meanwhile does not cancel it for the others.
        entry = loop.create_task(_open(client, loop), name="sharedict-connect")
        entry.add_done_callback(functools.partial(_opened, connections, loop))
        with _lock:
            _close_connections_of_closed_loops(connections)
            connections[loop] = entry
    return await asyncio.shield(entry)


def _opened(
    connections: dict[asyncio.AbstractEventLoop, Any],
    loop: asyncio.AbstractEventLoop,
    task: asyncio.Task[AsyncConnection],
) -> None:
    # Reading the exception marks it retrieved: the callers that awaited it have raised
    # it already, and asyncio would log it again when nobody did.
    failed = task.cancelled() or task.exception() is not None
    with _lock:
        if connections.get(loop) is not task:
            return
        if failed:
            del connections[loop]  # the next call tries again
        else:
            connections[loop] = task.result()


def _close_connections_of_closed_loops(connections: dict[asyncio.AbstractEventLoop, Any]) -> None:
    for loop in [loop for loop in connections if loop.is_closed()]:
        entry = connections.pop(loop)
        if isinstance(entry, AsyncConnection):
            entry.close()


async def _open(client: Client, loop: asyncio.AbstractEventLoop) -> AsyncConnection:
    """Open a connection as ``Client._connect`` does, without blocking the loop."""
    attempts = ConnectAttempts(client.settings, loop.time())
    while True:
        try:
            return await _connect(loop, client.settings.socket_path)
        except (ConnectionResetError, BrokenPipeError) as exc:
            attempts.handshake_reset(exc, loop.time())
            await asyncio.sleep(RECONNECT_PAUSE)
            continue
        except OSError as exc:
            attempts.connect_failed(exc)
        await loop.run_in_executor(None, start_daemon, client.settings, client.daemon_is_up)
        attempts.started = True


async def _connect(loop: asyncio.AbstractEventLoop, socket_path: str) -> AsyncConnection:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = AsyncConnection(loop, sock)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, socket_path)
        check_daemon_user(sock, socket_path)
        await loop.create_unix_connection(lambda: conn, sock=sock)
        future = _ReplyFuture(loop=loop)
        hello = Request(protocol.HELLO, protocol.PROTOCOL_VERSION, os.getpid())
        conn.send(hello, future)
        try:
            conn.server_info = await asyncio.wait_for(future, HANDSHAKE_TIMEOUT)
        except (NotSent, ReplyLost):
            raise ConnectionResetError(errno.ECONNRESET, "the daemon closed the connection at once") from None
        except asyncio.TimeoutError:
            raise reply_timeout_error(socket_path, hello, HANDSHAKE_TIMEOUT) from None
        conn._closer = _close_at_loop_shutdown(conn)
        await conn._closer.__anext__()
    except BaseException:
        conn.close()
        raise
    logger.debug("connected to the daemon on %s, pid %s", socket_path, conn.server_info.get("pid"))
    return conn


async def _close_at_loop_shutdown(conn: AsyncConnection) -> AsyncGenerator[None, None]:
    # The loop finalizes this generator when it shuts down its async generators, the one
    # hook that asyncio.run() and asyncio.Runner call before they close a loop.
    try:
        yield
    finally:
        conn.close()


def open_connection(client: Client, loop: asyncio.AbstractEventLoop) -> AsyncConnection | None:
    """Return the loop's connection if it is open; None when it must be opened first."""
    connections = client._async_connections
    conn = connections.get(loop) if connections is not None else None
    if type(conn) is AsyncConnection and not conn.closed:
        return conn
    return None


async def call_async(client: Client, request: Request, attempts: int = ATTEMPTS) -> Any:
    """Send a request on the running loop's connection and return its result.

    ``attempts`` bounds how many times the request goes out.
    """
    loop = asyncio.get_running_loop()
    for _ in range(attempts):
        conn = open_connection(client, loop) or await _connection(client, loop)
        future = _ReplyFuture(loop=loop)
        try:
            request_id = conn.send(request, future)
        except NotSent:
            continue
        try:
            return await future
        except NotSent:
            continue
        except ReplyLost:
            if request.write:
                raise lost_write_error(request) from None
            continue
        except asyncio.CancelledError:
            conn.forget(request_id)
            raise
    raise DaemonUnavailableError(f"the daemon on {client.settings.socket_path} closed every connection; check its log")


def in_flight(client: Client) -> int:
    """Return how many requests the running loop's connection has written and awaits replies to."""
    connections = client._async_connections or {}
    conn = connections.get(asyncio.get_running_loop())
    return conn.in_flight if isinstance(conn, AsyncConnection) else 0
