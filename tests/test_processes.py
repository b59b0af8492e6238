"""Many processes and threads on one daemon: races, cold starts, forks and restarts.

Child processes are forked with ``multiprocessing``, so they inherit the test's
environment, which points them at the test's daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import daemon_pids, kill_pid, launch_daemon, read_log, serve_command, socket_accepts, wait_until
from sharedict import Dict
from sharedict.api import cli, protocol
from sharedict.api.config import Settings
from sharedict.api.errors import NotFoundError
from sharedict.api.transport import Client, Request

fork = multiprocessing.get_context("fork")

BARRIER_TIMEOUT = 120.0
JOIN_TIMEOUT = 180.0


def _join_all(processes: list) -> None:
    for process in processes:
        process.join(timeout=JOIN_TIMEOUT)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()


def _drain(queue, count: int) -> list:
    """Collect ``count`` results, each sent by one child before it exits."""
    return [queue.get(timeout=JOIN_TIMEOUT) for _ in range(count)]


# Insert-if-absent under contention: one winner per key, whatever the timing.

RACERS = 32
ROUNDS = 50


def _race(barrier, results, rounds: int) -> None:
    outcomes = []
    try:
        race = Dict.from_name("race", create_if_missing=True)
        for round_number in range(rounds):
            barrier.wait()
            outcomes.append(race.put(f"round-{round_number}", os.getpid(), skip_if_exists=True))
    except BaseException:
        results.put((os.getpid(), None, traceback.format_exc()))
        barrier.abort()
        return
    results.put((os.getpid(), outcomes, None))


def test_put_if_absent_race_has_one_winner(module_daemon):
    Dict.from_name("race", create_if_missing=True).hydrate()
    barrier = fork.Barrier(RACERS, timeout=BARRIER_TIMEOUT)
    results = fork.Queue()
    processes = [fork.Process(target=_race, args=(barrier, results, ROUNDS)) for _ in range(RACERS)]
    for process in processes:
        process.start()
    reports = _drain(results, RACERS)
    _join_all(processes)

    errors = [error for _, _, error in reports if error is not None]
    assert errors == []
    race = Dict.from_name("race")
    for round_number in range(ROUNDS):
        winners = [pid for pid, outcomes, _ in reports if outcomes[round_number]]
        assert len(winners) == 1, f"round {round_number}: winners {winners}"
        assert race[f"round-{round_number}"] == winners[0]


# Cold start: no daemon runs, and every client starts one at the same moment.

COLD_STARTERS = 16


@pytest.fixture
def cold_paths(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Paths where no daemon runs yet; any daemon found on them at the end is stopped."""
    socket_dir = tempfile.mkdtemp(prefix="sd-cold-", dir="/tmp")
    data_dir = str(tmp_path / "data")
    yield os.path.join(socket_dir, "sharedict.sock"), data_dir
    for pid in daemon_pids(data_dir):
        kill_pid(pid)
    for name in os.listdir(socket_dir):
        os.unlink(os.path.join(socket_dir, name))
    os.rmdir(socket_dir)


def _cold_start(barrier, results, socket_path: str, data_dir: str) -> None:
    os.environ["SHAREDICT_SOCKET"] = socket_path
    os.environ["SHAREDICT_DATA_DIR"] = data_dir
    os.environ["SHAREDICT_AUTOSTART"] = "1"
    try:
        barrier.wait()
        cold = Dict.from_name("cold", create_if_missing=True)
        cold[os.getpid()] = "started"
        results.put((os.getpid(), None))
    except BaseException:
        results.put((os.getpid(), traceback.format_exc()))


def test_cold_start_ends_with_one_daemon(cold_paths):
    socket_path, data_dir = cold_paths
    barrier = fork.Barrier(COLD_STARTERS, timeout=BARRIER_TIMEOUT)
    results = fork.Queue()
    processes = [
        fork.Process(target=_cold_start, args=(barrier, results, socket_path, data_dir))
        for _ in range(COLD_STARTERS)
    ]
    for process in processes:
        process.start()
    reports = _drain(results, COLD_STARTERS)
    _join_all(processes)

    errors = [error for _, error in reports if error is not None]
    assert errors == []
    daemons = daemon_pids(data_dir)
    assert len(daemons) == 1, f"daemon processes: {daemons}"
    # The lock file holds the daemon's pid on its first line, then its socket path.
    lock_pid = int(Path(data_dir, "daemon.lock").read_text().splitlines()[0])
    assert daemons == [lock_pid]

    client = Client(Settings(socket_path=socket_path, data_dir=data_dir, autostart=False))
    cold = Dict.from_name("cold", client=client)
    assert sorted(cold.keys()) == sorted(pid for pid, _ in reports)
    client.close()


