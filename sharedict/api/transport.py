"""The client's connections to the daemon, blocking and async, and their retry rules.

A ``Client`` keeps a pool of blocking connections, so that threads never share one
request at a time, and one async connection per event loop, which carries many requests
at once matched by request id. After ``fork()`` the child opens connections of its own
and leaves the parent's untouched.

Retries never apply a write twice: a request is sent again only when it certainly did
not reach the daemon (the connection was found closed before or while sending it), or
when it is a read. A write whose connection breaks after it was sent raises
``ConnectionLostError``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time
from typing import Any

import msgpack

from sharedict.api import protocol
from sharedict.api.autostart import no_daemon_error, start_daemon
from sharedict.api.config import Settings, check_socket_path
from sharedict.api.errors import (
    ConnectionLostError,
    DaemonUnavailableError,
    ProtocolError,
    RequestSizeError,
    error_from_code,
)

logger = logging.getLogger(__name__)

RECV_SIZE = 256 << 10
MAX_IDLE_CONNECTIONS = 16
_NO_DAEMON_ERRORS = (errno.ENOENT, errno.ECONNREFUSED)

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a daemon may take to accept a connection and answer its hello."""

RECONNECT_TIMEOUT = 10.0
"""Seconds to keep reconnecting to a daemon that closes connections during the handshake,
as a stopping or crashing daemon does."""


RECONNECT_PAUSE = 0.05
"""Seconds between two such attempts."""


class ConnectAttempts:
    """The policy of the blocking and async clients when a connection to the daemon fails.

    A daemon that resets connections during the handshake is stopping or crashing. Its
    successor, started by a supervisor, another client or auto-start here, is waited for
    up to ``RECONNECT_TIMEOUT`` seconds. A socket with no daemon listening gets a daemon
    started once, when auto-start is on.
    """

    __slots__ = ("settings", "deadline", "started")

    def __init__(self, settings: Settings, now: float) -> None:
        self.settings = settings
        self.deadline = now + RECONNECT_TIMEOUT
        self.started = False

    def handshake_reset(self, error: OSError, now: float) -> None:
        """Raise ``DaemonUnavailableError`` once resets have gone on for too long."""
        if now > self.deadline:
            raise DaemonUnavailableError(
                f"the daemon on {self.settings.socket_path} kept closing connections during the handshake for "
                f"{RECONNECT_TIMEOUT:g} s; check its log"
            ) from error

    def connect_failed(self, error: OSError) -> None:
        """Raise ``DaemonUnavailableError`` unless starting a daemon may help."""
        socket_path = self.settings.socket_path
        if error.errno not in _NO_DAEMON_ERRORS:
            raise DaemonUnavailableError(f"cannot connect to the daemon on {socket_path}: {error}") from error
        if self.started:
            raise DaemonUnavailableError(
                f"the daemon started but refuses connections on {socket_path}: {error}"
            ) from error
        if not self.settings.autostart:
            raise no_daemon_error(self.settings)


class Request:
    """One operation for the daemon; ``write`` marks a request that changes data."""

    __slots__ = ("op", "args", "write")

    def __init__(self, op: str, *args: Any, write: bool = False) -> None:
        self.op = op
        self.args = args
        self.write = write

    def __repr__(self) -> str:
        return f"Request({self.op!r})"


def request_size_error(request: Request, size: int) -> RequestSizeError:
    """Return the error for a request whose frame of ``size`` bytes exceeds ``protocol.MAX_FRAME_SIZE``."""
    return RequestSizeError(
        f"{request.op} request of {size} bytes exceeds the {protocol.MAX_FRAME_SIZE // protocol.MiB} MiB "
        "limit of one request; store large objects in files and keep their paths in the dict"
    )


