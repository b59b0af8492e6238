"""The daemon: one process per data directory that serves the engine on a Unix socket.

``Server.run()`` takes the data directory's lock and the socket's lock, opens the store,
starts the writer and the sweeper, and accepts connections until SIGTERM, SIGINT, SIGHUP
or a ``shutdown`` request. Stopping finishes the commits in flight before the process exits.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import selectors
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from sharedict import __version__
from sharedict.api import protocol
from sharedict.api.autostart import process_running
from sharedict.api.config import Settings
from sharedict.daemon import security
from sharedict.daemon.connection import Connection
from sharedict.daemon.handlers import Handlers
from sharedict.daemon.locks import LockService
from sharedict.engine import GroupCommitWriter, Store
from sharedict.engine.layout import Touch
from sharedict.engine.sweeper import Sweeper

logger = logging.getLogger(__name__)

# How long the accept loop pauses when it runs out of file descriptors or threads.
ACCEPT_RETRY_DELAY = 0.1
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

# Signals that stop the daemon gracefully. SIGHUP comes when the terminal of a
# foreground daemon closes.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

ExtraOperation = Callable[[Connection, int, list[Any]], "bytes | None"]


# Seconds between checks that each connection's process is still alive.
PEER_CHECK_INTERVAL = 1.0


def _leave_to_accept_loop(signum: int, frame: object) -> None:
    """Do nothing: the accept loop reads the signal from the wakeup pipe and stops."""


class Server:
    """The daemon's state: the store, its writer and sweeper, and the open connections."""

    def __init__(self, settings: Settings) -> None:
        if not math.isfinite(settings.sweep_interval) or settings.sweep_interval <= 0:
            raise security.SetupError(
                f"sweep interval {settings.sweep_interval} s is invalid; give a finite positive number of seconds"
            )
        if not math.isfinite(settings.expire_after) or settings.expire_after < 0:
            raise security.SetupError(
                f"expire_after {settings.expire_after} s is invalid; give 0 (no expiry) or a finite number of seconds"
            )
        self.settings = settings
        self.started_at = time.time()
        self.store: Store
        self.writer: GroupCommitWriter
        self.sweeper: Sweeper
        self.handlers: Handlers
        self.locks: LockService
        self._connections: dict[int, Connection] = {}
        self._connections_lock = threading.Lock()
        # Processes that closed their last connection while still running: their
        # ephemeral dicts go once they exit, as the peer watcher finds out.
        self._disconnected_pids: set[int] = set()
        self._extra_operations: dict[str, ExtraOperation] = {}
        self._wakeup_read, self._wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = threading.Event()
        self._accept_failing = False

    # Life cycle.

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until stopped; raise ``SetupError`` when another daemon runs or a check fails.

        ``on_ready`` is called once the socket accepts connections. In the main thread,
        run() takes SIGTERM, SIGINT and SIGHUP as stop requests, and leaves them ignored
        when it returns, since the process is then about to exit.
        """
        settings = self.settings
        security.prepare_private_dir(settings.data_dir, "data directory")
        security.prepare_socket_dir(settings.socket_path)
        for path in security.restrict_data_files(settings.data_dir):
            logger.warning("%s was open to other users; its mode is now private to its owner", path)

        with contextlib.ExitStack() as stack:
            # First, so that a signal during start-up waits in the wakeup pipe instead of
            # killing the daemon with its socket bound. Its exit callbacks run last.
            self._install_signal_handlers(stack)
            data_lock = os.path.join(settings.data_dir, "daemon.lock")
            stack.enter_context(security.exclusive_lock(data_lock, settings.data_dir, settings.socket_path))
            socket_lock = settings.socket_path + ".lock"
            stack.enter_context(security.exclusive_lock(socket_lock, settings.socket_path, settings.socket_path))

            self.store = Store(settings.data_dir, expire_after=settings.expire_after)
            stack.callback(self.store.close)
            self.writer = GroupCommitWriter(self.store)
            self.writer.start()
            self.sweeper = Sweeper(self.store, self.writer, settings.sweep_interval, on_idle=self.reap_ephemeral_dicts)
            self.handlers = Handlers(self)
            self.locks = LockService(self.store, self.writer)
            self.locks.start()
            self.reap_ephemeral_dicts()
            self.sweeper.start()
            threading.Thread(target=self._watch_peers, name="sharedict-peers", daemon=True).start()

            listener = security.bind_socket(settings.socket_path)
            stack.callback(self._remove_socket, settings.socket_path)
            stack.callback(listener.close)
            self.register_operation(protocol.SHUTDOWN, self._shutdown_request)
            for op, handler in self.locks.operations.items():
                self.register_operation(op, handler)
            logger.info(
                "sharedict %s serving pid=%d socket=%s data_dir=%s expire_after=%s",
                __version__,
                os.getpid(),
                settings.socket_path,
                settings.data_dir,
                settings.expire_after,
            )
            if on_ready is not None:
                on_ready()
            self._accept_loop(listener)
            # Close the listener at once, so that new clients are refused instead of
            # waiting in its backlog for a daemon that will never accept them.
            listener.close()
            self._shutdown()
        logger.info("sharedict stopped pid=%d", os.getpid())

    def stop(self) -> None:
        """Ask the accept loop to stop; safe from any thread."""
        self._stopping.set()
        with contextlib.suppress(BlockingIOError):
            os.write(self._wakeup_write, b"x")

    def _install_signal_handlers(self, stack: contextlib.ExitStack) -> None:
        """Make the stop signals stop the accept loop, whichever thread catches them.

        The kernel delivers a process's signal to any of its threads, and Python runs the
        handler later in the main thread, which sleeps in select() meanwhile. So the
        handlers do nothing, and Python writes each signal's number to the wakeup pipe.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        previous_fd = signal.set_wakeup_fd(self._wakeup_write, warn_on_full_buffer=False)
        stack.callback(signal.set_wakeup_fd, previous_fd)
        for signum in STOP_SIGNALS:
            # nohup, and shells for background jobs, ignore SIGHUP or SIGINT so that a
            # closing terminal or a Ctrl-C leaves the daemon running. The daemon keeps that.
            if signum != signal.SIGTERM and signal.getsignal(signum) == signal.SIG_IGN:
                continue
            signal.signal(signum, _leave_to_accept_loop)
            # Once run() returns, the process exits, and a late signal must not end it
            # halfway with the default action, so the signal is ignored from then on.
            stack.callback(signal.signal, signum, signal.SIG_IGN)

        # A daemon inherits the signal mask of the program that started it, which may
        # block SIGTERM. The threads started later inherit the mask set here.
        previous_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        stack.callback(signal.pthread_sigmask, signal.SIG_SETMASK, previous_mask)

    def _accept_loop(self, listener: socket.socket) -> None:
        listener.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(self._wakeup_read, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is not listener:
                        self._read_wakeups()
                    elif not self._accept(listener):
                        # The listener stays readable while the daemon is out of file
                        # descriptors or threads, so wait for connections to close
                        # instead of spinning on it.
                        self._stopping.wait(ACCEPT_RETRY_DELAY)

    def _read_wakeups(self) -> None:
        """Empty the wakeup pipe, and stop if it carries the number of a stop signal."""
        with contextlib.suppress(BlockingIOError):
            while wakeups := os.read(self._wakeup_read, 512):
                for signum in STOP_SIGNALS:
                    if signum in wakeups:
                        logger.info("received %s; stopping", signum.name)
                        self._stopping.set()

    def _accept(self, listener: socket.socket) -> bool:
        """Accept the waiting connections; return False when out of resources to serve them."""
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return True
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                self._accept_failed(f"cannot accept a connection: {exc}")
                return False

            sock.setblocking(True)
            pid, uid, _ = security.peer_credentials(sock)
            if uid != os.getuid():
                logger.warning("rejected a connection from pid %d of uid %d; only uid %d may connect", pid, uid, os.getuid())
                sock.close()
                continue

            conn = Connection(self, sock, pid, uid)
            with self._connections_lock:
                self._connections[conn.id] = conn
            try:
                conn.thread.start()
            except RuntimeError as exc:  # the system refused another thread
                with self._connections_lock:
                    del self._connections[conn.id]
                sock.close()
                self._accept_failed(f"cannot start a thread for connection {conn.id} of pid {pid}: {exc}")
                return False

            if self._accept_failing:
                self._accept_failing = False
                logger.info("accepting connections again")

    def _accept_failed(self, message: str) -> None:
        # Warn once per spell of failures: the retries come every ACCEPT_RETRY_DELAY.
        if not self._accept_failing:
            self._accept_failing = True
            logger.warning("%s; new clients wait until connections close", message)

    def _shutdown(self) -> None:
        logger.info("stopping: finishing the commits in flight")
        self.sweeper.stop()
        self.locks.stop()
        with self._connections_lock:
            connections = list(self._connections.values())

        # Read no more requests, but finish those already read while the writer still
        # runs, so that each of their writes is committed and acknowledged, not refused.
        for conn in connections:
            conn.stop_reading()
        for conn in connections:
            conn.thread.join(timeout=5)

        self.writer.stop()
        for conn in connections:
            conn.close()

    def _shutdown_request(self, conn: Connection, request_id: int, args: list[Any]) -> bytes:
        logger.info("shutdown requested by pid %d", conn.pid)
        self.stop()
        return protocol.encode_frame_bytes([request_id, protocol.STATUS_OK, None])

    @staticmethod
    def _remove_socket(socket_path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)

    # Services for connections and handlers.

    def connection_closed(self, conn: Connection) -> None:
        self.locks.connection_closed(conn)
        with self._connections_lock:
            self._connections.pop(conn.id, None)
            pid_still_connected = any(other.pid == conn.pid for other in self._connections.values())
        if pid_still_connected or self._stopping.is_set():
            return
        # A running process may close every connection, after a timeout for example, and
        # still use its ephemeral dicts on a new one. The socket of an exiting process
        # closes before its process is gone, so the check is repeated by the watcher.
        if process_running(conn.pid):
            with self._connections_lock:
                self._disconnected_pids.add(conn.pid)
        else:
            self._delete_ephemeral_dicts(lambda owner_pid: owner_pid == conn.pid)

    def _watch_peers(self) -> None:
        """Close the connections of processes that have exited.

        A forked child inherits its parent's sockets, so a connection can outlive the
        process that opened it. The parent's locks and ephemeral dicts must still go
        when the parent dies, so a connection ends with the process that opened it.
        """
        while not self._stopping.wait(PEER_CHECK_INTERVAL):
            with self._connections_lock:
                connections = list(self._connections.values())
                connected = {conn.pid for conn in connections}
                self._disconnected_pids -= connected
                exited = {pid for pid in self._disconnected_pids if not process_running(pid)}
                self._disconnected_pids -= exited
            for conn in connections:
                if not process_running(conn.pid):
                    logger.info("closing connection %d: its process %d has exited", conn.id, conn.pid)
                    conn.disconnect()
            if exited:
                # The writer runs the check later, after the next pass may have rebound
                # ``exited``, so the check keeps this pass's set.
                self._delete_ephemeral_dicts(exited.__contains__)

    def reap_ephemeral_dicts(self) -> None:
        """Delete the ephemeral dicts of processes that have gone away."""
        with self._connections_lock:
            connected = {conn.pid for conn in self._connections.values()}

        def gone(owner_pid: int) -> bool:
            return owner_pid not in connected and not process_running(owner_pid)

        self._delete_ephemeral_dicts(gone)

    def _delete_ephemeral_dicts(self, should_delete: Callable[[int], bool]) -> None:
        def write(txn: Any) -> int:
            deleted = 0
            for record in self.store.ephemeral_dicts(txn):
                if should_delete(record.owner_pid):
                    self.store.delete_dict(txn, record.object_id)
                    deleted += 1
            return deleted

        def done(deleted: Any, error: BaseException | None) -> None:
            if error is not None:
                logger.error("deleting ephemeral dicts failed: %r", error)
            elif deleted:
                logger.info("deleted %d ephemeral dicts of processes that are gone", deleted)

        with contextlib.suppress(Exception):
            self.writer.submit(write, done)

    def record_access(self, touch: Touch) -> None:
        """Queue the access a read found due; nobody waits for it."""
        with contextlib.suppress(Exception):
            self.writer.submit(lambda txn: self.store.touch(txn, touch))

    def register_operation(self, op: str, handler: ExtraOperation) -> None:
        """Add an operation served outside the store, such as the lock service."""
        self._extra_operations[op] = handler

    def extra_operation(self, op: str) -> ExtraOperation | None:
        return self._extra_operations.get(op)

    def hello_info(self) -> dict[str, Any]:
        return {"protocol": protocol.PROTOCOL_VERSION, "version": __version__, "pid": os.getpid()}

    def status(self) -> dict[str, Any]:
        with self.store.reader() as txn:
            dict_count = self.store.count_dicts(txn)
            entry_count = self.store.count_entries(txn)
        data_bytes = sum(
            os.path.getsize(os.path.join(self.settings.data_dir, name))
            for name in ("data.mdb", "lock.mdb")
            if os.path.exists(os.path.join(self.settings.data_dir, name))
        )
        with self._connections_lock:
            connection_count = len(self._connections)
        return {
            "pid": os.getpid(),
            "version": __version__,
            "started_at": self.started_at,
            "uptime": time.time() - self.started_at,
            "socket_path": self.settings.socket_path,
            "data_dir": self.settings.data_dir,
            "data_bytes": data_bytes,
            "disk_free_bytes": shutil.disk_usage(self.settings.data_dir).free,
            "dicts": dict_count,
            "entries": entry_count,
            "connections": connection_count,
            "expire_after": self.settings.expire_after,
            "sweep_interval": self.settings.sweep_interval,
            "last_sweep_at": self.sweeper.last_sweep_at,
            "swept_entries": self.sweeper.swept_entries,
            "commits": self.writer.commits,
            "writes": self.writer.writes,
            "locks": self.locks.status(),
        }