# Threads: one handle, many threads at once.

THREADS = 8
THREAD_OPERATIONS = 60


def test_threads_share_one_handle(module_daemon):
    shared = Dict.from_name("threads", create_if_missing=True)
    errors: list[str] = []
    start = threading.Barrier(THREADS)

    def hammer(thread_number: int) -> None:
        try:
            start.wait()
            for i in range(THREAD_OPERATIONS):
                key = (thread_number, i)
                shared[key] = [thread_number, i]
                assert shared[key] == [thread_number, i]
                assert shared.put(key, "again", skip_if_exists=True) is False
                if i % 3 == 0:
                    assert shared.pop(key) == [thread_number, i]
                    shared[key] = [thread_number, i]
                shared.update({("counter", thread_number): i})
        except BaseException:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=hammer, args=(number,)) for number in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert shared.len() == THREADS * THREAD_OPERATIONS + THREADS
    for thread_number in range(THREADS):
        assert shared[("counter", thread_number)] == THREAD_OPERATIONS - 1
        for i in range(THREAD_OPERATIONS):
            assert shared[(thread_number, i)] == [thread_number, i]


# Fork: a child opens its own connection and leaves the parent's alone.


def _run_in_fork(function) -> int:
    """Run ``function`` in a forked child and return the child's exit status."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            function()
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _connection_count() -> int:
    return Client.default().call(Request(protocol.STATUS))["connections"]


def test_fork_child_gets_own_connection(daemon):
    shared = Dict.from_name("fork", create_if_missing=True)
    shared["parent"] = os.getpid()
    parent_connections = _connection_count()

    def child() -> None:
        assert shared["parent"] == os.getppid()
        shared["child"] = os.getpid()
        # The parent's connection stays open in the parent, so the daemon now counts
        # one more: the child's own.
        assert _connection_count() == parent_connections + 1

    assert _run_in_fork(child) == 0
    assert shared["child"] != os.getpid()


def test_fork_child_gets_own_default_client(daemon):
    parent_client = Client.default()

    def child() -> None:
        assert Client.default() is not parent_client
        assert Client.default() is Client.default()

    assert _run_in_fork(child) == 0
    assert Client.default() is parent_client


def test_fork_leaves_parent_connection_working(module_daemon):
    shared = Dict.from_name("fork-parent", create_if_missing=True)
    with Dict.ephemeral() as owned:
        # An ephemeral dict dies with its owner's last connection, so it is still
        # there afterwards only if the child never closed the parent's connection.
        owned["parent"] = True

        def child() -> None:
            for i in range(50):
                shared[f"child-{i}"] = i
            Client.default().close()

        assert _run_in_fork(child) == 0
        assert owned["parent"] is True
        assert shared["child-49"] == 49
        shared["parent-after"] = "works"
        assert shared["parent-after"] == "works"


def test_fork_child_ephemeral_dict_is_its_own(module_daemon):
    read_end, write_end = os.pipe()

    def child() -> None:
        with Dict.ephemeral() as scratch:
            scratch["mine"] = True
            os.write(write_end, scratch.object_id.encode())
            # Exit without leaving the block: the daemon must clean up after the
            # child's own connection, which closes when the child dies.
            os._exit(0)

    assert _run_in_fork(child) == 0
    os.close(write_end)
    dict_id = os.read(read_end, 100).decode()
    os.close(read_end)

    orphan = Dict.from_id(dict_id)

    def orphan_deleted() -> bool:
        try:
            orphan.len()
        except NotFoundError:
            return True
        return False

    assert wait_until(orphan_deleted, timeout=30)


def test_fork_during_threads_child_works(module_daemon):
    shared = Dict.from_name("fork-threads", create_if_missing=True)
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            shared["busy"] = shared.get("busy", 0) + 1

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        statuses = [_run_in_fork(lambda: shared.put("from-child", os.getpid())) for _ in range(5)]
    finally:
        stop.set()
        worker.join()
    assert statuses == [0] * 5
    assert "from-child" in shared


# Visibility across processes.


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_other_process_sees_write_at_once(module_daemon):
    shared = Dict.from_name("visible", create_if_missing=True)
    shared["greeting"] = {"hello": "world"}
    completed = _python(
        "from sharedict import Dict; print(Dict.from_name('visible')['greeting'])",
        {**os.environ, **module_daemon.env},
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "{'hello': 'world'}"


def test_write_of_other_process_seen_at_once(module_daemon):
    shared = Dict.from_name("visible", create_if_missing=True).hydrate()
    completed = _python(
        "import os; from sharedict import Dict; Dict.from_name('visible')['pid'] = os.getpid(); print(os.getpid())",
        {**os.environ, **module_daemon.env},
    )
    assert completed.returncode == 0, completed.stderr
    assert shared["pid"] == int(completed.stdout)


# Stopping. The kernel delivers a signal sent to a process to any of its threads.


STOP_SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=[signum.name for signum in STOP_SIGNALS])
def test_signal_to_other_thread_stops_daemon(daemon, signum):
    shared = Dict.from_name("stopping", create_if_missing=True)
    shared["written"] = 1
    pid = daemon.process.pid
    threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]

    # kill() aimed at a thread id delivers the signal to that thread.
    os.kill(threads[-1], signum)

    assert daemon.process.wait(timeout=10) == 0
    assert f"received {signum.name}; stopping" in daemon.log()
    daemon.start()
    assert shared["written"] == 1


class OwnDaemons:
    """``sharedict serve`` processes that a test starts on one socket and kills at its end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket_dir = tempfile.mkdtemp(prefix="sd-", dir="/tmp")
        self.socket_path = os.path.join(self.socket_dir, "sharedict.sock")
        self.log_path = str(root / "daemon.log")
        self.processes: list[subprocess.Popen[bytes]] = []

    def spawn(self, data_dir: str) -> subprocess.Popen[bytes]:
        """Start a daemon without waiting for it to serve."""
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen(serve_command(self.socket_path, data_dir), stdout=log, stderr=log)
        self.processes.append(process)
        return process

    def start(self, preexec_fn: Callable[[], Any] | None = None) -> subprocess.Popen[bytes]:
        """Start a daemon on the data directory ``data`` and wait until it serves."""
        command = serve_command(self.socket_path, str(self.root / "data"))
        process = launch_daemon(command, self.socket_path, self.log_path, preexec_fn=preexec_fn)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


