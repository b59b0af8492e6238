"""Checks that keep other users away from the daemon's socket and data.

The socket lives in a directory that only its owner can enter, is created with mode
0600, and the daemon still checks each peer's uid; the data directory must belong to the
user who runs the daemon and must not be writable by others.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shlex
import socket
import stat
import struct
from collections.abc import Iterator

from sharedict.api.config import check_socket_path, socket_path_from_environ
from sharedict.api.errors import InvalidError


class SetupError(Exception):
    """The daemon cannot start with this socket path or data directory."""


class AlreadyRunning(SetupError):
    """Another daemon serves this data directory or socket path."""


_PEERCRED = struct.Struct("3i")


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """Return the (pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return _PEERCRED.unpack(raw)


def prepare_private_dir(path: str, what: str) -> None:
    """Create ``path`` with mode 0700, or check that an existing one is safe to use.

    A directory is safe when the current user owns it and nobody else may write to it.
    A symlink is followed only when the current user or root owns the link itself.
    """
    uid = os.getuid()
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        os.makedirs(path, mode=0o700, exist_ok=True)
        link = os.lstat(path)

    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (uid, 0):
        raise SetupError(
            f"{what} {path} is a symlink owned by uid {link.st_uid}; "
            "point the setting at a directory of your own"
        )
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise SetupError(f"{what} {path} is not a directory; choose another path")
    if info.st_uid != uid:
        raise SetupError(
            f"{what} {path} is owned by uid {info.st_uid}, not by you (uid {uid}); "
            "use a directory of your own"
        )
    if info.st_mode & 0o002:
        raise SetupError(
            f"{what} {path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run chmod o-w {path} or choose another directory"
        )


# Files of the data directory that hold its data, its lock table, or its log.
DATA_FILES = ("data.mdb", "lock.mdb", "daemon.log")


def restrict_data_files(data_dir: str) -> list[str]:
    """Take the group's and others' permissions off the data files; return the paths changed.

    New files are created private, but files of an older version, or files copied into
    the directory, may be open to other users. Symlinks are left alone, so that this never
    changes a file elsewhere.
    """
    changed = []
    for name in DATA_FILES:
        path = os.path.join(data_dir, name)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISREG(info.st_mode) and mode & 0o077:
            os.chmod(path, mode & 0o700)
            changed.append(path)
    return changed


def prepare_socket_dir(socket_path: str) -> None:
    """Create the socket's directory with mode 0700, or check that it is private."""
    try:
        check_socket_path(socket_path)
    except InvalidError as exc:
        raise SetupError(str(exc)) from None
    directory = os.path.dirname(socket_path)
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        info = None
    if info is not None and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        # A shared directory such as /tmp must not be changed: the socket moves instead.
        raise SetupError(
            f"socket directory {directory} is not private to you (owner uid {info.st_uid}, mode "
            f"{stat.S_IMODE(info.st_mode):o}); set SHAREDICT_SOCKET to a path in a directory of your own, "
            f"such as {os.path.join(directory, f'sharedict-{os.getuid()}', 'sharedict.sock')}"
        )
    prepare_private_dir(directory, "socket directory")


@contextlib.contextmanager
def exclusive_lock(path: str, what: str, socket_path: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``; raise ``AlreadyRunning`` if another process holds it.

    The file records this daemon's pid and ``socket_path``, so that a second daemon can
    tell the user how to stop this one.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(_already_running_message(fd, what)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{socket_path}\n".encode())
        yield
    finally:
        os.close(fd)


def _already_running_message(fd: int, what: str) -> str:
    # The holder writes its pid and socket path right after it takes the lock, so the
    # file may still be empty when both start at the same moment.
    pid, _, socket_path = os.pread(fd, 4096, 0).decode(errors="replace").strip().partition("\n")
    if not pid.isdigit():
        return f"another sharedict daemon is already running for {what}; stop it before starting a new one"
    if not socket_path:
        # A daemon of an older version records only its pid.
        stop = f"stop it (for example with `kill {pid}`)"
    else:
        stop = f"stop it with `{stop_command(socket_path)}`"
    return (
        f"another sharedict daemon (pid {pid}) is already running for {what}; "
        f"use it, or {stop} before starting a new one"
    )


def stop_command(socket_path: str) -> str:
    """Return the ``sharedict stop`` command line that reaches the daemon on ``socket_path``."""
    if socket_path == socket_path_from_environ():
        return "sharedict stop"
    return f"sharedict stop --socket {shlex.quote(socket_path)}"


def bind_socket(socket_path: str) -> socket.socket:
    """Bind a listening Unix socket with mode 0600, replacing a stale socket file.

    A path that is not a socket, or a socket with a live daemon behind it, is never
    removed.
    """
    try:
        existing = os.lstat(socket_path)
    except FileNotFoundError:
        existing = None

    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise SetupError(f"{socket_path} exists and is not a socket; remove it or choose another socket path")
        if _socket_is_live(socket_path):
            raise AlreadyRunning(
                f"a daemon is already listening on {socket_path}; stop it with `{stop_command(socket_path)}` first"
            )
        os.unlink(socket_path)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(socket_path)
    finally:
        os.umask(old_umask)
    os.chmod(socket_path, 0o600)
    listener.listen(512)
    return listener


def _socket_is_live(socket_path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(socket_path)
        return True
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        # Typically EACCES: a socket of another user. Whatever it is, it is not ours to
        # remove.
        raise SetupError(
            f"cannot tell whether a daemon listens on {socket_path} ({exc}); remove the file if it is stale, "
            "or choose another socket path"
        ) from exc
    finally:
        probe.close()
