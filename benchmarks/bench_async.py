"""Throughput of gathered ``get.aio`` calls on one connection, beside the same gets made one by one.

Run ``python -m benchmarks.bench_async`` (``--help`` lists the options). One run, one
daemon (``python -m sharedict serve``) on temporary directories:

1. Write ``--gets`` entries with distinct keys and values to the dict "bench".
2. Warm up both forms with one untimed round each.
3. For each of ``--rounds`` rounds, get every key once with the blocking API, one call
   after the other. Then get every key once as ``asyncio.gather`` of ``get.aio`` calls on
   one event loop, which sends them all on the loop's one connection. Every value is
   checked. The two forms take turns so that a busy spell of the machine hits both.

It prints the median ops/s of each form and their ratio, the p50 and p99 latency of the
blocking gets, and the CPU time per get of the client and of the daemon, which depends
less than the wall time on what else runs on the machine. It also prints the throughput
of gathering the same number of futures that the loop resolves at once: no sharedict code
and no I/O. Inside a running loop ``get.aio`` returns such a future, so that is the most
any gather of this size can do in this Python on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.measure import Latencies
from benchmarks.report import measure_in_scratch, print_environment, write_json
from benchmarks.servers import SharedictServer
from sharedict import Dict
from sharedict.api.config import Settings
from sharedict.api.transport import Client

UPDATE_BATCH = 10_000
GOAL_OPS_PER_SECOND = 100_000
GOAL_RATIO = 5.0


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_async",
        description="Measure gathered get.aio calls on one connection against the same gets made one by one.",
    )
    parser.add_argument("--gets", type=int, default=10_000, help="Gets per round, each of a distinct key [default: 10000].")
    parser.add_argument("--rounds", type=int, default=5, help="Timed rounds of each form [default: 5].")
    parser.add_argument("--tmp-dir", metavar="DIR", help="Directory for the data [default: the system's].")
    parser.add_argument("--json", metavar="PATH", help="Write the results, machine, versions and commit as JSON to PATH.")
    arguments = parser.parse_args(argv)
    if arguments.gets < 1 or arguments.rounds < 1:
        parser.error("--gets and --rounds must be at least 1")
    return arguments


def daemon_cpu_seconds(pid: int) -> float:
    """Return the user and system CPU time that process ``pid`` has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Round:
    """The wall time and the CPU time of the client and of the daemon, for one round of gets."""

    def __init__(self, daemon_pid: int) -> None:
        self.daemon_pid = daemon_pid
        self.seconds = 0.0
        self.client_cpu = 0.0
        self.daemon_cpu = 0.0

    def __enter__(self) -> Round:
        self._client_cpu = time.process_time()
        self._daemon_cpu = daemon_cpu_seconds(self.daemon_pid)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self._start
        self.client_cpu = time.process_time() - self._client_cpu
        self.daemon_cpu = daemon_cpu_seconds(self.daemon_pid) - self._daemon_cpu


def blocking_round(bench: Dict, keys: list[str], expected: list[str], daemon_pid: int) -> tuple[Round, list[int]]:
    clock = time.perf_counter_ns
    latencies: list[int] = []
    values = []
    with Round(daemon_pid) as timed:
        for key in keys:
            before = clock()
            values.append(bench.get(key))
            latencies.append(clock() - before)
    check(values, expected, "get")
    return timed, latencies


async def gathered_round(bench: Dict, keys: list[str], expected: list[str], daemon_pid: int) -> Round:
    await bench.get.aio(keys[0])  # the loop's connection is open before the clock starts
    with Round(daemon_pid) as timed:
        values = await asyncio.gather(*(bench.get.aio(key) for key in keys))
    check(values, expected, "get.aio")
    return timed


async def asyncio_floor_round(count: int, daemon_pid: int) -> Round:
    """Gather ``count`` futures that the loop resolves at once, one callback each.

    A gathered ``get.aio`` is such a future, resolved by the callback that receives its
    reply, so this is the most that gathering can do here without any sharedict code.
    """
    loop = asyncio.get_running_loop()

    with Round(daemon_pid) as timed:
        futures = []
        for index in range(count):
            future = loop.create_future()
            loop.call_soon(future.set_result, index)
            futures.append(future)
        await asyncio.gather(*futures)
    return timed


def check(values: list[Any], expected: list[str], form: str) -> None:
    for key_index, (value, wanted) in enumerate(zip(values, expected)):
        if value != wanted:
            raise RuntimeError(f"{form} of key {key_index} returned {value!r} instead of {wanted!r}")
    if len(values) != len(expected):
        raise RuntimeError(f"{form} returned {len(values)} values for {len(expected)} keys")


