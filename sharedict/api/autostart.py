"""Starting a daemon in the background when no daemon answers on the socket.

Any number of processes may find the socket dead at the same moment. They take turns
through a lock file beside the socket: the first starts a daemon and waits until it
accepts connections, the others then find it running. The daemon itself also holds a lock
on its data directory, so even processes that bypass this lock end with one daemon.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from sharedict.api.config import Settings
from sharedict.api.errors import DaemonUnavailableError

logger = logging.getLogger(__name__)

START_TIMEOUT = 30.0
LOG_NAME = "daemon.log"

# Exit status of ``sharedict serve`` when another daemon already serves the data directory.
EXIT_ALREADY_RUNNING = 3


@contextlib.contextmanager
def _autostart_lock(socket_path: str, timeout: float) -> Iterator[None]:
    lock_path = socket_path + ".autostart"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DaemonUnavailableError(
                        f"timed out after {timeout:.0f} s waiting for another process to start the daemon "
                        f"on {socket_path}; see {LOG_NAME} in the data directory"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


def start_daemon(settings: Settings, is_up: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
    """Start a detached daemon for ``settings`` unless ``is_up()`` finds one running.

    Returns once the daemon accepts connections; raises ``DaemonUnavailableError`` with
    the end of the daemon's log when it fails to start.
    """
    socket_dir = os.path.dirname(settings.socket_path)
    os.makedirs(socket_dir, mode=0o700, exist_ok=True)
    os.makedirs(settings.data_dir, mode=0o700, exist_ok=True)
    log_path = os.path.join(settings.data_dir, LOG_NAME)

    with _autostart_lock(settings.socket_path, timeout):
        if is_up():
            return
        command = [
            sys.executable,
            "-m",
            "sharedict",
            "serve",
            "--detach",
            "--socket",
            settings.socket_path,
            "--data-dir",
            settings.data_dir,
            "--expire-after",
            repr(settings.expire_after),
            "--sweep-interval",
            repr(settings.sweep_interval),
        ]
        logger.debug("starting the daemon: %s", command)
        with open(log_path, "ab") as log:
            # --detach forks the daemon and exits once it serves, so this waits only for
            # the start-up, and no zombie is left behind.
            completed = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                close_fds=True,
                timeout=timeout,
                check=False,
            )
        if completed.returncode not in (0, EXIT_ALREADY_RUNNING):
            raise DaemonUnavailableError(
                f"the sharedict daemon failed to start (exit status {completed.returncode}):\n"
                f"{_log_tail(log_path)}\nfull log: {log_path}"
            )

        deadline = time.monotonic() + timeout
        while not is_up():
            if time.monotonic() > deadline:
                raise DaemonUnavailableError(
                    f"the sharedict daemon did not answer on {settings.socket_path} within {timeout:.0f} s; "
                    f"see {log_path}"
                )
            time.sleep(0.005)


def _log_tail(log_path: str, lines: int = 5) -> str:
    try:
        with open(log_path, "rb") as log:
            log.seek(max(0, os.path.getsize(log_path) - 4096))
            tail = log.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(tail[-lines:])
