"""The async transport: one connection per event loop, many requests in flight on it.

Guarantees:
    * Each request carries an id, and the reply with that id resolves that request's
      future, so replies that arrive in any order never cross.
    * Requests made in one pass of the event loop are written to the socket together,
      at the end of the pass or as soon as ``FLUSH_SIZE`` bytes of them wait. Every
      complete reply in what the socket returns is handled in one pass.
    * Cancellation is safe. A cancelled call forgets its future; its request still goes
      out if it was queued, and its reply is dropped when it arrives. So an operation
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
from typing import Any

import msgpack

from sharedict.api import protocol
from sharedict.api.autostart import no_daemon_error, start_daemon
from sharedict.api.errors import ConnectionLostError, DaemonUnavailableError, ProtocolError
from sharedict.api.transport import Client, Request, check_daemon_user, reply_result

logger = logging.getLogger(__name__)

_NO_DAEMON_ERRORS = (errno.ENOENT, errno.ECONNREFUSED)
# A request goes out at most this many times: a restarted daemon costs one attempt.
_ATTEMPTS = 3
_HEADER = protocol.HEADER
# Queued requests are written at once when they reach this many bytes, so that the daemon
# starts on them while the loop is still running the tasks that make more.
# NOTE: the gain of this overlap on two cores is expected, not measured: the shared test
# machine was too busy to tell it from noise.
FLUSH_SIZE = 64 << 10


class _NotSent(Exception):
    """The request never left this process: it is safe to send it again."""


class _ReplyLost(Exception):
    """The connection broke after the request was written."""


class AsyncConnection(asyncio.Protocol):
    """A connection of one event loop that carries many requests at once.

    Only the loop's thread may use it. ``send()`` queues a request and returns the
    future of its reply. The queued requests are written together once the loop has run
    the tasks that are ready, or earlier once they fill ``FLUSH_SIZE``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.closed = False
        self.server_info: dict[str, Any] = {}
        self._sock = sock
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        # Frames not yet written, by request id, in the order of their requests.
        self._unsent: dict[int, bytes] = {}
        self._unsent_size = 0
        self._flush_scheduled = False
        self._received = bytearray()
        self._next_id = 0
        self._packer = msgpack.Packer(use_bin_type=True)
        self._closer: AsyncGenerator[None, None] | None = None

    @property
    def in_flight(self) -> int:
        """The number of requests written to the socket whose reply has not arrived."""
        return sum(1 for request_id in self._pending if request_id not in self._unsent)

    # Requests.

    def send(self, request: Request) -> tuple[int, asyncio.Future[Any]]:
        """Queue a request and return its id and the future of its reply.

        Raises ``_NotSent`` when the connection is closed or closing.
        """
        if self.closed or self._transport is None or self._transport.is_closing():
            self.closed = True
            raise _NotSent
        self._next_id += 1
        request_id = self._next_id
        body = self._packer.pack([request_id, request.op, *request.args])
        if len(body) > protocol.MAX_FRAME_SIZE:
            raise protocol.FrameTooLarge(len(body))

        future = self.loop.create_future()
        self._pending[request_id] = future
        self._unsent[request_id] = _HEADER.pack(len(body)) + body
        self._unsent_size += _HEADER.size + len(body)
        if self._unsent_size >= FLUSH_SIZE:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._scheduled_flush)
        return request_id, future

    def forget(self, request_id: int) -> None:
        """Forget a cancelled request, so that its reply is dropped when it arrives."""
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
        unsent, self._unsent = self._unsent, {}
        self._unsent_size = 0
        transport.write(b"".join(unsent.values()))
        if transport.is_closing() and not buffered_before:
            # write() found the socket broken at its first send, typically because the
            # daemon closed it while this connection sat idle: nothing of these frames
            # left the process.
            # NOTE: asyncio's selector transports (Python 3.10 to 3.13) try the socket
            # at once when their buffer is empty. A transport that defers every send
            # makes this case look like a lost reply, so a write raises
            # ConnectionLostError instead of going out again on a new connection.
            self._unsent = unsent
            self._fail_unsent()

    def _fail_unsent(self) -> None:
        self.closed = True
        unsent, self._unsent = self._unsent, {}
        self._unsent_size = 0
        for request_id in unsent:
            future = self._pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_exception(_NotSent())

    # Replies.

    def data_received(self, data: bytes) -> None:
        received = self._received
        received += data
        start = 0
        try:
            with memoryview(received) as view:
                while len(received) - start >= _HEADER.size:
                    (size,) = _HEADER.unpack_from(received, start)
                    if size > protocol.MAX_FRAME_SIZE:
                        raise protocol.FrameTooLarge(size)
                    end = start + _HEADER.size + size
                    if end > len(received):
                        break
                    self._resolve(protocol.decode_body(view[start + _HEADER.size : end]))
                    start = end
        except (protocol.FrameTooLarge, protocol.MalformedFrame) as exc:
            message = f"the daemon sent an invalid reply ({exc}); restart it with `sharedict stop`"
            self._fail(lambda: ProtocolError(message))
            return
        if start == len(received):
            # A new buffer gives back the memory that a large reply took.
            self._received = bytearray()
        else:
            del received[:start]

    def _resolve(self, reply: Any) -> None:
        if type(reply) is not list or not reply:
            raise protocol.MalformedFrame("a reply must be an array of [request id, status, result]")
        future = self._pending.pop(reply[0], None)
        if future is not None:
            if not future.done():
                future.set_result(reply)
        elif reply[0] == 0:
            # The daemon rejected the connection as a whole and is closing it.
            self._fail(lambda: _rejection(reply))
        # Any other reply belongs to a cancelled call, and is dropped.

    # Closing.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(_ReplyLost)

    def _fail(self, error: Any) -> None:
        """Close, and fail every request: unsent ones with ``_NotSent``, sent ones with ``error()``."""
        self._fail_unsent()
        if self._transport is not None:
            self._transport.close()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error())

    def close(self) -> None:
        """Close the connection; requests still in flight fail as if it broke."""
        self.closed = True
        if self._transport is None or self.loop.is_closed():
            # No transport runs the socket, or none can any more because its loop is
            # closed, so the socket is closed here to release the daemon's side.
            self._sock.close()
        else:
            self._transport.close()