def summarize(rounds: list[Round], gets: int) -> dict[str, Any]:
    rates = [gets / timed.seconds for timed in rounds]
    return {
        "ops_per_second_median": round(statistics.median(rates)),
        "ops_per_second_best": round(max(rates)),
        "ops_per_second_worst": round(min(rates)),
        "client_cpu_us_per_get": round(statistics.median(timed.client_cpu for timed in rounds) / gets * 1e6, 1),
        "daemon_cpu_us_per_get": round(statistics.median(timed.daemon_cpu for timed in rounds) / gets * 1e6, 1),
    }


def run(arguments: argparse.Namespace, root: str) -> dict[str, Any]:
    daemon = SharedictServer(root)
    daemon.start()
    client = Client(Settings(socket_path=daemon.socket_path, data_dir=daemon.data_dir, autostart=False))
    loop = asyncio.new_event_loop()
    try:
        bench = Dict.from_name("bench", create_if_missing=True, client=client)
        keys = [f"key-{index}" for index in range(arguments.gets)]
        expected = [f"value-{index}" for index in range(arguments.gets)]
        for start in range(0, arguments.gets, UPDATE_BATCH):
            bench.update(zip(keys[start : start + UPDATE_BATCH], expected[start : start + UPDATE_BATCH]))

        print(f"warm-up: one round of {arguments.gets:,} gets in each form")
        blocking_round(bench, keys, expected, daemon.pid)
        loop.run_until_complete(gathered_round(bench, keys, expected, daemon.pid))

        blocking: list[Round] = []
        gathered: list[Round] = []
        latencies: list[int] = []
        floor: list[Round] = []
        for number in range(1, arguments.rounds + 1):
            timed, round_latencies = blocking_round(bench, keys, expected, daemon.pid)
            blocking.append(timed)
            latencies.extend(round_latencies)
            gathered.append(loop.run_until_complete(gathered_round(bench, keys, expected, daemon.pid)))
            floor.append(loop.run_until_complete(asyncio_floor_round(arguments.gets, daemon.pid)))
            print(
                f"round {number}: blocking {arguments.gets / timed.seconds:,.0f} ops/s, "
                f"gathered {arguments.gets / gathered[-1].seconds:,.0f} ops/s"
            )
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        client.close()
        daemon.stop()

    blocking_summary = summarize(blocking, arguments.gets)
    latency = Latencies(latencies, sum(timed.seconds for timed in blocking))
    blocking_summary["p50_us"] = round(latency.percentile(0.50), 1)
    blocking_summary["p99_us"] = round(latency.percentile(0.99), 1)
    gathered_summary = summarize(gathered, arguments.gets)
    floor_summary = summarize(floor, arguments.gets)
    del floor_summary["daemon_cpu_us_per_get"]
    ratio = gathered_summary["ops_per_second_median"] / blocking_summary["ops_per_second_median"]
    return {
        "gets": arguments.gets,
        "rounds": arguments.rounds,
        "blocking": blocking_summary,
        "gathered_aio": gathered_summary,
        "ratio": round(ratio, 2),
        "asyncio_floor": floor_summary,
        "goal_ops_per_second": GOAL_OPS_PER_SECOND,
        "goal_ratio": GOAL_RATIO,
        "goal_met": gathered_summary["ops_per_second_median"] >= GOAL_OPS_PER_SECOND and ratio >= GOAL_RATIO,
    }


def print_results(results: dict[str, Any]) -> None:
    blocking, gathered = results["blocking"], results["gathered_aio"]
    print()
    print(f"{results['gets']:,} gets per round, median of {results['rounds']} rounds:")
    print(
        f"  blocking, one by one:   {blocking['ops_per_second_median']:>9,} ops/s  "
        f"(p50 {blocking['p50_us']} us, p99 {blocking['p99_us']} us; "
        f"CPU per get: client {blocking['client_cpu_us_per_get']} us, daemon {blocking['daemon_cpu_us_per_get']} us)"
    )
    print(
        f"  gathered get.aio:       {gathered['ops_per_second_median']:>9,} ops/s  "
        f"(best {gathered['ops_per_second_best']:,}; "
        f"CPU per get: client {gathered['client_cpu_us_per_get']} us, daemon {gathered['daemon_cpu_us_per_get']} us)"
    )
    floor = results["asyncio_floor"]
    print(
        f"  asyncio alone (floor):  {floor['ops_per_second_median']:>9,} ops/s  "
        f"(CPU per call: {floor['client_cpu_us_per_get']} us)"
    )
    print(f"  ratio gathered / blocking: {results['ratio']:g}")
    verdict = "met" if results["goal_met"] else "missed"
    print(f"goal: >= {GOAL_OPS_PER_SECOND:,} ops/s gathered and >= {GOAL_RATIO:g} x blocking: {verdict}")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    results, environment = measure_in_scratch("bench_async", argv, arguments.tmp_dir, lambda root: run(arguments, root))
    environment["arguments"] = vars(arguments)

    print_results(results)
    print_environment(environment)
    if arguments.json:
        write_json(arguments.json, {**results, **environment})
    return 0 if results["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
