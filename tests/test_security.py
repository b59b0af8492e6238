"""The daemon keeps other users out, and never starts on paths that are not safe.

The tests that act as another user fork a child that switches to the ``nobody`` uid, so
they need root and are skipped otherwise.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import daemon_pids, kill_pid, run_serve, socket_accepts, start_serve, stop_process, wait_until
from sharedict import Dict
from sharedict.api import protocol
from sharedict.api.autostart import EXIT_ALREADY_RUNNING
from sharedict.api.cli import main
from sharedict.api.config import Settings
from sharedict.api.errors import DaemonUnavailableError, InvalidError
from sharedict.api.transport import Client
from sharedict.daemon import security

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")


def nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A socket path in a short private directory, and a data directory that does not exist yet."""
    socket_dir = tempfile.mkdtemp(prefix="sd-sec-", dir="/tmp")
    yield os.path.join(socket_dir, "sharedict.sock"), str(tmp_path / "data")
    shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture
def serve(paths, tmp_path: Path) -> Iterator:
    """Start daemons on paths of the test's choice; all are stopped at the end.

    It depends on ``paths`` so that the daemons stop before their directories go.
    """
    processes = []

    def start(socket_path: str, data_dir: str):
        process = start_serve(socket_path, data_dir, str(tmp_path / f"daemon-{len(processes)}.log"))
        processes.append(process)
        return process

    yield start
    for process in processes:
        stop_process(process)


# Modes of the socket and its directory.


def test_socket_file_mode_0600(module_daemon):
    mode = stat.S_IMODE(os.stat(module_daemon.socket_path).st_mode)
    assert mode == 0o600


def test_socket_directory_created_0700(serve, paths):
    socket_path, data_dir = paths
    nested = os.path.join(os.path.dirname(socket_path), "new", "sharedict.sock")
    serve(nested, data_dir)
    mode = stat.S_IMODE(os.stat(os.path.dirname(nested)).st_mode)
    assert mode == 0o700


def test_data_directory_created_0700(serve, paths):
    socket_path, data_dir = paths
    serve(socket_path, data_dir)
    mode = stat.S_IMODE(os.stat(data_dir).st_mode)
    assert mode == 0o700


def test_socket_in_group_writable_directory_refused(paths):
    socket_path, data_dir = paths
    os.chmod(os.path.dirname(socket_path), 0o770)
    completed = run_serve(socket_path, data_dir)
    assert completed.returncode == 1
    assert "not private to you" in completed.stderr
    assert not os.path.exists(socket_path)


def test_socket_in_shared_tmp_suggests_private_path(paths):
    _, data_dir = paths
    socket_path = os.path.join("/tmp", f"sd-shared-{os.getpid()}.sock")
    completed = run_serve(socket_path, data_dir)
    assert completed.returncode == 1
    assert "set SHAREDICT_SOCKET to a path in a directory of your own" in completed.stderr
    assert "chmod" not in completed.stderr
    assert not os.path.exists(socket_path)


def _in_child_as_nobody(function) -> bytes:
    """Run ``function`` in a forked child as ``nobody``.

    Return what ``function`` returned (bytes), ``ok`` for None, or the name of the
    exception it raised followed by its message.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome = b"ok"
        try:
            os.close(read_end)
            user = nobody()
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            outcome = function() or b"ok"
        except BaseException as exc:  # the child reports whatever it meets
            outcome = f"{type(exc).__name__}: {exc}".encode()
        finally:
            os.write(write_end, outcome)
            os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 4096):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return b"".join(chunks)


# Peer credentials: a client of another uid is rejected even when it can reach the socket.


def _connect_as_nobody(socket_path: str) -> bytes:
    """Connect as ``nobody`` and send hello; return ``closed``, ``reply`` or the error met."""

    def connect() -> bytes:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(20)
        sock.connect(socket_path)
        try:
            sock.sendall(protocol.encode_frame_bytes([1, protocol.HELLO, protocol.PROTOCOL_VERSION, os.getpid()]))
            data = sock.recv(4096)
        except (BrokenPipeError, ConnectionResetError):
            data = b""
        return b"reply" if data else b"closed"

    return _in_child_as_nobody(connect)


@pytest.fixture
def open_daemon(module_daemon) -> Iterator:
    """The module's daemon with modes loosened, so that only its peer check keeps others out."""
    os.chmod(module_daemon.socket_dir, 0o755)
    os.chmod(module_daemon.socket_path, 0o777)
    yield module_daemon
    os.chmod(module_daemon.socket_path, 0o600)
    os.chmod(module_daemon.socket_dir, 0o700)


