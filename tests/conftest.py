"""Fixtures: a real daemon on a temporary socket and data directory for each test.

No test may reach the user's default socket or data directory. The session starts by
pointing ``SHAREDICT_SOCKET`` and ``SHAREDICT_DATA_DIR`` at a throwaway directory, and
turns auto-start off, so a test that forgets the ``daemon`` fixture fails instead of
starting a daemon of its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from helpers import STOP_TIMEOUT, launch_daemon, read_log, serve_command
from sharedict.api.config import Settings
from sharedict.api.transport import Client

settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("default")

_session_dir = tempfile.mkdtemp(prefix="sd-session-", dir="/tmp")
os.environ["SHAREDICT_SOCKET"] = os.path.join(_session_dir, "unused", "sharedict.sock")
os.environ["SHAREDICT_DATA_DIR"] = os.path.join(_session_dir, "unused-data")
os.environ["SHAREDICT_AUTOSTART"] = "0"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_session_dir, ignore_errors=True)


class Daemon:
    """A ``sharedict serve`` process of the test's own, which the test may kill and restart.

    ``env`` holds the variables that point a client, or a child process, at it.
    """

    def __init__(self, root: Path, extra_args: list[str]) -> None:
        # Unix socket paths are limited to 107 bytes, so the socket gets a short
        # directory of its own instead of pytest's long tmp_path.
        self.socket_dir = tempfile.mkdtemp(prefix="sd-", dir="/tmp")
        self.socket_path = os.path.join(self.socket_dir, "sharedict.sock")
        self.data_dir = str(root / "data")
        self.log_path = str(root / "daemon.log")
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self.env = {
            "SHAREDICT_SOCKET": self.socket_path,
            "SHAREDICT_DATA_DIR": self.data_dir,
            "SHAREDICT_AUTOSTART": "0",
        }
        self._clients: list[Client] = []

    def start(self) -> None:
        command = serve_command(self.socket_path, self.data_dir, "--log-level", "DEBUG", *self.extra_args)
        self.process = launch_daemon(command, self.socket_path, self.log_path)

    def stop(self) -> None:
        """Stop gracefully with SIGTERM and wait for the exit.

        A daemon still running after STOP_TIMEOUT is killed, and RuntimeError shows its log.
        """
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"the daemon did not stop within {STOP_TIMEOUT} s of SIGTERM:\n{self.log()}") from None

    def kill(self) -> None:
        """Kill with SIGKILL, leaving the stale socket file behind, as a crash does."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def restart(self, *, crash: bool = False) -> None:
        if crash:
            self.kill()
        else:
            self.stop()
        self.start()

    def client(self, **overrides: object) -> Client:
        """Return a client of this daemon; it is closed at the end of the test."""
        fields = {"socket_path": self.socket_path, "data_dir": self.data_dir, "autostart": False, **overrides}
        client = Client(Settings(**fields))  # type: ignore[arg-type]
        self._clients.append(client)
        return client

    def log(self) -> str:
        return read_log(self.log_path)

    def close(self) -> None:
        for client in self._clients:
            client.close()
        try:
            self.stop()
        finally:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


@pytest.fixture
def daemon_args() -> list[str]:
    """Extra ``sharedict serve`` flags; override this fixture to change them."""
    return []


def _serve(root: Path, daemon_args: list[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    handle = Daemon(root, daemon_args)
    for name, value in handle.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(Client, "_default", None)
    handle.start()
    try:
        yield handle
    finally:
        default = Client._default
        if default is not None:
            default.close()
        handle.close()


@pytest.fixture
def daemon(tmp_path: Path, daemon_args: list[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """A running daemon, also set as the default of this process and of its children."""
    yield from _serve(tmp_path, daemon_args, monkeypatch)


@pytest.fixture(scope="module")
def module_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for all tests of a module, which saves a daemon start per test.

    A module opts in by overriding ``daemon`` with it; its tests must then use dicts of
    their own, for example under unique names.
    """
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield from _serve(tmp_path_factory.mktemp("daemon"), [], monkeypatch)


@pytest.fixture
def other_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A second running daemon, which the environment does not point at."""
    root = tmp_path / "other"
    root.mkdir()
    handle = Daemon(root, [])
    handle.start()
    try:
        yield handle
    finally:
        handle.close()


@pytest.fixture
def child_env(daemon: Daemon) -> dict[str, str]:
    """The environment for a child process that uses the test's daemon."""
    return {**os.environ, **daemon.env}
