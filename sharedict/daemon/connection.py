"""One client connection: a thread that reads requests, and a sender that never blocks.

The connection's thread blocks in ``recv``, which on this machine kind is the cheapest way
to serve a small request. Replies to reads are sent from that thread; replies to writes
are sent from the writer thread once the write is durable. No send may wait for a slow
client, so every send is non-blocking, and what the socket cannot take at once goes to a
backlog that a helper thread flushes.

Flow control keeps a client from filling the daemon's memory: while too many bytes of
its replies wait in the backlog, or too many bytes of its writes wait for the writer,
the connection's thread reads no further request. A client that pipelines requests
faster than it reads replies therefore slows down to the pace at which it reads.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import pwd
import socket
import threading
from typing import TYPE_CHECKING, Any

import msgpack

from sharedict.api import protocol
from sharedict.api.errors import CODE_BY_ERROR, ProtocolError, RequestSizeError
from sharedict.daemon.handlers import RequestError, error_code
from sharedict.engine import EngineError

if TYPE_CHECKING:
    from sharedict.daemon.server import Server

logger = logging.getLogger(__name__)

# Seconds a new connection may take to send its hello.
HANDSHAKE_TIMEOUT = 10.0
RECV_SIZE = 256 << 10
# Flow control: the connection's thread handles no further request while more than
# MAX_UNSENT_BYTES of replies wait in the backlog, or more than MAX_PENDING_WRITE_BYTES
# of request frames wait for the writer. Both are checked after a request was handled,
# so a request of any size allowed by the protocol is served.
MAX_UNSENT_BYTES = 32 << 20
MAX_PENDING_WRITE_BYTES = 256 << 20
# The replies to a run of pipelined requests are sent once they add up to this much, and
# then the flow control limits are checked.
SEND_BATCH_BYTES = 4 << 20
# A client is cut off once this much waits for it. Flow control keeps the backlog far
# below, so only replies that arrive while the client does not read can reach it.
MAX_BACKLOG_BYTES = 1 << 30
# Runs of replies smaller than this are joined and sent in one call. Larger replies are
# sent as they are, so their bytes are never copied.
JOIN_LIMIT = 64 << 10

_connection_ids = itertools.count(1)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _coalesce(buffers: list[bytes]) -> list[bytes]:
    """Join each run of small frames into one buffer.

    A batch of replies to pipelined requests then costs one send instead of one per reply.
    """
    joined: list[bytes] = []
    run: list[bytes] = []
    for buffer in buffers:
        if len(buffer) < JOIN_LIMIT:
            run.append(buffer)
            continue
        if run:
            joined.append(b"".join(run))
            run = []
        joined.append(buffer)
    if run:
        joined.append(b"".join(run))
    return joined


class Connection:
    """A client's connection, served by a thread of its own."""

    def __init__(self, server: Server, sock: socket.socket, pid: int, uid: int) -> None:
        self.server = server
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self.user_name = _user_name(uid)
        self.id = next(_connection_ids)
        self._greeted = False
        self._send_lock = threading.Lock()
        self._backlog: collections.deque[bytes | memoryview] = collections.deque()
        self._backlog_bytes = 0
        self._pending_write_bytes = 0
        # Notified whenever the backlog or the pending writes shrink, or the connection closes.
        self._caught_up = threading.Condition(self._send_lock)
        self._flushing = False
        self._closed = False
        self._draining = False
        # Only the connection's thread uses this packer: a Packer is not thread-safe, and
        # reusing one costs less than msgpack.packb() setting one up for every reply.
        self._packer = msgpack.Packer(use_bin_type=True)
        self.thread = threading.Thread(target=self.serve, name=f"sharedict-conn-{self.id}", daemon=True)

    # Receiving.

    def serve(self) -> None:
        reader = protocol.FrameReader()
        replies: list[bytes] = []
        # A connection that never says hello only holds a thread and a descriptor.
        self.sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            while not self._closed:
                data = self.sock.recv(RECV_SIZE)
                if not data:
                    return
                reader.feed(data)
                batch_bytes = 0
                for body in reader.frames():
                    reply = self._handle_frame(body)
                    if reply is not None:
                        replies.append(reply)
                        batch_bytes += len(reply)
                    if batch_bytes >= SEND_BATCH_BYTES or self._pending_write_bytes > MAX_PENDING_WRITE_BYTES:
                        self.send(replies)
                        replies = []
                        batch_bytes = 0
                        if not self._wait_for_client():
                            return
                if replies:
                    self.send(replies)
                    replies = []
                if not self._wait_for_client():
                    return
        except protocol.FrameTooLarge as exc:
            self._reject(replies, RequestSizeError, exc)
        except protocol.MalformedFrame as exc:
            self._reject(replies, ProtocolError, exc)
        except TimeoutError:
            logger.warning(
                "connection %d (pid %d) sent no hello within %s s; closing it", self.id, self.pid, HANDSHAKE_TIMEOUT
            )
        except OSError as exc:
            logger.debug("connection %d (pid %d) failed: %s", self.id, self.pid, exc)
        except Exception:
            logger.exception("connection %d (pid %d) failed", self.id, self.pid)
        finally:
            # A stopping daemon closes the connection itself, once the writes in flight
            # have been answered.
            if not self._draining:
                self.close()

    def _reject(self, replies: list[bytes], error: type[Exception], exc: Exception) -> None:
        """Answer the requests read before a bad frame, then the bad frame with request id 0.

        Request id 0 tells the client that the error concerns the whole connection,
        which the daemon closes next.
        """
        logger.warning("connection %d (pid %d): %s; closing it", self.id, self.pid, exc)
        self.send([*replies, self._error_frame(0, error, str(exc))])

    def _handle_frame(self, body: bytes) -> bytes | None:
        """Handle one request frame; return the reply frame, or None if a write will send it."""
        request = protocol.decode_body(body)
        if not isinstance(request, list) or len(request) < 2:
            raise protocol.MalformedFrame("a request must be an array of [request id, operation, arguments...]")
        request_id, op, args = request[0], request[1], request[2:]
        if not isinstance(request_id, int) or isinstance(request_id, bool) or not 0 <= request_id < 1 << 64:
            raise protocol.MalformedFrame("a request id must be an integer from 0 to 2**64-1")
        if not isinstance(op, str):
            return self._error_frame(request_id, ProtocolError, "the operation must be a string")

        if not self._greeted:
            return self._hello(request_id, op, args)

        handlers = self.server.handlers
        try:
            read = handlers.reads.get(op)
            if read is not None:
                return self._read_reply(request_id, read(self, args))
            write = handlers.writes.get(op)
            if write is not None:
                function, size = write(self, args)
                with self._send_lock:
                    self._pending_write_bytes += len(body)
                try:
                    self.server.writer.submit(function, self._reply_callback(request_id, len(body)), size, source=self)
                except BaseException:
                    self._write_done(len(body))
                    raise
                return None
            extra = self.server.extra_operation(op)
            if extra is not None:
                return extra(self, request_id, args)
            return self._error_frame(request_id, ProtocolError, f"unknown operation {op!r}")
        except (RequestError, EngineError) as exc:
            code, message = error_code(exc)
            return protocol.encode_frame_bytes([request_id, code, message])
        except Exception as exc:
            logger.exception("connection %d (pid %d): %s failed", self.id, self.pid, op)
            code, message = error_code(exc)
            return protocol.encode_frame_bytes([request_id, code, message])

    def _hello(self, request_id: int, op: str, args: list[Any]) -> bytes:
        if op != protocol.HELLO:
            return self._error_frame(request_id, ProtocolError, f"the first request must be {protocol.HELLO!r}, not {op!r}")
        version = args[0] if args else None
        # Compare the type too, since 1.0 and True are equal to 1 but no client sends them.
        if type(version) is not int or version != protocol.PROTOCOL_VERSION:
            return self._error_frame(
                request_id,
                ProtocolError,
                f"this daemon speaks protocol {protocol.PROTOCOL_VERSION} and the client speaks {version!r}; "
                "install the same sharedict version for both, or stop the daemon with `sharedict stop`",
            )
        self._greeted = True
        self.sock.settimeout(None)
        return protocol.encode_frame_bytes([request_id, protocol.STATUS_OK, self.server.hello_info()])

    def _reply_callback(self, request_id: int, frame_size: int):  # noqa: ANN202 - a closure for the writer
        def reply(result: Any, error: BaseException | None) -> None:
            if error is None:
                frame = protocol.encode_frame([request_id, protocol.STATUS_OK, result])
            else:
                if not isinstance(error, EngineError):
                    logger.error("connection %d (pid %d): write failed: %r", self.id, self.pid, error)
                code, message = error_code(error)
                frame = [protocol.encode_frame_bytes([request_id, code, message])]
            self.send(frame)
            self._write_done(frame_size)

        return reply

    def _write_done(self, frame_size: int) -> None:
        with self._caught_up:
            self._pending_write_bytes -= frame_size
            self._caught_up.notify()

    def _wait_for_client(self) -> bool:
        """Block while the client is behind: too many replies unsent, or too many writes pending.

        Returns False when the connection should handle no further request: it closed, or
        the daemon is stopping while the client is still behind.
        """
        with self._caught_up:
            while self._backlog_bytes > MAX_UNSENT_BYTES or self._pending_write_bytes > MAX_PENDING_WRITE_BYTES:
                if self._closed or self._draining:
                    return False
                self._caught_up.wait()
            return not self._closed

    def _read_reply(self, request_id: int, result: Any) -> bytes:
        body = self._packer.pack([request_id, protocol.STATUS_OK, result])
        return protocol.HEADER.pack(len(body)) + body

    @staticmethod
    def _error_frame(request_id: int, error: type[Exception], message: str) -> bytes:
        return protocol.encode_frame_bytes([request_id, CODE_BY_ERROR[error], message])

    # Sending.

    def send(self, buffers: list[bytes]) -> None:
        """Send frames without blocking; what the socket cannot take now is sent later."""
        if len(buffers) > 1:
            buffers = _coalesce(buffers)
        with self._send_lock:
            if self._closed:
                return
            if self._flushing:
                self._queue(buffers)
                return
            for index, buffer in enumerate(buffers):
                try:
                    sent = self.sock.send(buffer, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._closed = True
                    return
                if sent < len(buffer):
                    self._queue([memoryview(buffer)[sent:], *buffers[index + 1 :]])
                    self._flushing = True
                    threading.Thread(target=self._flush, name=f"sharedict-flush-{self.id}", daemon=True).start()
                    return

    def _queue(self, buffers: list[bytes | memoryview]) -> None:
        for buffer in buffers:
            self._backlog.append(buffer)
            self._backlog_bytes += len(buffer)
        if self._backlog_bytes > MAX_BACKLOG_BYTES:
            logger.warning(
                "connection %d (pid %d) has %d MiB of unread replies; closing it",
                self.id,
                self.pid,
                self._backlog_bytes >> 20,
            )
            self._closed = True
            self._backlog.clear()
            self._caught_up.notify()
            self._shutdown_socket()

    def _flush(self) -> None:
        while True:
            with self._send_lock:
                if not self._backlog or self._closed:
                    self._flushing = False
                    return
                buffer = self._backlog.popleft()
                self._backlog_bytes -= len(buffer)
                self._caught_up.notify()
            try:
                self.sock.sendall(buffer)
            except OSError:
                with self._send_lock:
                    self._closed = True
                    self._flushing = False
                    self._caught_up.notify()
                return

    # Closing.

    def _shutdown_socket(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def disconnect(self) -> None:
        """End the connection from outside its thread, which then cleans up as after a client's close."""
        self._shutdown_socket()

    def stop_reading(self) -> None:
        """Read no more requests, and keep the connection open for the replies owed.

        The client's next send fails at once, so it knows that request was not sent.
        """
        with self._caught_up:
            self._draining = True
            self._caught_up.notify()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)

    def close(self) -> None:
        """Close the connection; replies still owed to it are dropped."""
        with self._send_lock:
            if self._closed and self.sock.fileno() == -1:
                return
            self._closed = True
            self._backlog.clear()
            self._caught_up.notify()
        self._shutdown_socket()
        self.sock.close()
        self.server.connection_closed(self)