def reply_timeout_error(socket_path: str, request: Request, timeout: float) -> DaemonUnavailableError:
    """Return the error for a request whose reply did not arrive within ``timeout`` seconds."""
    # A write that the daemon has read may still be applied once it catches up.
    maybe_applied = ""
    if request.write:
        maybe_applied = "; the write may or may not be applied, so read back what it changes"
    return DaemonUnavailableError(
        f"the daemon on {socket_path} did not answer {request.op} within {timeout:g} s{maybe_applied}; "
        "it may be stopped or overloaded, so check it with `sharedict status` and its log"
    )


def lost_write_error(request: Request) -> ConnectionLostError:
    """Return the error for a write whose connection broke after it was sent."""
    return ConnectionLostError(
        f"the connection to the daemon broke after {request.op} was sent; the write may or may "
        "not have been applied, so read back what it changes before you repeat it"
    )


class _NotSent(Exception):
    """The request did not leave this process: safe to send again on a new connection."""


class _ReplyLost(Exception):
    """The connection broke after the request was sent."""


def reply_result(reply: Any, request_id: int) -> Any:
    """Return the result of a reply frame, or raise the error it carries."""
    if not isinstance(reply, list) or len(reply) != 3:
        raise ProtocolError("the daemon sent a malformed reply; restart it with `sharedict stop`")
    _, status, result = reply
    if status == protocol.STATUS_OK:
        return result
    raise error_from_code(status, result)


_PEERCRED = struct.Struct("3i")


def check_daemon_user(sock: socket.socket, socket_path: str) -> None:
    """Raise ``DaemonUnavailableError`` unless the process behind ``sock`` runs as this user.

    Keys and values go to a daemon of one's own user only. Another user who created the
    socket's directory first, for example under ``/tmp``, could otherwise receive them.
    """
    pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    if uid != os.getuid():
        raise DaemonUnavailableError(
            f"the process behind {socket_path} (pid {pid}) runs as uid {uid}, not as you (uid {os.getuid()}), "
            "so sharedict sends it nothing; set SHAREDICT_SOCKET to a path in a directory of your own, or "
            f"remove {os.path.dirname(socket_path)} if you do not know who created it"
        )


class SyncConnection:
    """A blocking connection that carries one request at a time.

    ``request_timeout`` bounds the wait for each reply (None waits as long as the
    daemon works); the handshake is always bounded by ``HANDSHAKE_TIMEOUT``.
    """

    def __init__(self, socket_path: str, request_timeout: float | None = None) -> None:
        self.pid = os.getpid()
        self.socket_path = socket_path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            self._sock.connect(socket_path)
            check_daemon_user(self._sock, socket_path)
        except BaseException:
            self._sock.close()
            raise
        self._reader = protocol.FrameReader()
        # A connection serves one thread at a time, so it can keep a packer, which costs
        # less than msgpack.packb() setting one up for every request.
        self._packer = msgpack.Packer(use_bin_type=True)
        self._next_id = 0
        self.closed = False
        # True from a send until its reply has been read whole, even an error reply.
        self.awaiting_reply = False
        try:
            self.server_info = self.request(Request(protocol.HELLO, protocol.PROTOCOL_VERSION, os.getpid()))
        except (_NotSent, _ReplyLost):
            # Our own user's daemon accepted the connection and closed it before the
            # handshake ended, as a daemon that is stopping or crashing does.
            raise ConnectionResetError(errno.ECONNRESET, "the daemon closed the connection during the handshake") from None
        except BaseException:
            self.close()
            raise
        self._sock.settimeout(request_timeout)

    def request(self, request: Request) -> Any:
        return self.receive(self.send(request), request)

    def send(self, request: Request) -> int:
        """Send a request and return its id; read the reply with ``receive`` before sending another."""
        self._next_id += 1
        request_id = self._next_id
        body = self._packer.pack([request_id, request.op, *request.args])
        if len(body) > protocol.MAX_FRAME_SIZE:
            raise request_size_error(request, len(body))
        header = protocol.HEADER.pack(len(body))
        self.awaiting_reply = True
        try:
            if len(body) < 65536:
                self._sock.sendall(header + body)
            else:
                self._sock.sendall(header)
                self._sock.sendall(body)
        except OSError as exc:
            self.close()
            raise _NotSent from exc
        return request_id

    def receive(self, request_id: int, request: Request) -> Any:
        """Wait for the reply to ``request``, sent with id ``request_id``, and return its result."""
        op = request.op
        while True:
            try:
                for body in self._reader.frames():
                    reply = protocol.decode_body(body)
                    if not isinstance(reply, list) or not reply:
                        raise protocol.MalformedFrame("a reply must be an array of [request id, status, result]")
                    if reply[0] == request_id:
                        self.awaiting_reply = False
                        return reply_result(reply, request_id)
                    if reply[0] == 0:
                        self.close()  # the daemon rejected the connection as a whole
                        return reply_result(reply, 0)
            except (protocol.MalformedFrame, protocol.FrameTooLarge) as exc:
                self.close()
                raise ProtocolError(
                    f"the daemon sent an invalid reply to {op} ({exc}); restart it with `sharedict stop`"
                ) from exc
            try:
                data = self._sock.recv(RECV_SIZE)
            except TimeoutError:
                self.close()
                timeout = self._sock.gettimeout() or HANDSHAKE_TIMEOUT
                raise reply_timeout_error(self.socket_path, request, timeout) from None
            except OSError as exc:
                self.close()
                raise _ReplyLost from exc
            if not data:
                self.close()
                raise _ReplyLost
            self._reader.feed(data)

    def close(self) -> None:
        self.closed = True
        self._sock.close()


