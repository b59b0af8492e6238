"""Hardening: a full disk, bad keys and values, and other users, each with the cases that failed once.

The crash, fuzz, growth and long-reader tests, with their quick and long variants, are
in ``tests/stress/``. ``docs/reliability.md`` lists every test, how to run it, and the
figure it reached.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import pwd
import resource
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from stress import workloads
from stress.lmdb_integrity import check_data_dir

from helpers import run_serve, start_serve, stop_process, wait_until
from sharedict import (
    DaemonUnavailableError,
    DeserializationError,
    Dict,
    RequestSizeError,
    SerializationError,
    StorageFullError,
)
from sharedict.api import protocol
from sharedict.api.config import Settings
from sharedict.api.serialization import MAX_KEY_DEPTH, encode_key
from sharedict.api.transport import Client, Request

MiB = 1 << 20


def run_child(env: dict[str, str], code: str) -> str:
    """Run ``code`` in a new Python process that has ``Dict`` and ``DEEP_KEYS``; return its output."""
    prelude = "from sharedict import Dict\n"
    if "DEEP_KEYS" in code:
        prelude += "from test_hardening import DEEP_KEYS\n"
    completed = subprocess.run(
        [sys.executable, "-c", prelude + code],
        env={**env, "PYTHONPATH": os.path.dirname(__file__)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip()


# A full disk is an error, not a disaster.
#
# One daemon serves the module, with its data directory on a tmpfs of its own. Each test
# first fills the disk (again) until a write fails, so the tests work in any order.

SMALL_FS_SIZE = "32m"


@pytest.fixture(scope="module")
def small_fs() -> Iterator[str]:
    """A 32 MiB tmpfs of the module's own, mounted on a new directory and removed afterwards."""
    mount_point = tempfile.mkdtemp(prefix="sd-full-", dir="/tmp")
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_SIZE},mode=0700", "tmpfs", mount_point],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        mounted = None
    if mounted is None or mounted.returncode != 0:
        os.rmdir(mount_point)
        reason = "no mount command" if mounted is None else mounted.stderr.strip()
        pytest.skip(f"cannot mount a {SMALL_FS_SIZE} tmpfs for the full-disk tests ({reason}); they need root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", mount_point], check=False)
        os.rmdir(mount_point)


