"""Timing: per-call latencies, percentiles, and runs of several worker processes.

Clocks: ``time.perf_counter`` is CLOCK_MONOTONIC on Linux, one clock for every process
of the machine, so the start and end times that workers report can be compared.
"""

from __future__ import annotations

import gc
import multiprocessing
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.systems import StoreSpec

WORKER_TIMEOUT = 600.0


@dataclass(frozen=True)
class Latencies:
    """Per-call latencies in nanoseconds, and the wall time of the whole loop in seconds."""

    samples: list[int]
    elapsed: float

    def percentile(self, fraction: float) -> float:
        """Return the latency at ``fraction`` (0.5 for p50) in microseconds, nearest rank."""
        ordered = sorted(self.samples)
        rank = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
        return ordered[rank] / 1000

    @property
    def ops_per_second(self) -> float:
        return len(self.samples) / self.elapsed

    @classmethod
    def combine(cls, parts: Iterable[Latencies]) -> Latencies:
        """Join the latencies of several timed blocks into one set."""
        samples: list[int] = []
        elapsed = 0.0
        for part in parts:
            samples.extend(part.samples)
            elapsed += part.elapsed
        return cls(samples, elapsed)


def time_each(operation: Callable[[Any], Any], arguments: Sequence[Any]) -> Latencies:
    """Call ``operation`` once per argument and time each call."""
    clock = time.perf_counter_ns
    samples = []
    gc.collect()
    started = time.perf_counter()
    for argument in arguments:
        before = clock()
        operation(argument)
        samples.append(clock() - before)
    return Latencies(samples, time.perf_counter() - started)


def time_once(function: Callable[[], Any]) -> float:
    """Return the seconds that one call of ``function`` takes."""
    gc.collect()
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def consume(iterator: Iterable[Any]) -> int:
    count = 0
    for _ in iterator:
        count += 1
    return count


# Worker processes.

WorkerBody = Callable[..., int]
"""A worker's step: called with the store and the worker's arguments, returns its op count."""


@dataclass(frozen=True)
class WorkerReport:
    operations: int
    started: float
    finished: float


def _worker_main(connection: Any) -> None:
    """Run tasks from the pool until it sends None: open, warm up, report ready, wait, run."""
    while True:
        task = connection.recv()
        if task is None:
            return
        spec, warm_up, body, arguments = task
        try:
            store = spec.open()
            try:
                warm_up(store, *arguments)
                connection.send("ready")
                if connection.recv() != "go":
                    return  # the pool is closing because another worker failed
                started = time.perf_counter()
                operations = body(store, *arguments)
                finished = time.perf_counter()
            finally:
                store.close()
            connection.send(WorkerReport(operations, started, finished))
        except Exception:
            connection.send(traceback.format_exc())


class WorkerPool:
    """Worker processes that run a timed step together, started once and reused.

    Processes are spawned rather than forked, because a forked copy of an open
    connection or LMDB environment is not safe to use. Spawning costs a second or more
    per process on a busy machine, so a pool starts them once for a whole workload.
    """

    def __init__(self, size: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._connections = []
        self._processes = []
        for _ in range(size):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_worker_main, args=(child_end,), daemon=True)
            process.start()
            child_end.close()
            self._connections.append(parent_end)
            self._processes.append(process)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run(
        self,
        spec: StoreSpec,
        warm_up: WorkerBody,
        body: WorkerBody,
        arguments_per_worker: Sequence[tuple[Any, ...]],
    ) -> list[WorkerReport]:
        """Run ``body`` in one worker per argument tuple, all starting at the same moment.

        Each worker opens the store itself and runs ``warm_up`` first; the timed step
        starts once every worker is ready.
        """
        if len(arguments_per_worker) > len(self._connections):
            raise ValueError(f"{len(arguments_per_worker)} workers requested from a pool of {len(self._connections)}")
        connections = self._connections[: len(arguments_per_worker)]
        for connection, arguments in zip(connections, arguments_per_worker):
            connection.send((spec, warm_up, body, arguments))

        ready = [self._receive(connection, spec) for connection in connections]
        failures = [reply for reply in ready if reply != "ready"]
        if not failures:
            for connection in connections:
                connection.send("go")
            reports = [self._receive(connection, spec) for connection in connections]
            failures = [report for report in reports if not isinstance(report, WorkerReport)]
        if failures:
            self.close()
            raise RuntimeError(f"{len(failures)} worker(s) of {spec.variant.name} failed:\n" + "\n".join(failures))
        return reports

    def _receive(self, connection: Any, spec: StoreSpec) -> Any:
        if not connection.poll(WORKER_TIMEOUT):
            return f"a worker sent nothing within {WORKER_TIMEOUT:.0f} s"
        try:
            return connection.recv()
        except (EOFError, OSError):
            return "a worker exited without a report; its traceback is above on stderr"

    def close(self) -> None:
        for connection in self._connections:
            try:
                connection.send(None)
            except OSError:
                pass  # that worker is gone already
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        self._connections = []
        self._processes = []


def combined_rate(runs: Sequence[Sequence[WorkerReport]]) -> float:
    """Return the operations per second of several runs of workers, over their spans added up."""
    operations = sum(report.operations for reports in runs for report in reports)
    span = sum(max(r.finished for r in reports) - min(r.started for r in reports) for reports in runs)
    return operations / span
