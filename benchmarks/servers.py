"""The servers a benchmark talks to: a sharedict daemon and redis-server, each its own.

Every server runs on a Unix socket in a temporary directory that this suite created, so
the suite never reaches a server it did not start. ``Servers`` starts them on first use
and stops all of them when its ``with`` block exits, whatever happened inside it. On
Linux each server also gets SIGTERM when the suite's process dies, so even a killed suite
leaves no server behind. Under strace it is strace that gets that SIGTERM, and
``durability.strace_command`` makes it reach the server too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

# prctl(PR_SET_PDEATHSIG, sig): the kernel sends sig to this process when its parent dies.
_PR_SET_PDEATHSIG = 1


def redis_server_path() -> str | None:
    """Return the path of redis-server, or None when it is not installed."""
    return shutil.which("redis-server")


def _die_with_parent() -> None:
    # Runs in the child between fork and exec.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _socket_accepts(socket_path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(socket_path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def traced_pid(tracer_pid: int, executable: str) -> int:
    """Return the pid of the program that a tracer such as strace started as its child.

    The tracer's child is found by its executable, because strace forks short-lived test
    children of its own at start-up.
    """
    expected = os.path.realpath(executable)
    children_file = Path(f"/proc/{tracer_pid}/task/{tracer_pid}/children")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for child in children_file.read_text().split():
            with contextlib.suppress(OSError):
                if os.path.realpath(f"/proc/{child}/exe") == expected:
                    return int(child)
        time.sleep(0.01)
    raise RuntimeError(f"the tracer with pid {tracer_pid} did not start {executable} within {START_TIMEOUT} s")


class Server:
    """A server process on a Unix socket in a temporary directory of its own.

    ``wrapper`` is a command to run the server under, such as ``strace``; ``pid`` is then
    the pid of the server itself, not of the wrapper.
    """

    name = "server"

    def __init__(self, root: str, wrapper: list[str] | None = None) -> None:
        # Unix socket paths are limited to 107 bytes, so the socket gets a short directory.
        self.socket_dir = tempfile.mkdtemp(prefix="bench-", dir="/tmp")
        self.socket_path = os.path.join(self.socket_dir, f"{self.name}.sock")
        self.data_dir = tempfile.mkdtemp(prefix=f"{self.name}-", dir=root)
        self.log_path = os.path.join(self.data_dir, "server.log")
        self.wrapper = list(wrapper or [])
        self.process: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        command = self.command()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.wrapper, *command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self.pid = traced_pid(self.process.pid, command[0]) if self.wrapper else self.process.pid

        deadline = time.monotonic() + START_TIMEOUT
        while not _socket_accepts(self.socket_path):
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not accept connections within {START_TIMEOUT} s:\n{self.log()}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop with SIGTERM, then SIGKILL if the server has not exited after STOP_TIMEOUT."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            # Signal the server itself: a wrapper such as strace exits when its program does.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                process.kill()
                process.wait()
        if self.pid != process.pid:
            # The wrapper is gone; its program must not outlive it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.process = None
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return "(no log)"


class SharedictServer(Server):
    """``sharedict serve`` on a temporary socket and data directory."""

    name = "sharedict"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "sharedict",
            "serve",
            "--socket",
            self.socket_path,
            "--data-dir",
            os.path.join(self.data_dir, "data"),
            "--log-level",
            "WARNING",
        ]


class RedisServer(Server):
    """redis-server with an append-only file, fsynced as ``appendfsync`` says.

    ``always`` fsyncs the file before each write is acknowledged, ``everysec`` once a
    second in a background thread. RDB snapshots are off, so the AOF is the only
    persistence, and no TCP port is opened.
    """

    name = "redis"

    def __init__(self, root: str, appendfsync: str, wrapper: list[str] | None = None) -> None:
        if appendfsync not in ("always", "everysec"):
            raise ValueError(f"appendfsync {appendfsync!r} is invalid; use 'always' or 'everysec'")
        super().__init__(root, wrapper)
        self.appendfsync = appendfsync

    def command(self) -> list[str]:
        executable = redis_server_path()
        if executable is None:
            raise RuntimeError("redis-server is not installed; install it with `apt-get install -y redis-server`")
        return [
            executable,
            "--port",
            "0",
            "--unixsocket",
            self.socket_path,
            "--unixsocketperm",
            "700",
            "--dir",
            self.data_dir,
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]


class Servers:
    """The servers of one workload, started on first use and stopped together.

    Each workload gets fresh servers, so that data and memory left by one workload never
    change the figures of the next.
    """

    def __init__(self, root: str, wrapper: list[str] | None = None) -> None:
        self.root = root
        self.wrapper = wrapper
        self._sharedict: SharedictServer | None = None
        self._redis: dict[str, RedisServer] = {}

    def sharedict(self) -> SharedictServer:
        if self._sharedict is None:
            server = SharedictServer(self.root, self.wrapper)
            self._sharedict = server
            server.start()
        return self._sharedict

    def redis(self, appendfsync: str) -> RedisServer:
        if appendfsync not in self._redis:
            server = RedisServer(self.root, appendfsync, self.wrapper)
            self._redis[appendfsync] = server
            server.start()
        return self._redis[appendfsync]

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        servers: list[Server] = [*self._redis.values()]
        if self._sharedict is not None:
            servers.append(self._sharedict)
        self._sharedict = None
        self._redis = {}
        for server in servers:
            server.stop()