class Client:
    """Connections to the daemon of one socket path, shared by every handle that uses it.

    Thread-safe and fork-safe. ``Client.default()`` is the client of the settings in the
    environment.

    ``request_timeout`` bounds the wait for each reply of a blocking request, including
    the wait of a ``Lock.acquire``, so a lock's timeout longer than it fails early with
    ``DaemonUnavailableError``. Async calls and the connection handshake ignore it.
    """

    _default: Client | None = None
    _default_lock = threading.Lock()

    def __init__(self, settings: Settings | None = None, *, request_timeout: float | None = None) -> None:
        self.settings = settings or Settings.from_environ()
        # A path too long for a Unix socket fails only at connect(), with an error that names no fix.
        check_socket_path(self.settings.socket_path)
        self.request_timeout = request_timeout
        self._lock = threading.Lock()
        self._idle: list[SyncConnection] = []
        self._pid = os.getpid()
        self._async_connections: Any = None  # created by the async transport on first use

    @classmethod
    def default(cls) -> Client:
        client = cls._default
        if client is None:
            with cls._default_lock:
                client = cls._default
                if client is None:
                    client = cls._default = cls()
        return client

    # Blocking requests.

    def call(self, request: Request) -> Any:
        """Send a request and return its result, reconnecting where that is safe."""
        for attempt in range(3):
            conn = self._checkout()
            try:
                result = conn.request(request)
            except _NotSent:
                # The daemon went away. The idle connections lead to the same daemon, so
                # drop them all: otherwise each of them would use up one more attempt.
                self.close()
                continue
            except _ReplyLost:
                self.close()
                if request.write:
                    raise lost_write_error(request) from None
                continue
            except BaseException:
                # An error reply read whole leaves the connection clean, so it is kept:
                # closing the process's last connection makes the daemon check whether
                # the process still runs, to delete its ephemeral dicts once it exits.
                if conn.awaiting_reply:
                    conn.close()  # a half-read reply would confuse the next request
                else:
                    self._checkin(conn)
                raise
            self._checkin(conn)
            return result
        raise DaemonUnavailableError(f"the daemon on {self.settings.socket_path} closed every connection; check its log")

    def start(self, request: Request) -> PendingRead:
        """Send a read now and return its pending reply, so that the caller works meanwhile."""
        return PendingRead(self, request)

    def _checkout(self) -> SyncConnection:
        if self._pid != os.getpid():
            self._after_fork()
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
        return self._connect()

    def _checkin(self, conn: SyncConnection) -> None:
        if conn.closed or conn.pid != os.getpid():
            return
        with self._lock:
            if len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def _after_fork(self) -> None:
        # The parent's sockets stay open in the parent: only forget them here. Closing a
        # copied descriptor does not touch the parent's connection.
        self._lock = threading.Lock()
        for conn in self._idle:
            conn.closed = True
        self._idle = []
        self._async_connections = None
        self._pid = os.getpid()

    def _connect(self) -> SyncConnection:
        """Open a connection, starting the daemon when none runs and auto-start is on."""
        attempts = ConnectAttempts(self.settings, time.monotonic())
        while True:
            try:
                return SyncConnection(self.settings.socket_path, self.request_timeout)
            except (ConnectionResetError, BrokenPipeError) as exc:
                attempts.handshake_reset(exc, time.monotonic())
                time.sleep(RECONNECT_PAUSE)
                continue
            except OSError as exc:
                attempts.connect_failed(exc)
            start_daemon(self.settings, self.daemon_is_up)
            attempts.started = True

    def daemon_is_up(self) -> bool:
        """Return whether a daemon accepts connections on the socket."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.settings.socket_path)
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def close(self) -> None:
        """Close the idle connections; later calls open new ones."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def check_client(client: Any) -> Client | None:
    """Return ``client`` if it is a ``Client`` or None; raise ``TypeError`` otherwise."""
    if client is None or isinstance(client, Client):
        return client
    raise TypeError(
        f"client={client!r} is not a sharedict Client; pass a Client(Settings(...)) or leave it out "
        "to use the default one"
    )


