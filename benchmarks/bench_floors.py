"""Floors under sharedict's durable writes and reads: the costs of the disk and the socket.

Run ``python -m benchmarks.bench_floors`` (``--help`` lists the options). In one run, on
the same disk, it times the steps a request cannot avoid, beside sharedict itself:

- ``append + fdatasync``: 120 bytes appended to a file, then fdatasync. Redis with
  ``appendfsync always`` pays this once per write.
- ``LMDB commit, 1 table``: a py-lmdb write transaction with one 100-byte put, committed
  with ``sync=True``. LMDB flushes twice per commit: the data pages with fdatasync, then
  the meta page, so that a crash never leaves a meta page that points at missing pages.
- ``LMDB commit, sharedict layout``: ``Store.put`` of a new key in sharedict's engine,
  in the process, committed durably: the same two flushes, and the pages of the four
  tables an insert changes (entries, insertion order, last access, counts).
- ``socket round trip``: 50 bytes to a Python process that sends them back over a Unix
  socket, with a thread blocked in ``recv`` on each side, as sharedict's daemon and
  client do.
- ``sharedict put`` and ``sharedict get``: the same 100-byte value through a daemon.

The round trips and the gets are timed three ways: on the CPUs that the scheduler
picks, with both processes pinned to one CPU, and pinned to two different CPUs (when the
machine has two). On a VM the last two differ several times over, because a wake-up that
crosses CPUs may have to wake an idle virtual CPU.

Every figure is the p50 and p99 of ``--count`` calls, in microseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lmdb

from benchmarks.measure import Latencies
from benchmarks.report import measure_in_scratch, print_environment, write_json
from benchmarks.servers import SharedictServer
from sharedict import Dict
from sharedict.api.config import Settings
from sharedict.api.transport import Client
from sharedict.engine import Store

VALUE = b"x" * 100
MESSAGE = b"m" * 50

# A Python process that sends back what it receives, as a daemon's connection thread would.
ECHO_SERVER = """
import os, socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(1)
os.close(1)  # the parent's read of stdout ends here, once the socket listens
connection, _ = listener.accept()
while data := connection.recv(65536):
    connection.sendall(data)
"""


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_floors",
        description="Time an fsync'd append, LMDB commits and a socket round trip beside sharedict's put and get.",
    )
    parser.add_argument("--count", type=int, default=2000, help="Calls timed for each figure [default: 2000].")
    parser.add_argument("--tmp-dir", metavar="DIR", help="Directory for the data, on the disk to measure [default: the system's].")
    parser.add_argument("--json", metavar="PATH", help="Write the results, machine, versions and commit as JSON to PATH.")
    arguments = parser.parse_args(argv)
    if arguments.count < 1:
        parser.error("--count must be at least 1")
    return arguments


def timed(count: int, step: Callable[[int], Any]) -> Latencies:
    clock = time.perf_counter_ns
    samples = []
    started = time.perf_counter()
    for index in range(count):
        before = clock()
        step(index)
        samples.append(clock() - before)
    return Latencies(samples, time.perf_counter() - started)


def append_fdatasync(root: str, count: int) -> Latencies:
    descriptor = os.open(os.path.join(root, "append.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    record = b"r" * 120

    def append(_: int) -> None:
        os.write(descriptor, record)
        os.fdatasync(descriptor)

    try:
        return timed(count, append)
    finally:
        os.close(descriptor)


def lmdb_commit(root: str, count: int) -> Latencies:
    env = lmdb.open(os.path.join(root, "lmdb"), map_size=1 << 30, sync=True, metasync=True)

    def commit(index: int) -> None:
        with env.begin(write=True) as txn:
            txn.put(b"key-%d" % index, VALUE)

    try:
        return timed(count, commit)
    finally:
        env.close()


def store_commit(root: str, count: int) -> Latencies:
    store = Store(os.path.join(root, "store"), expire_after=7 * 24 * 3600)
    with store.begin_write() as txn:
        record, _ = store.create_dict(txn, "main", "floor", created_by="bench", exist_ok=False)

    def commit(index: int) -> None:
        with store.begin_write() as txn:
            store.put(txn, record.object_id, b"key-%d" % index, None, VALUE)

    try:
        return timed(count, commit)
    finally:
        store.close()


Placement = tuple[set[int], set[int]]
"""The CPUs of a server's threads and of the calling thread."""