@pytest.fixture
def own_daemons(tmp_path: Path) -> Iterator[OwnDaemons]:
    daemons = OwnDaemons(tmp_path)
    yield daemons
    daemons.close()


def test_signal_at_startup_stops_daemon_cleanly(own_daemons, tmp_path):
    # The socket file appears when the daemon binds it, before it accepts connections.
    # A signal from then on must stop the daemon gracefully and remove the socket.
    for attempt in range(10):
        process = own_daemons.spawn(str(tmp_path / f"data-{attempt}"))
        while not os.path.exists(own_daemons.socket_path):  # polled without pauses, to signal at once
            assert process.poll() is None, f"the daemon exited with status {process.returncode}"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert not os.path.exists(own_daemons.socket_path)


def test_inherited_blocked_sigterm_stops_daemon(own_daemons):
    # A program that blocks SIGTERM passes its mask to the daemon it auto-starts.
    process = own_daemons.start(preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM]))
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT], ids=["SIGHUP", "SIGINT"])
def test_ignored_signal_of_parent_stays_ignored(own_daemons, signum):
    # nohup ignores SIGHUP, and a shell ignores SIGINT for a background job.
    process = own_daemons.start(preexec_fn=lambda: signal.signal(signum, signal.SIG_IGN))
    process.send_signal(signum)
    # A daemon that took the signal as a stop request exits within milliseconds.
    assert not wait_until(lambda: process.poll() is not None, timeout=1)
    assert socket_accepts(own_daemons.socket_path)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0