def _forget_default_client_after_fork() -> None:
    # A child process gets a default client of its own. Checking the pid in default()
    # instead would cost a system call on every call of every handle.
    Client._default = None
    Client._default_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_default_client_after_fork)


class PendingRead:
    """A read sent ahead on a connection of its own, whose reply is read when it is needed.

    Only reads go ahead: a read whose connection broke is sent again by ``result()``,
    which a write must never be. Call ``result()`` or ``cancel()`` once, from the thread
    that started the read.
    """

    __slots__ = ("_client", "_request", "_conn", "_request_id")

    def __init__(self, client: Client, request: Request) -> None:
        if request.write:
            raise ValueError(f"{request.op} is a write; only reads can be sent ahead of their reply")
        self._client = client
        self._request = request
        self._conn: SyncConnection | None = None
        self._request_id = 0
        try:
            conn = client._checkout()
        except Exception:
            return  # result() connects again, and raises the error to the operation if it recurs
        try:
            self._request_id = conn.send(request)
        except _NotSent:
            return  # result() sends it again
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def result(self) -> Any:
        """Wait for the reply and return its result, or raise the error that it carries."""
        conn, self._conn = self._conn, None
        if conn is None or conn.pid != os.getpid():
            # The read was not sent, or it was sent by the parent of this forked process.
            return self._client.call(self._request)
        try:
            result = conn.receive(self._request_id, self._request)
        except _ReplyLost:
            self._client.close()
            return self._client.call(self._request)
        except BaseException:
            if conn.awaiting_reply:
                conn.close()
            else:
                self._client._checkin(conn)  # an error reply, read whole
            raise
        self._client._checkin(conn)
        return result

    def cancel(self) -> None:
        """Drop the reply, and keep the connection for later requests.

        The reply is read and dropped rather than the connection closed, so that the
        next request finds the connection open instead of connecting again.
        """
        conn, self._conn = self._conn, None
        if conn is None or conn.pid != os.getpid():
            return
        try:
            conn.receive(self._request_id, self._request)
        except Exception:
            pass  # the result is not needed, and a connection that broke has closed itself
        except BaseException:
            conn.close()  # a half-read reply would confuse the next request
            raise
        self._client._checkin(conn)