def checked_value(key: str, size: int = MiB) -> bytes:
    """A value made from its key, so that a value under the wrong key or a torn one shows."""
    seed = hashlib.sha256(key.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


class FullDisk:
    """A daemon with its data directory on the small filesystem, and the dict that fills it."""

    def __init__(self, process: subprocess.Popen[bytes], client: Client, data_dir: str) -> None:
        self.process = process
        self.client = client
        self.data_dir = data_dir
        self.dict = Dict.from_name("filled", create_if_missing=True, client=client)
        self.keys: list[str] = []
        self._next_number = 0

    def fill(self) -> StorageFullError:
        """Write 1 MiB values under new keys until a write fails; return its error."""
        for _ in range(1000):
            key = f"key-{self._next_number}"
            self._next_number += 1
            try:
                self.dict[key] = checked_value(key)
            except StorageFullError as exc:
                return exc
            self.keys.append(key)
        raise AssertionError(f"1000 MiB fitted on a {SMALL_FS_SIZE} filesystem")

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            del self.dict[key]
            self.keys.remove(key)

    def intact_keys(self) -> list[str]:
        """Return the keys written before the disk filled whose values are still whole."""
        return [key for key in self.keys if self.dict.get(key) == checked_value(key)]


@pytest.fixture(scope="module")
def full_disk(small_fs, tmp_path_factory) -> Iterator[FullDisk]:
    socket_dir = tempfile.mkdtemp(prefix="sd-", dir="/tmp")
    socket_path = os.path.join(socket_dir, "sharedict.sock")
    data_dir = os.path.join(small_fs, "data")
    process = start_serve(socket_path, data_dir, str(tmp_path_factory.mktemp("full-disk") / "daemon.log"))
    client = Client(Settings(socket_path=socket_path, data_dir=data_dir, autostart=False))
    try:
        yield FullDisk(process, client, data_dir)
    finally:
        client.close()
        stop_process(process)
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_full_disk_raises_storage_full_error(full_disk):
    message = str(full_disk.fill())
    assert full_disk.keys != []
    assert full_disk.data_dir in message
    assert "free" in message
    assert "delete" in message


def test_full_disk_keeps_earlier_data(full_disk):
    full_disk.fill()
    assert full_disk.intact_keys() == full_disk.keys
    assert len(full_disk.dict) == len(full_disk.keys)


def test_full_disk_keeps_serving_reads(full_disk):
    full_disk.fill()
    assert full_disk.dict.get(full_disk.keys[-1]) == checked_value(full_disk.keys[-1])
    assert full_disk.process.poll() is None


def test_full_disk_failed_update_stores_nothing(full_disk):
    full_disk.fill()
    entries = {f"update-{number}": checked_value(f"update-{number}") for number in range(8)}
    with pytest.raises(StorageFullError):
        full_disk.dict.update(entries)
    assert [key for key in entries if key in full_disk.dict] == []


def test_full_disk_writes_resume_after_delete(full_disk):
    full_disk.fill()
    full_disk.delete(full_disk.keys[:4])
    full_disk.dict["after-delete"] = checked_value("after-delete")
    assert full_disk.dict["after-delete"] == checked_value("after-delete")
    del full_disk.dict["after-delete"]


def test_full_disk_write_fits_after_one_delete(full_disk):
    # LMDB reuses the pages of the delete only two commits later; the daemon commits the
    # one in between when a write finds the store full.
    full_disk.fill()
    full_disk.delete(full_disk.keys[-1:])
    full_disk.dict["after-one-delete"] = checked_value("after-one-delete")
    assert full_disk.dict["after-one-delete"] == checked_value("after-one-delete")
    del full_disk.dict["after-one-delete"]


def test_full_disk_writes_resume_after_clear(full_disk):
    full_disk.fill()
    full_disk.dict.clear()
    full_disk.keys.clear()
    full_disk.dict["after-clear"] = checked_value("after-clear")
    assert full_disk.dict["after-clear"] == checked_value("after-clear")
    del full_disk.dict["after-clear"]


def test_full_disk_leaves_consistent_store(full_disk):
    full_disk.fill()
    full_disk.delete(full_disk.keys[:1])
    # LMDB lets another process read a consistent snapshot while the daemon runs.
    report = check_data_dir(full_disk.data_dir)
    assert report.problems == []
    assert report.entries == len(full_disk.keys)


# A map that cannot grow is an error too. The daemon's address space is limited with
# prlimit, so that growing its map fails the way it would in a small container.


def virtual_memory_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmSize in /proc/{pid}/status")


def test_map_that_cannot_grow_raises_storage_full_error(tmp_path):
    socket_dir = tempfile.mkdtemp(prefix="sd-", dir="/tmp")
    socket_path = os.path.join(socket_dir, "sharedict.sock")
    data_dir = str(tmp_path / "data")
    # One malloc arena keeps the daemon's address space from jumping when threads start.
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}
    process = workloads.start_daemon(socket_path, data_dir, str(tmp_path / "daemon.log"), map_size=32 * MiB, env=env)
    try:
        # Room to grow the map from 32 to 64 and 128 MiB (96 MiB more), but not to 256 MiB.
        limit = virtual_memory_size(process.pid) + 160 * MiB
        resource.prlimit(process.pid, resource.RLIMIT_AS, (limit, limit))
        handle = Dict.from_name("no-growth", create_if_missing=True, client=workloads.client_of(socket_path, data_dir))
        keys = []
        failure = None
        for number in range(400):
            key = f"key-{number}"
            try:
                handle[key] = checked_value(key)
            except StorageFullError as exc:
                failure = exc
                break
            keys.append(key)

        assert failure is not None
        message = str(failure)
        assert data_dir in message
        assert "memory map" in message
        assert "delete entries" in message.lower()
        assert process.poll() is None
        assert [key for key in keys if handle.get(key) != checked_value(key)] == []

        for key in keys[:4]:
            del handle[key]
        handle["after-delete"] = checked_value("after-delete")
        assert handle["after-delete"] == checked_value("after-delete")
    finally:
        stop_process(process)
        shutil.rmtree(socket_dir, ignore_errors=True)
    assert check_data_dir(data_dir).problems == []


# A bad value hurts only its caller: clear errors, nothing half-stored.


def nested(depth: int, kind: Callable[[tuple], object] = tuple, leaf: object = "leaf") -> object:
    """Return ``leaf`` wrapped in ``depth`` levels of ``kind``."""
    key = leaf
    for _ in range(depth):
        key = kind((key,))
    return key


