"""Starting a daemon in the background when no daemon answers on the socket.

Any number of processes may find the socket dead at the same moment. They take turns
through a lock file beside the socket: the first starts a daemon and waits until it
accepts connections, the others then find it running. The daemon itself also holds a lock
on its data directory, so even processes that bypass this lock end with one daemon.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from sharedict.api.config import AUTOSTART_OFF, Settings
from sharedict.api.errors import DaemonUnavailableError

logger = logging.getLogger(__name__)

START_TIMEOUT = 30.0
LOG_NAME = "daemon.log"

# Exit status of ``sharedict serve`` when another daemon already serves the data directory.
EXIT_ALREADY_RUNNING = 3


@contextlib.contextmanager
def _autostart_lock(socket_path: str, timeout: float) -> Iterator[None]:
    lock_path = socket_path + ".autostart"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
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


def _prepare_directories(settings: Settings) -> None:
    """Create the socket and data directories, or check them as the daemon will.

    The checks come before this process writes its lock file and the daemon's log there.
    In a directory that others may write to, either file could be a symlink planted to
    make this process write to a file of someone else's choice.
    """
    from sharedict.daemon.security import SetupError, prepare_private_dir, prepare_socket_dir

    try:
        prepare_socket_dir(settings.socket_path)
        prepare_private_dir(settings.data_dir, "data directory")
    except SetupError as exc:
        raise DaemonUnavailableError(f"cannot start the sharedict daemon: {exc}") from None


def start_daemon(settings: Settings, is_up: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
    """Start a detached daemon for ``settings`` unless ``is_up()`` finds one running.

    Returns once the daemon accepts connections; raises ``DaemonUnavailableError`` with
    the end of the daemon's log when it fails to start.
    """
    _prepare_directories(settings)
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
        try:
            log_fd = open_daemon_log(settings.data_dir)
        except OSError as exc:
            raise DaemonUnavailableError(
                f"cannot start the sharedict daemon: cannot open its log {log_path}: {exc.strerror}; "
                "check that the data directory is yours and writable, and that the log is a regular file"
            ) from None
        with open(log_fd, "ab") as log:
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


def open_daemon_log(data_dir: str) -> int:
    """Open the daemon's log in ``data_dir`` for appending, private to its owner; return the descriptor.

    Raises OSError when the log cannot be opened or is not a regular file.
    """
    path = os.path.join(data_dir, LOG_NAME)
    # O_NOFOLLOW: a symlink planted in the data directory must not redirect the writes.
    # O_NONBLOCK: opening a FIFO planted there must fail instead of waiting for a reader.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    fd = os.open(path, flags, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    os.set_blocking(fd, True)
    return fd


def no_daemon_error(settings: Settings) -> DaemonUnavailableError:
    """Return the error of a client that found no daemon and may not start one."""
    value = os.environ.get("SHAREDICT_AUTOSTART", "")
    if value.strip().lower() in AUTOSTART_OFF:
        fix = f"or set SHAREDICT_AUTOSTART=1 (it is {value!r}) to let clients start it"
    else:
        # The environment allows auto-start, so the code that made the client turned it off.
        fix = "or give the client Settings(autostart=True) to let it start one"
    return DaemonUnavailableError(
        f"no sharedict daemon is running on {settings.socket_path}; start one with `sharedict serve --detach`, {fix}"
    )


def _log_tail(log_path: str, lines: int = 5) -> str:
    try:
        with open(log_path, "rb") as log:
            log.seek(max(0, os.path.getsize(log_path) - 4096))
            tail = log.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(tail[-lines:])


def process_running(pid: int) -> bool:
    """Return whether process ``pid`` exists and has not exited.

    A process that has exited but that its parent has not reaped yet (a zombie) still
    has its pid, yet it has no open socket and runs no code, so it counts as exited.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The state follows the command name, which is in parentheses and may contain any byte.
            state = stat.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc here, or it exited just now: kill() found it, so report it running
    return state not in (b"Z", b"X")