def test_signals_during_shutdown_end_daemon_cleanly(own_daemons):
    for attempt in range(5):
        process = own_daemons.start()
        # Keep signalling until the process is gone, through its shutdown and its exit.
        while process.poll() is None:
            for signum in STOP_SIGNALS:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)
            time.sleep(0.0005)
        assert process.returncode == 0, f"attempt {attempt}"
    assert read_log(own_daemons.log_path).count("sharedict stopped") == 5


def test_detached_daemon_releases_callers_pipes(cold_paths):
    # As in $(sharedict serve --detach): the caller reads until every copy of its pipe closes.
    socket_path, data_dir = cold_paths
    completed = subprocess.run(
        serve_command(socket_path, data_dir, "--detach"), capture_output=True, text=True, timeout=30, check=False
    )
    assert completed.returncode == 0
    assert completed.stdout == ""
    assert completed.stderr == ""
    assert wait_until(lambda: "serving" in read_log(os.path.join(data_dir, "daemon.log")))


@pytest.mark.parametrize("closed", [(1,), (2,), (1, 2)], ids=["stdout", "stderr", "both"])
def test_detach_with_closed_standard_streams(cold_paths, closed):
    socket_path, data_dir = cold_paths
    completed = subprocess.run(
        serve_command(socket_path, data_dir, "--detach"),
        preexec_fn=lambda: os.closerange(closed[0], closed[-1] + 1),
        timeout=30,
        check=False,
    )
    assert completed.returncode == 0
    assert wait_until(lambda: "serving" in read_log(os.path.join(data_dir, "daemon.log")))


def test_detached_daemon_closes_inherited_descriptors(cold_paths):
    # As in `sharedict serve --detach 3>&1 | cat`: cat waits for every writer to close.
    socket_path, data_dir = cold_paths
    read_end, write_end = os.pipe()
    try:
        completed = subprocess.run(
            serve_command(socket_path, data_dir, "--detach"), pass_fds=[write_end], timeout=30, check=False
        )
        os.close(write_end)
        assert completed.returncode == 0
        readable, _, _ = select.select([read_end], [], [], 10)
        assert readable, "the daemon kept the write end of the caller's pipe"
        assert os.read(read_end, 1) == b""
    finally:
        os.close(read_end)


def test_detach_report_survives_parent_gone():
    read_end, write_end = os.pipe()
    os.close(read_end)
    report = cli._StartupReport(write_end)
    assert report.send(b"ready") is False
    with pytest.raises(OSError):
        os.fstat(write_end)


# Reconnecting after the daemon restarts.


@pytest.mark.parametrize("crash", [False, True], ids=["graceful", "crash"])
def test_client_reconnects_after_restart(daemon, crash):
    shared = Dict.from_name("restart", create_if_missing=True)
    shared["before"] = 1
    daemon.restart(crash=crash)
    assert shared["before"] == 1
    shared["after"] = 2
    assert shared["after"] == 2


@pytest.mark.parametrize("crash", [False, True], ids=["graceful", "crash"])
def test_client_write_first_after_restart(daemon, crash):
    shared = Dict.from_name("restart", create_if_missing=True)
    shared["before"] = 1
    daemon.restart(crash=crash)
    shared["after"] = 2
    assert shared["after"] == 2


def test_pooled_connections_reconnect_after_restart(daemon):
    shared = Dict.from_name("restart", create_if_missing=True)
    barrier = threading.Barrier(4)

    def use() -> None:
        barrier.wait()
        shared["pool"] = shared.get("pool", 0)

    threads = [threading.Thread(target=use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    daemon.restart(crash=True)
    for i in range(8):
        shared[f"after-{i}"] = i
    assert shared.len() == 9


@pytest.mark.parametrize("crash", [False, True], ids=["graceful", "crash"])
def test_async_client_reconnects_after_restart(daemon, crash):
    async def scenario() -> int:
        shared = Dict.from_name("restart-aio", create_if_missing=True)
        await shared.put.aio("before", 1)
        await asyncio.get_running_loop().run_in_executor(None, lambda: daemon.restart(crash=crash))
        await shared.put.aio("after", 2)
        return await shared.get.aio("before")

    assert asyncio.run(scenario()) == 1