def alternating(depth: int) -> object:
    """Return a key of ``depth`` levels, tuples and frozensets in turn."""
    key: object = "leaf"
    for level in range(depth):
        key = frozenset({key}) if level % 2 else (key,)
    return key


def every_type(depth: int) -> object:
    """Return a key of ``depth`` levels with every canonical type in its innermost three."""
    leaf = (None, True, 7, 2.5, float("inf"), "text", b"bytes", frozenset({1, ("x", 2.0)}))
    return nested(depth - 3, leaf=leaf)


DEEP_KEYS: dict[str, Callable[[int], object]] = {
    "tuple": nested,
    "frozenset": lambda depth: nested(depth, frozenset),
    "alternating": alternating,
    "every_type": every_type,
}


_dict_numbers = itertools.count()


@pytest.fixture
def kv(module_daemon) -> Dict:
    """A new dict on the module's daemon, which these tests share."""
    return Dict.from_name(f"bad-values-{next(_dict_numbers)}", create_if_missing=True, client=module_daemon.client())


@pytest.fixture
def module_env(module_daemon) -> dict[str, str]:
    return {**os.environ, **module_daemon.env}


@pytest.mark.parametrize("kind", DEEP_KEYS)
def test_key_at_max_depth_round_trips(kv, module_env, kind):
    key = DEEP_KEYS[kind](MAX_KEY_DEPTH)
    kv[key] = "deep"
    assert kv[key] == "deep"
    assert list(kv.keys()) == [key]
    found = run_child(module_env, f"print(Dict.from_name({kv.name!r})[DEEP_KEYS[{kind!r}]({MAX_KEY_DEPTH})])")
    assert found == "deep"


@pytest.mark.parametrize("depth", [MAX_KEY_DEPTH + 1, 10_000])
@pytest.mark.parametrize("kind", DEEP_KEYS)
def test_key_too_deep_raises_clear_error(kv, kind, depth):
    with pytest.raises(SerializationError) as caught:
        kv[DEEP_KEYS[kind](depth)] = "deep"
    message = str(caught.value)
    assert f"more than {MAX_KEY_DEPTH} levels" in message
    assert kv.name in message
    assert "flatter key" in message
    assert len(kv) == 0


def test_key_too_deep_in_update_stores_nothing(kv):
    with pytest.raises(SerializationError):
        kv.update({"first": 1, nested(10_000): 2, "last": 3})
    assert len(kv) == 0


def test_key_too_deep_in_reads_raises(kv):
    key = nested(10_000)
    with pytest.raises(SerializationError):
        kv.get(key)
    with pytest.raises(SerializationError):
        kv.pop(key, None)
    with pytest.raises(SerializationError):
        key in kv  # noqa: B015 - the lookup itself must raise


def test_megabyte_tuple_key_round_trips(kv, module_env):
    key = tuple(range(200_000))
    assert len(encode_key(key)[0]) > MiB
    kv[key] = "big key"
    assert kv[key] == "big key"
    assert list(kv.keys()) == [key]
    found = run_child(module_env, f"print(Dict.from_name({kv.name!r})[tuple(range(200_000))])")
    assert found == "big key"
    assert kv.pop(key) == "big key"
    assert len(kv) == 0


def test_value_failing_to_pickle_keeps_old_value(kv):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("refuses to be pickled")

    kv["key"] = "old"
    with pytest.raises(SerializationError, match="refuses to be pickled"):
        kv["key"] = Unpicklable()
    with pytest.raises(SerializationError):
        kv.update({"key": "new", "other": Unpicklable()})
    assert kv["key"] == "old"
    assert list(kv.keys()) == ["key"]


def test_value_failing_to_unpickle_hurts_only_its_key(kv):
    kv["good"] = "fine"
    kv["bad"] = FailsToUnpickle()
    with pytest.raises(DeserializationError, match="cannot be rebuilt"):
        kv["bad"]
    assert kv["good"] == "fine"
    assert "bad" in kv
    assert len(kv) == 2


class FailsToUnpickle:
    """A value that pickles, and whose unpickling raises."""

    def __reduce__(self):
        return (_refuse_to_unpickle, ())


def _refuse_to_unpickle():
    raise ValueError("this value cannot be rebuilt")


