"""The async transport: one connection per event loop, many requests in flight on it.

Each request gets an id and a future; the connection's protocol object resolves the
future whose id a reply carries, so replies that arrive out of order never cross. A
cancelled call forgets its future, and the reply that arrives later is dropped. The
daemon applies every request whole, so a cancelled write happened completely or not at
all.
"""

from __future__ import annotations

import asyncio
import errno
import os
import weakref
from typing import Any

from sharedict.api import protocol
from sharedict.api.autostart import start_daemon
from sharedict.api.errors import ConnectionLostError, DaemonUnavailableError
from sharedict.api.transport import Client, Request, reply_result

_NO_DAEMON_ERRORS = (errno.ENOENT, errno.ECONNREFUSED)


class _ReplyLost(Exception):
    pass


class _Protocol(asyncio.Protocol):
    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection
        self.reader = protocol.FrameReader()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.connection.pending
        try:
            for body in self.reader.frames():
                reply = protocol.decode_body(body)
                future = pending.pop(reply[0], None) if isinstance(reply, list) and reply else None
                if future is not None and not future.done():
                    future.set_result(reply)
        except (protocol.MalformedFrame, protocol.FrameTooLarge) as exc:
            self.connection.fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.fail(exc)


class AsyncConnection:
    """A connection bound to one event loop, carrying many requests at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._next_id = 0

    async def open(self, socket_path: str) -> None:
        self.transport, _ = await self.loop.create_unix_connection(lambda: _Protocol(self), socket_path)
        await self.request(Request(protocol.HELLO, protocol.PROTOCOL_VERSION, os.getpid()))

    async def request(self, request: Request) -> Any:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise _NotSentAsync
        self._next_id += 1
        request_id = self._next_id
        future = self.loop.create_future()
        self.pending[request_id] = future
        header, body = protocol.encode_frame([request_id, request.op, *request.args])
        if len(body) < 65536:
            self.transport.write(header + body)
        else:
            self.transport.writelines([header, body])
        if self.transport.is_closing():
            # The send failed at once, typically because the daemon went away while
            # this connection sat idle: nothing reached the daemon.
            self.pending.pop(request_id, None)
            self.closed = True
            raise _NotSentAsync
        try:
            reply = await future
        finally:
            # A cancelled call leaves no future behind for its reply to find.
            self.pending.pop(request_id, None)
        return reply_result(reply, request_id)

    def fail(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(_ReplyLost(exc))

    def close(self) -> None:
        self.fail(None)


class _NotSentAsync(Exception):
    pass


_connections: weakref.WeakKeyDictionary[Client, weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any]]
_connections = weakref.WeakKeyDictionary()


async def _connection_for(client: Client) -> AsyncConnection:
    loop = asyncio.get_running_loop()
    per_loop = _connections.get(client)
    if per_loop is None or getattr(client, "_aio_pid", None) != os.getpid():
        per_loop = _connections[client] = weakref.WeakKeyDictionary()
        client._aio_pid = os.getpid()  # type: ignore[attr-defined]
    entry = per_loop.get(loop)
    if isinstance(entry, AsyncConnection) and not entry.closed:
        return entry
    if isinstance(entry, asyncio.Future):
        # Another task of this loop is connecting; share its connection.
        return await asyncio.shield(entry)

    opening: asyncio.Future[AsyncConnection] = loop.create_future()
    per_loop[loop] = opening
    try:
        conn = await _open(client, loop)
    except BaseException as exc:
        per_loop.pop(loop, None)
        opening.set_exception(exc)
        opening.exception()  # mark it retrieved when nobody else waits
        raise
    per_loop[loop] = conn
    opening.set_result(conn)
    return conn


async def _open(client: Client, loop: asyncio.AbstractEventLoop) -> AsyncConnection:
    settings = client.settings
    conn = AsyncConnection(loop)
    try:
        await conn.open(settings.socket_path)
        return conn
    except OSError as exc:
        if exc.errno not in _NO_DAEMON_ERRORS:
            raise DaemonUnavailableError(f"cannot connect to the daemon on {settings.socket_path}: {exc}") from exc
    if not settings.autostart:
        raise DaemonUnavailableError(
            f"no sharedict daemon is running on {settings.socket_path}; start one with `sharedict serve`, "
            "or unset SHAREDICT_AUTOSTART=0 to let clients start it"
        )
    await loop.run_in_executor(None, start_daemon, settings, client.daemon_is_up)
    conn = AsyncConnection(loop)
    await conn.open(settings.socket_path)
    return conn


async def call_async(client: Client, request: Request) -> Any:
    """Send a request on the event loop's connection and return its result."""
    for _ in range(3):
        conn = await _connection_for(client)
        try:
            return await conn.request(request)
        except _NotSentAsync:
            continue
        except _ReplyLost:
            if request.write:
                raise ConnectionLostError(
                    f"the connection to the daemon broke after {request.op} was sent; the write may or may "
                    "not have been applied, so read the entry to find out"
                ) from None
            continue
    raise DaemonUnavailableError(f"the daemon on {client.settings.socket_path} closed every connection; check its log")