def _rejection(reply: list[Any]) -> Exception:
    try:
        return reply_result(reply, 0)
    except Exception as exc:  # reply_result raises the error that the reply carries
        return exc


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
    settings = client.settings
    try:
        return await _connect(loop, settings.socket_path)
    except OSError as exc:
        if exc.errno not in _NO_DAEMON_ERRORS:
            raise DaemonUnavailableError(f"cannot connect to the daemon on {settings.socket_path}: {exc}") from exc
    if not settings.autostart:
        raise no_daemon_error(settings)

    await loop.run_in_executor(None, start_daemon, settings, client.daemon_is_up)
    try:
        return await _connect(loop, settings.socket_path)
    except OSError as exc:
        raise DaemonUnavailableError(
            f"the daemon started but refuses connections on {settings.socket_path}: {exc}"
        ) from exc


async def _connect(loop: asyncio.AbstractEventLoop, socket_path: str) -> AsyncConnection:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = AsyncConnection(loop, sock)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, socket_path)
        check_daemon_user(sock, socket_path)
        await loop.create_unix_connection(lambda: conn, sock=sock)
        request_id, future = conn.send(Request(protocol.HELLO, protocol.PROTOCOL_VERSION, os.getpid()))
        try:
            conn.server_info = reply_result(await future, request_id)
        except (_NotSent, _ReplyLost):
            raise ConnectionResetError(errno.ECONNRESET, "the daemon closed the connection at once") from None
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


async def call_async(client: Client, request: Request) -> Any:
    """Send a request on the running loop's connection and return its result."""
    loop = asyncio.get_running_loop()
    for _ in range(_ATTEMPTS):
        connections = client._async_connections
        conn = connections.get(loop) if connections is not None else None
        if type(conn) is not AsyncConnection or conn.closed:
            conn = await _connection(client, loop)

        try:
            request_id, future = conn.send(request)
        except _NotSent:
            continue
        try:
            reply = await future
        except _NotSent:
            continue
        except _ReplyLost:
            if request.write:
                raise ConnectionLostError(
                    f"the connection to the daemon broke after {request.op} was sent; the write may or may "
                    "not have been applied, so read the entry to find out"
                ) from None
            continue
        except BaseException:
            conn.forget(request_id)  # cancelled
            raise
        return reply_result(reply, request_id)
    raise DaemonUnavailableError(f"the daemon on {client.settings.socket_path} closed every connection; check its log")


def in_flight(client: Client) -> int:
    """Return how many requests the running loop's connection has written and awaits replies to."""
    connections = client._async_connections or {}
    conn = connections.get(asyncio.get_running_loop())
    return conn.in_flight if isinstance(conn, AsyncConnection) else 0