def placements() -> dict[str, Placement | None]:
    """Return the placements to time round trips under, by the suffix of their step's name.

    None leaves the processes where the scheduler puts them.
    """
    cpus = sorted(os.sched_getaffinity(0))
    result: dict[str, Placement | None] = {"": None, ", one CPU": ({cpus[0]}, {cpus[0]})}
    if len(cpus) > 1:
        result[", two CPUs"] = ({cpus[0]}, {cpus[1]})
    return result


@contextlib.contextmanager
def pinned(server_pid: int, placement: Placement | None) -> Iterator[None]:
    """Pin every thread of process ``server_pid``, and the calling thread, to the CPUs of ``placement``."""
    if placement is None:
        yield
        return
    server_cpus, client_cpus = placement
    allowed = os.sched_getaffinity(0)
    server_allowed = os.sched_getaffinity(server_pid)
    threads = [int(thread) for thread in os.listdir(f"/proc/{server_pid}/task")]
    for thread in threads:
        os.sched_setaffinity(thread, server_cpus)
    os.sched_setaffinity(0, client_cpus)  # the calling thread only
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)
        for thread in threads:
            with contextlib.suppress(ProcessLookupError):  # a thread that has ended since
                os.sched_setaffinity(thread, server_allowed)


def socket_round_trips(count: int) -> dict[str, Latencies]:
    """Time round trips to an echo process under each placement."""
    path = os.path.join(tempfile.mkdtemp(prefix="floor-", dir="/tmp"), "echo.sock")
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, path], stdout=subprocess.PIPE)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.stdout.read()  # returns once the server has closed its stdout, after listen()
        client.connect(path)

        def round_trip(_: int) -> None:
            client.sendall(MESSAGE)
            received = 0
            while received < len(MESSAGE):
                received += len(client.recv(65536))

        results = {}
        for suffix, placement in placements().items():
            with pinned(server.pid, placement):
                results[f"socket round trip{suffix}"] = timed(count, round_trip)
        return results
    finally:
        client.close()
        server.wait()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def sharedict_calls(root: str, count: int) -> dict[str, Latencies]:
    """Time puts of new keys, then gets of them under each placement."""
    daemon = SharedictServer(root)
    daemon.start()
    client = Client(Settings(socket_path=daemon.socket_path, data_dir=daemon.data_dir, autostart=False))
    try:
        floor = Dict.from_name("floor", create_if_missing=True, client=client)
        value = VALUE.decode()
        results = {"sharedict put": timed(count, lambda index: floor.put(f"key-{index}", value))}
        for suffix, placement in placements().items():
            with pinned(daemon.pid, placement):
                results[f"sharedict get{suffix}"] = timed(count, lambda index: floor.get(f"key-{index}"))
        return results
    finally:
        client.close()
        daemon.stop()


def summary(latencies: Latencies) -> dict[str, float]:
    return {"p50_us": round(latencies.percentile(0.50), 1), "p99_us": round(latencies.percentile(0.99), 1)}


def run(arguments: argparse.Namespace, root: str) -> dict[str, dict[str, float]]:
    count = arguments.count
    calls = sharedict_calls(root, count)
    steps = {
        "append + fdatasync": append_fdatasync(root, count),
        "LMDB commit, 1 table": lmdb_commit(root, count),
        "LMDB commit, sharedict layout": store_commit(root, count),
        **socket_round_trips(count),
        **calls,
    }
    return {step: summary(latencies) for step, latencies in steps.items()}


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    floors, environment = measure_in_scratch("bench_floors", argv, arguments.tmp_dir, lambda root: run(arguments, root))

    width = max(map(len, floors))
    print(f"{'step':<{width}}  {'p50 (µs)':>9}  {'p99 (µs)':>9}")
    for step, figures in floors.items():
        print(f"{step:<{width}}  {figures['p50_us']:>9,.1f}  {figures['p99_us']:>9,.1f}")
    print_environment(environment)
    if arguments.json:
        write_json(arguments.json, {"floors": floors, "count": arguments.count, **environment})
    return 0


if __name__ == "__main__":
    sys.exit(main())