@needs_root
def test_other_uid_connection_closed(open_daemon):
    assert _connect_as_nobody(open_daemon.socket_path) == b"closed"


@needs_root
def test_other_uid_rejection_logged(open_daemon):
    _connect_as_nobody(open_daemon.socket_path)
    uid = nobody().pw_uid
    assert wait_until(lambda: f"of uid {uid}" in open_daemon.log(), timeout=10)
    assert "WARNING" in open_daemon.log()


@needs_root
def test_daemon_serves_owner_after_rejection(open_daemon):
    _connect_as_nobody(open_daemon.socket_path)
    kv = Dict.from_name("after-rejection", create_if_missing=True, client=open_daemon.client())
    kv["after"] = "rejection"
    assert kv["after"] == "rejection"


@needs_root
def test_other_uid_blocked_by_socket_modes(module_daemon):
    # With the modes the daemon sets, another user cannot even connect.
    outcome = _connect_as_nobody(module_daemon.socket_path)
    assert outcome.startswith(b"PermissionError:")


@needs_root
def test_other_uid_client_gets_sharedict_error(open_daemon):
    settings = Settings(socket_path=open_daemon.socket_path, data_dir=open_daemon.data_dir, autostart=False)

    def use_dict() -> None:
        Dict.from_name("kv", create_if_missing=True, client=Client(settings))["k"] = "v"

    outcome = _in_child_as_nobody(use_dict)
    assert outcome.startswith(b"DaemonUnavailableError:")


# The data directory must belong to the daemon's user and be closed to others.


@needs_root
def test_data_dir_owned_by_other_user_refused(paths):
    socket_path, data_dir = paths
    os.makedirs(data_dir, mode=0o700)
    os.chown(data_dir, nobody().pw_uid, nobody().pw_gid)
    completed = run_serve(socket_path, data_dir)
    assert completed.returncode == 1
    assert f"owned by uid {nobody().pw_uid}" in completed.stderr
    assert data_dir in completed.stderr


def test_data_dir_writable_by_others_refused(paths):
    socket_path, data_dir = paths
    os.makedirs(data_dir)
    os.chmod(data_dir, 0o777)
    completed = run_serve(socket_path, data_dir)
    assert completed.returncode == 1
    assert "writable by other users" in completed.stderr
    assert not os.path.exists(os.path.join(data_dir, "data.mdb"))


@needs_root
def test_data_dir_symlink_of_other_user_refused(paths, tmp_path):
    socket_path, data_dir = paths
    target = tmp_path / "real-data"
    target.mkdir(mode=0o700)
    os.symlink(target, data_dir)
    os.lchown(data_dir, nobody().pw_uid, nobody().pw_gid)
    completed = run_serve(socket_path, data_dir)
    assert completed.returncode == 1
    assert "symlink owned by uid" in completed.stderr
    assert list(target.iterdir()) == []


def test_data_dir_own_symlink_accepted(serve, paths, tmp_path):
    socket_path, data_dir = paths
    target = tmp_path / "real-data"
    target.mkdir(mode=0o700)
    os.symlink(target, data_dir)
    serve(socket_path, data_dir)
    assert (target / "data.mdb").exists()


def test_data_dir_that_is_a_file_refused(paths):
    socket_path, data_dir = paths
    Path(data_dir).write_text("not a directory")
    completed = run_serve(socket_path, data_dir)
    assert completed.returncode == 1
    assert "not a directory" in completed.stderr


# The socket path: a stale socket is replaced, anything else is left alone.


def test_stale_socket_replaced_after_kill(daemon):
    kv = Dict.from_name("kv", create_if_missing=True)
    kv["before"] = "crash"
    daemon.kill()
    assert stat.S_ISSOCK(os.lstat(daemon.socket_path).st_mode)
    assert not socket_accepts(daemon.socket_path)

    daemon.start()
    assert kv["before"] == "crash"