# Other users stay out. The tests that act as another user fork a child that switches
# to the ``nobody`` uid, so they need root.

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")


class OtherUsersListener:
    """A socket that a process of the ``nobody`` user listens on, counting the bytes it receives.

    It stands for a socket that another user put where the client looks for its daemon.
    """

    def __init__(self, socket_path: str, connections: int) -> None:
        self.socket_path = socket_path
        self._ready_read, ready_write = os.pipe()
        self._result_read, result_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self._ready_read)
            os.close(self._result_read)
            self._serve(connections, ready_write, result_write)
        os.close(ready_write)
        os.close(result_write)
        assert os.read(self._ready_read, 16) == b"ready"

    def _serve(self, connections: int, ready_write: int, result_write: int) -> None:
        received = 0
        try:
            user = pwd.getpwnam("nobody")
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self.socket_path)
            listener.listen(8)
            listener.settimeout(30)
            os.write(ready_write, b"ready")
            for _ in range(connections):
                conn, _ = listener.accept()
                conn.settimeout(30)
                while data := conn.recv(65536):
                    received += len(data)
                conn.close()
            os.write(result_write, str(received).encode())
        except BaseException as exc:  # the parent reports whatever went wrong here
            os.write(ready_write, b"failed")
            os.write(result_write, f"error: {exc!r}".encode())
        finally:
            os._exit(0)

    def bytes_received(self) -> str:
        """Wait for the listener to finish; return the byte count it received, or its error."""
        result = os.read(self._result_read, 4096).decode()
        os.waitpid(self.pid, 0)
        os.close(self._ready_read)
        os.close(self._result_read)
        return result


@pytest.fixture
def other_users_socket(tmp_path) -> Iterator[str]:
    """A socket path in a directory that the ``nobody`` user owns, as another user could make under /tmp."""
    directory = tempfile.mkdtemp(prefix="sd-other-", dir="/tmp")
    os.chmod(directory, 0o755)
    os.chown(directory, pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)
    yield os.path.join(directory, "sharedict.sock")
    shutil.rmtree(directory, ignore_errors=True)


@needs_root
def test_client_sends_nothing_to_other_users_socket(other_users_socket):
    listener = OtherUsersListener(other_users_socket, connections=1)
    client = Client(Settings(socket_path=other_users_socket, data_dir="/nonexistent", autostart=False))
    with pytest.raises(DaemonUnavailableError) as caught:
        Dict.from_name("secrets", create_if_missing=True, client=client)["token"] = "s3cret"
    client.close()
    assert listener.bytes_received() == "0"
    message = str(caught.value)
    assert f"uid {pwd.getpwnam('nobody').pw_uid}" in message
    assert "SHAREDICT_SOCKET" in message


@needs_root
def test_async_client_sends_nothing_to_other_users_socket(other_users_socket):
    listener = OtherUsersListener(other_users_socket, connections=1)
    client = Client(Settings(socket_path=other_users_socket, data_dir="/nonexistent", autostart=False))
    handle = Dict.from_name("secrets", create_if_missing=True, client=client)
    with pytest.raises(DaemonUnavailableError, match="runs as uid"):
        asyncio.run(handle.put.aio("token", "s3cret"))
    assert listener.bytes_received() == "0"


@needs_root
def test_socket_dir_symlink_of_other_user_refused(tmp_path):
    socket_parent = tempfile.mkdtemp(prefix="sd-link-", dir="/tmp")
    try:
        target = os.path.join(socket_parent, "real")
        os.mkdir(target, 0o700)
        link = os.path.join(socket_parent, "link")
        os.symlink(target, link)
        os.lchown(link, pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)
        completed = run_serve(os.path.join(link, "sharedict.sock"), str(tmp_path / "data"))
        assert completed.returncode == 1
        assert "symlink owned by uid" in completed.stderr
        assert os.listdir(target) == []
    finally:
        shutil.rmtree(socket_parent, ignore_errors=True)


def test_data_files_private(module_daemon):
    for name in ("data.mdb", "lock.mdb"):
        mode = stat.S_IMODE(os.stat(os.path.join(module_daemon.data_dir, name)).st_mode)
        assert mode == 0o600, f"{name} has mode {mode:o}"


