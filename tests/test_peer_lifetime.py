"""A connection lives as long as its process, and a stuck daemon never hangs a client forever."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sharedict import Client, DaemonUnavailableError, Dict, Lock, RequestSizeError
from sharedict.api import aio, protocol
from sharedict.api.autostart import process_running
from sharedict.api.cli import main
from sharedict.api.transport import Request

# The parent takes a lock and creates an ephemeral dict, forks a child that outlives
# it with copies of the parent's sockets, and exits without closing anything.
PARENT_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from sharedict import Dict, Lock

    lock = Lock.from_name("held", lease=None)
    assert lock.acquire(timeout=5)
    scratch = Dict.ephemeral().__enter__()
    scratch["k"] = 1
    child = os.fork()
    if child == 0:
        os.close(1)
        os.close(2)
        time.sleep(60)
        os._exit(0)
    print(scratch.object_id, child, flush=True)
    os._exit(0)
    """
)


def _wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_dead_parent_frees_lock_despite_forked_child(daemon, child_env):
    parent = subprocess.run(
        [sys.executable, "-c", PARENT_SCRIPT], env=child_env, capture_output=True, text=True, timeout=60
    )
    assert parent.returncode == 0, parent.stderr
    object_id, child_pid = parent.stdout.split()

    lock = Lock.from_name("held", lease=None)
    try:
        assert lock.acquire(timeout=10)
        lock.release()
        assert _wait_for(lambda: not _exists(object_id))
    finally:
        os.kill(int(child_pid), signal.SIGKILL)


def _exists(object_id: str) -> bool:
    try:
        Dict.from_id(object_id).len()
    except Exception:
        return False
    return True


def test_status_times_out_on_stopped_daemon(daemon, capsys):
    os.kill(daemon.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        status = main(["status", "--socket", daemon.socket_path])
        elapsed = time.monotonic() - started
    finally:
        os.kill(daemon.process.pid, signal.SIGCONT)
    assert status == 1
    assert elapsed < 60
    assert "did not answer" in capsys.readouterr().err


def test_timed_out_write_message(daemon):
    client = Client(daemon.client().settings, request_timeout=0.5)
    handle = Dict.from_name("slow", create_if_missing=True, client=client)
    handle.hydrate()
    os.kill(daemon.process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(DaemonUnavailableError) as caught:
            handle.put("key", "value")
    finally:
        os.kill(daemon.process.pid, signal.SIGCONT)
        client.close()
    message = str(caught.value)
    assert message.startswith("dict 'slow': the daemon on ")
    assert "did not answer put within 0.5 s; the write may or may not be applied" in message


def test_oversized_request_raises_request_size_error(daemon):
    client = daemon.client()
    scratch = Dict.from_name("big", create_if_missing=True, client=client)
    scratch.hydrate()
    huge = b"x" * (protocol.MAX_FRAME_SIZE + 1)
    request = Request(protocol.PUT, bytes.fromhex(scratch.object_id[3:]), b"Sk", None, huge, False, write=True)
    with pytest.raises(RequestSizeError, match="limit of one request"):
        client.call(request)
    with pytest.raises(RequestSizeError, match="limit of one request"):
        asyncio.run(aio.call_async(client, request))
    assert scratch.len() == 0


def test_exited_unreaped_process_not_running():
    child = os.fork()
    if child == 0:
        os._exit(0)
    try:
        # The child stays a zombie until it is reaped, and kill(pid, 0) still finds it.
        assert wait_until_zombie(child)
        assert not process_running(child)
    finally:
        os.waitpid(child, 0)


def test_live_process_running():
    assert process_running(os.getpid())


def wait_until_zombie(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            if stat.read().rpartition(b")")[2].split()[0] == b"Z":
                return True
        time.sleep(0.01)
    return False