def test_regular_file_at_socket_path_kept(paths):
    socket_path, data_dir = paths
    Path(socket_path).write_text("precious")
    completed = run_serve(socket_path, data_dir)
    assert completed.returncode == 1
    assert Path(socket_path).read_text() == "precious"
    assert "is not a socket" in completed.stderr
    assert socket_path in completed.stderr


def test_directory_at_socket_path_kept(paths):
    socket_path, data_dir = paths
    os.mkdir(socket_path)
    completed = run_serve(socket_path, data_dir)
    assert completed.returncode == 1
    assert os.path.isdir(socket_path)


def test_symlink_at_socket_path_kept(paths, tmp_path):
    socket_path, data_dir = paths
    target = tmp_path / "target"
    target.write_text("precious")
    os.symlink(target, socket_path)
    completed = run_serve(socket_path, data_dir)
    assert completed.returncode == 1
    assert os.path.islink(socket_path)
    assert target.read_text() == "precious"


def test_socket_path_too_long_refused(tmp_path):
    socket_dir = tmp_path / ("d" * 100)
    socket_dir.mkdir(mode=0o700)
    socket_path = str(socket_dir / "sharedict.sock")
    completed = run_serve(socket_path, str(tmp_path / "data"))
    assert completed.returncode == 1
    assert "Error: socket path" in completed.stderr
    assert "bytes long" in completed.stderr
    assert "Traceback" not in completed.stderr


def _long_socket_path(tmp_path: Path) -> str:
    return str(tmp_path / ("d" * 100) / "sharedict.sock")


def test_client_rejects_long_socket_path(tmp_path):
    socket_path = _long_socket_path(tmp_path)
    with pytest.raises(InvalidError) as caught:
        Client(Settings(socket_path=socket_path, data_dir=str(tmp_path / "data"), autostart=True))
    message = str(caught.value)
    assert socket_path in message
    assert f"is {len(os.fsencode(socket_path))} bytes long" in message
    assert "over the limit of 107 bytes" in message
    assert "set SHAREDICT_SOCKET (or --socket) to a shorter path" in message


def test_async_call_rejects_long_socket_path(tmp_path, monkeypatch):
    monkeypatch.setenv("SHAREDICT_SOCKET", _long_socket_path(tmp_path))
    monkeypatch.setattr(Client, "_default", None)
    with pytest.raises(InvalidError, match="bytes long"):
        asyncio.run(Dict.from_name("jobs").len.aio())