def test_open_data_files_made_private_at_start(daemon):
    daemon.stop()
    for name in ("data.mdb", "lock.mdb"):
        os.chmod(os.path.join(daemon.data_dir, name), 0o644)
    daemon.start()
    for name in ("data.mdb", "lock.mdb"):
        mode = stat.S_IMODE(os.stat(os.path.join(daemon.data_dir, name)).st_mode)
        assert mode == 0o600, f"{name} has mode {mode:o}"
    assert "its mode is now private" in daemon.log()


def test_symlinked_data_file_left_alone(daemon, tmp_path):
    elsewhere = tmp_path / "elsewhere.log"
    elsewhere.write_text("not sharedict's")
    elsewhere.chmod(0o644)
    daemon.stop()
    os.symlink(elsewhere, os.path.join(daemon.data_dir, "daemon.log"))
    daemon.start()
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o644


# Requests that the fuzzer found to fail inside the daemon.


def test_scan_after_largest_position_returns_empty_page(module_daemon):
    client = module_daemon.client()
    handle = Dict.from_name("scan-at-end", create_if_missing=True, client=client)
    handle["key"] = "value"
    object_id = bytes.fromhex(handle.object_id[3:])
    page, done = client.call(Request(protocol.SCAN, object_id, 2**64 - 1, 10, True, True))
    assert page == []
    assert done is True
    assert "scan failed" not in module_daemon.log()


# Flow control: a client that pipelines requests faster than it reads the replies slows
# down instead of filling the daemon's memory.


class PeakMemory:
    """Samples a process's resident memory in a thread, keeping the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self._rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS in /proc/{self.pid}/status")

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def growth(self) -> int:
        """Stop sampling; return the peak's growth over the start, in bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak - self.start


def raw_connection(socket_path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(socket_path)
    sock.sendall(protocol.encode_frame_bytes([0, protocol.HELLO, protocol.PROTOCOL_VERSION, os.getpid()]))
    return sock


def read_replies(sock: socket.socket, count: int) -> list[list]:
    reader = protocol.FrameReader()
    replies: list[list] = []
    while len(replies) < count:
        data = sock.recv(1 << 20)
        if not data:
            break
        reader.feed(data)
        replies.extend(protocol.decode_body(body) for body in reader.frames())
    return replies


def test_unread_pipelined_reads_keep_memory_bounded(daemon):
    handle = Dict.from_name("flow", create_if_missing=True)
    handle.update({f"key-{number}": bytes(MiB) for number in range(4)})
    object_id = bytes.fromhex(handle.object_id[3:])
    memory = PeakMemory(daemon.process.pid)

    # 300 requests in one send, each for a reply of 4 MiB: 1.2 GiB of replies.
    sock = raw_connection(daemon.socket_path)
    scan = protocol.encode_frame_bytes([1, protocol.SCAN, object_id, 0, 1000, True, True])
    sock.sendall(scan * 300)
    assert wait_until(lambda: memory.peak - memory.start > 32 * MiB, timeout=10)
    # Without flow control the daemon would now build all the replies, within a second.
    time.sleep(1)
    replies = read_replies(sock, 301)
    sock.close()

    assert memory.growth() < 200 * MiB
    assert len(replies) == 301
    assert [reply[1] for reply in replies] == [protocol.STATUS_OK] * 301
    assert len(handle) == 4


def test_pipelined_writes_over_limit_all_stored(daemon):
    handle = Dict.from_name("flow", create_if_missing=True)
    object_id = bytes.fromhex(handle.object_id[3:])
    memory = PeakMemory(daemon.process.pid)

    # 48 writes of 16 MiB each, sent before any reply is read: three times the 256 MiB
    # of pending writes after which the daemon pauses reading. A daemon that lost count
    # of its pending writes would stop reading for good, and the replies would not come.
    sock = raw_connection(daemon.socket_path)
    for number in range(48):
        key = f"key-{number}".encode()
        sock.sendall(protocol.encode_frame_bytes([number + 1, protocol.PUT, object_id, key, None, bytes(16 * MiB), False]))
    replies = read_replies(sock, 49)
    sock.close()

    assert [reply[1] for reply in replies] == [protocol.STATUS_OK] * 49
    assert len(handle) == 48
    # At most 256 MiB of writes wait, one batch of them is in LMDB's dirty pages while it
    # commits, and one frame is being read. That is less than the 768 MiB sent, which a
    # daemon without flow control would keep in memory on top of its dirty pages.
    assert memory.growth() < 700 * MiB