def test_status_rejects_long_socket_path(tmp_path, capsys):
    code = main(["status", "--socket", _long_socket_path(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "bytes long" in err
    assert "no sharedict daemon" not in err


@needs_root
def test_socket_of_other_user_kept(paths):
    socket_path, _ = paths
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(socket_path)
    os.chmod(socket_path, 0o600)
    os.chmod(os.path.dirname(socket_path), 0o777)
    # A daemon of nobody may not even probe root's socket, so it must leave it alone.
    outcome = _in_child_as_nobody(lambda: security.bind_socket(socket_path))
    other.close()
    assert outcome.startswith(b"SetupError:")
    assert stat.S_ISSOCK(os.lstat(socket_path).st_mode)


# One daemon per data directory and per socket.


def test_second_daemon_same_data_dir_refused(module_daemon):
    other_socket = os.path.join(module_daemon.socket_dir, "other.sock")
    completed = run_serve(other_socket, module_daemon.data_dir)
    assert completed.returncode == EXIT_ALREADY_RUNNING
    assert "already running" in completed.stderr
    assert module_daemon.data_dir in completed.stderr
    assert f"pid {module_daemon.process.pid}" in completed.stderr
    assert not os.path.exists(other_socket)


def test_second_daemon_suggests_sharedict_stop(module_daemon):
    other_socket = os.path.join(module_daemon.socket_dir, "other.sock")
    completed = run_serve(other_socket, module_daemon.data_dir)
    assert "Error: another sharedict daemon" in completed.stderr
    assert "use it, or stop it with `sharedict stop` before starting a new one" in completed.stderr
    assert "kill" not in completed.stderr


def test_second_daemon_suggests_socket_of_first(module_daemon, monkeypatch):
    # With SHAREDICT_SOCKET elsewhere, a plain `sharedict stop` would miss the first daemon.
    other_socket = os.path.join(module_daemon.socket_dir, "other.sock")
    monkeypatch.setenv("SHAREDICT_SOCKET", other_socket)
    completed = run_serve(other_socket, module_daemon.data_dir)
    assert f"`sharedict stop --socket {module_daemon.socket_path}`" in completed.stderr


def test_second_daemon_same_data_dir_leaves_first_serving(module_daemon):
    other_socket = os.path.join(module_daemon.socket_dir, "other.sock")
    run_serve(other_socket, module_daemon.data_dir)
    kv = Dict.from_name("second-data-dir", create_if_missing=True, client=module_daemon.client())
    kv["still"] = "serving"
    assert kv["still"] == "serving"
    assert daemon_pids(module_daemon.data_dir) == [module_daemon.process.pid]


def test_second_daemon_same_socket_refused(module_daemon, tmp_path):
    completed = run_serve(module_daemon.socket_path, str(tmp_path / "other-data"))
    assert completed.returncode == EXIT_ALREADY_RUNNING
    assert module_daemon.socket_path in completed.stderr
    assert socket_accepts(module_daemon.socket_path)
    kv = Dict.from_name("second-socket", create_if_missing=True, client=module_daemon.client())
    kv["still"] = "serving"
    assert kv["still"] == "serving"


def test_detached_second_daemon_exits_3(module_daemon):
    other_socket = os.path.join(module_daemon.socket_dir, "other.sock")
    completed = run_serve(other_socket, module_daemon.data_dir, "--detach")
    assert completed.returncode == EXIT_ALREADY_RUNNING
    assert completed.stderr.count("is already running") == 1


# Auto-start writes a log and a lock file before any daemon checks the directories, so
# it must check them first. In a directory that others can write to, either file could be
# a symlink planted to make the client write to a file of someone else's choice.


def _autostart_client(socket_path: str, data_dir: str) -> Client:
    return Client(Settings(socket_path=socket_path, data_dir=data_dir, autostart=True))


def test_autostart_refuses_open_data_dir(paths, tmp_path):
    socket_path, data_dir = paths
    os.makedirs(data_dir)
    os.chmod(data_dir, 0o777)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, os.path.join(data_dir, "daemon.log"))

    with pytest.raises(DaemonUnavailableError, match="writable by other users"):
        Dict.from_name("kv", create_if_missing=True, client=_autostart_client(socket_path, data_dir)).len()
    assert victim.read_text() == "precious"


def test_autostart_fifo_log_raises_at_once(paths):
    # Opening a FIFO for writing would wait for a reader while holding the start-up lock.
    socket_path, data_dir = paths
    os.makedirs(data_dir, mode=0o700)
    os.mkfifo(os.path.join(data_dir, "daemon.log"))
    with pytest.raises(DaemonUnavailableError, match="the log is a regular file"):
        Dict.from_name("kv", create_if_missing=True, client=_autostart_client(socket_path, data_dir)).len()


def test_autostart_refuses_open_socket_dir(paths, tmp_path):
    socket_path, data_dir = paths
    os.chmod(os.path.dirname(socket_path), 0o777)
    victim = tmp_path / "victim"
    os.symlink(victim, socket_path + ".autostart")

    with pytest.raises(DaemonUnavailableError, match="socket directory"):
        Dict.from_name("kv", create_if_missing=True, client=_autostart_client(socket_path, data_dir)).len()
    assert not victim.exists()


def test_autostart_creates_private_directories(paths):
    socket_path, data_dir = paths
    nested_socket = os.path.join(os.path.dirname(socket_path), "new", "sharedict.sock")
    client = _autostart_client(nested_socket, data_dir)
    try:
        Dict.from_name("kv", create_if_missing=True, client=client)["k"] = "v"
        assert stat.S_IMODE(os.stat(os.path.dirname(nested_socket)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(os.path.join(data_dir, "daemon.log")).st_mode) == 0o600
    finally:
        client.close()
        for pid in daemon_pids(data_dir):
            kill_pid(pid)
