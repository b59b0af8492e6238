"""Latency of ``get`` while the sweeper removes expired entries, beside the same load with nothing to sweep.

Run ``python -m benchmarks.bench_sweep`` (``--help`` lists the sizes). One run, one daemon
on temporary directories, with ``--expire-after E --sweep-interval I`` throughout:

1. Write ``--entries`` entries to the dict "expiring" with ``update`` in batches of
   10,000, and ``--live-keys`` entries to the dict "live".
2. Baseline before: a closed loop of ``get`` on random live keys for ``--seconds``, timing
   each call. The gets keep the live keys alive, and the sweeper runs every I seconds but
   finds nothing to remove.
3. Stop the daemon until every entry of "expiring" has expired, so that the sweeper finds
   all of them at once, then start it again with the same data and settings.
4. Sweep: the same loop of ``get``, timed from the first status poll that reports swept
   entries until the first that reports every expired entry swept.
5. Baseline after: the same loop for ``--seconds`` more on the same daemon, once the
   sweep is done.

The sweep's p99 is compared with the p99 of both baselines together, because other
programs on a shared machine change the latency over the minutes between the phases.
A thread polls the daemon's ``status`` every 50 ms in every phase, to see the sweep's
progress, so all phases carry the same extra load.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.measure import Latencies
from benchmarks.report import measure_in_scratch, print_environment, write_json
from benchmarks.servers import SharedictServer
from sharedict import Dict
from sharedict.api import protocol
from sharedict.api.config import Settings
from sharedict.api.transport import Client, Request

UPDATE_BATCH = 10_000
STATUS_POLL_INTERVAL = 0.05
WARM_UP_SECONDS = 2.0
# The goal: the p99 of get during the sweep is at most this many times the baselines' p99.
GOAL_P99_RATIO = 2.0
SWEEP_TIMEOUT = 1800.0


class ExpiryDaemon(SharedictServer):
    """The benchmark's daemon, with expiry settings and INFO logs for the sweep's summary."""

    def __init__(self, root: str, expire_after: float, sweep_interval: float) -> None:
        super().__init__(root)
        self.expire_after = expire_after
        self.sweep_interval = sweep_interval

    def command(self) -> list[str]:
        # A repeated flag takes its last value, so this --log-level wins.
        return [
            *super().command(),
            "--expire-after",
            repr(self.expire_after),
            "--sweep-interval",
            repr(self.sweep_interval),
            "--log-level",
            "INFO",
        ]

    def client(self) -> Client:
        return Client(Settings(socket_path=self.socket_path, data_dir=self.data_dir, autostart=False))


@dataclass
class Phase:
    """The timed gets of one phase, with the start time of each, on the perf_counter clock."""

    name: str
    starts: list[float]
    latencies_ns: list[int]

    def window(self, start: float, end: float) -> Latencies:
        """Return the latencies of the gets that started between ``start`` and ``end``."""
        samples = [ns for began, ns in zip(self.starts, self.latencies_ns) if start <= began <= end]
        if not samples:
            raise RuntimeError(f"no get of the {self.name} phase fell between its start and end")
        return Latencies(samples, end - start)


class StatusMonitor:
    """Polls the daemon's status on a connection of its own, and records the sweep's progress."""

    def __init__(self, daemon: ExpiryDaemon) -> None:
        self._client = daemon.client()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-monitor", daemon=True)
        self.samples: list[tuple[float, int]] = []  # (perf_counter, swept_entries)

    def __enter__(self) -> StatusMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()

    def _run(self) -> None:
        while not self._stop.wait(STATUS_POLL_INTERVAL):
            swept = self._client.call(Request(protocol.STATUS))["swept_entries"]
            self.samples.append((time.perf_counter(), swept))

    def first_time(self, swept_at_least: int) -> float | None:
        for moment, swept in self.samples:
            if swept >= swept_at_least:
                return moment
        return None


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_sweep",
        description="Measure the latency of get while the sweeper removes expired entries, beside the "
        "same load with nothing to sweep. Starts its own daemon on temporary directories.",
    )
    parser.add_argument("--entries", type=int, default=1_000_000, help="Entries that expire [default: 1000000].")
    parser.add_argument("--live-keys", type=int, default=1000, help="Live keys that the gets read [default: 1000].")
    parser.add_argument(
        "--seconds", type=float, default=15.0, help="Length of each baseline phase in seconds [default: 15]."
    )
    parser.add_argument(
        "--expire-after",
        type=float,
        default=120.0,
        help="The daemon's expire_after in seconds; it must exceed the time to write the entries plus the "
        "baseline [default: 120].",
    )
    parser.add_argument(
        "--sweep-interval", type=float, default=3.0, help="The daemon's sweep interval in seconds [default: 3]."
    )
    parser.add_argument("--tmp-dir", metavar="DIR", help="Directory for the data [default: the system's].")
    parser.add_argument("--json", metavar="PATH", help="Write the results and the machine as JSON to PATH.")
    arguments = parser.parse_args(argv)
    if arguments.entries < 1 or arguments.live_keys < 1:
        parser.error("--entries and --live-keys must be at least 1")
    if arguments.sweep_interval <= 0 or arguments.expire_after <= 0:
        parser.error("--sweep-interval and --expire-after must be positive")
    return arguments


def fill(client: Client, entries: int) -> None:
    expiring = Dict.from_name("expiring", create_if_missing=True, client=client)
    for start in range(0, entries, UPDATE_BATCH):
        stop = min(entries, start + UPDATE_BATCH)
        expiring.update({f"expiring-{index}": b"x" * 100 for index in range(start, stop)})


def write_live_keys(client: Client, live_keys: int) -> None:
    live = Dict.from_name("live", create_if_missing=True, client=client)
    live.update({f"live-{index}": index for index in range(live_keys)})


def run_gets(client: Client, live_keys: int, name: str, until: threading.Event | float) -> Phase:
    """Get random live keys in a closed loop until ``until`` (a perf_counter time, or an event)."""
    live = Dict.from_name("live", client=client)
    keys = [f"live-{index}" for index in range(live_keys)]
    choose = random.Random(0).choice
    clock = time.perf_counter_ns
    starts: list[float] = []
    latencies: list[int] = []

    def running() -> bool:
        if isinstance(until, threading.Event):
            return not until.is_set()
        return time.perf_counter() < until

    while running():
        key = choose(keys)
        before = clock()
        live.get(key)
        latencies.append(clock() - before)
        starts.append(before / 1e9)
    return Phase(name, starts, latencies)


def stop_after_sweep(monitor: StatusMonitor, entries: int, after_seconds: float, done: threading.Event) -> None:
    """Set ``done`` ``after_seconds`` after the sweeper has removed ``entries``, or at the timeout."""
    deadline = time.monotonic() + SWEEP_TIMEOUT
    while monitor.first_time(entries) is None and time.monotonic() < deadline:
        time.sleep(STATUS_POLL_INTERVAL)
    if monitor.first_time(entries) is not None:
        time.sleep(after_seconds)
    done.set()


def summarize(name: str, latencies: Latencies) -> dict[str, Any]:
    return {
        "phase": name,
        "gets": len(latencies.samples),
        "seconds": round(latencies.elapsed, 2),
        "p50_us": round(latencies.percentile(0.50), 1),
        "p99_us": round(latencies.percentile(0.99), 1),
        "max_us": round(max(latencies.samples) / 1000, 1),
        "gets_per_second": round(latencies.ops_per_second),
    }


def run(arguments: argparse.Namespace, root: str) -> dict[str, Any]:
    daemon = ExpiryDaemon(root, arguments.expire_after, arguments.sweep_interval)
    daemon.start()
    try:
        client = daemon.client()
        print(f"writing {arguments.entries} entries that will expire, and {arguments.live_keys} live ones")
        fill_started = time.time()
        fill(client, arguments.entries)
        fill_ended = time.time()
        write_live_keys(client, arguments.live_keys)
        fill_seconds = fill_ended - fill_started
        print(f"  {fill_seconds:.1f} s, {arguments.entries / fill_seconds:,.0f} entries/s")

        print(f"baseline before: {arguments.seconds:g} s of gets with nothing to sweep")
        run_gets(client, arguments.live_keys, "warm-up", time.perf_counter() + WARM_UP_SECONDS)
        with StatusMonitor(daemon) as monitor:
            started = time.perf_counter()
            before_phase = run_gets(client, arguments.live_keys, "baseline before", started + arguments.seconds)
            ended = time.perf_counter()
        if time.time() > fill_started + arguments.expire_after:
            raise RuntimeError(
                f"entries began to expire before the baseline ended; rerun with --expire-after above "
                f"{time.time() - fill_started + 30:.0f}"
            )
        if monitor.samples[-1][1] != 0:
            raise RuntimeError("the sweeper removed entries during the baseline; raise --expire-after")
        before = before_phase.window(started, ended)
        # Random gets may miss a few live keys; a write makes sure none expires while stopped.
        write_live_keys(client, arguments.live_keys)
        client.close()

        # Every entry written by fill_ended has expired 1% of expire_after later.
        daemon.stop()
        all_expired_at = fill_ended + arguments.expire_after * 1.01 + 1
        print(f"daemon stopped for {all_expired_at - time.time():.0f} s, until every entry has expired")
        time.sleep(max(0.0, all_expired_at - time.time()))
        daemon.start()

        print(f"sweep: gets while the sweeper removes {arguments.entries} expired entries, then baseline after")
        client = daemon.client()
        # Written before the first sweep starts, one sweep interval after the start.
        write_live_keys(client, arguments.live_keys)
        done = threading.Event()
        with StatusMonitor(daemon) as monitor:
            waiter = threading.Thread(
                target=stop_after_sweep, args=(monitor, arguments.entries, arguments.seconds, done), daemon=True
            )
            waiter.start()
            sweep_phase = run_gets(client, arguments.live_keys, "sweep", done)
            ended = time.perf_counter()
            waiter.join()
        sweep_started = monitor.first_time(1)
        sweep_ended = monitor.first_time(arguments.entries)
        if sweep_started is None or sweep_ended is None:
            raise RuntimeError(f"the sweeper did not remove the {arguments.entries} expired entries; see {daemon.log_path}")
        during_sweep = sweep_phase.window(sweep_started, sweep_ended)
        # A status poll reports the end of the sweep up to one poll interval late.
        after = sweep_phase.window(sweep_ended + STATUS_POLL_INTERVAL, ended)

        expiring = Dict.from_name("expiring", client=client)
        left = len(expiring)
        client.close()
    finally:
        daemon.stop()
    sweep_lines = [line for line in daemon.log().splitlines() if "sweep removed" in line]
    sweep_lines.sort(key=lambda line: int(line.split("sweep removed ")[1].split()[0]))

    baselines = Latencies(before.samples + after.samples, before.elapsed + after.elapsed)
    rows = [
        summarize("baseline before", before),
        summarize("during sweep", during_sweep),
        summarize("baseline after", after),
        summarize("baselines together", baselines),
    ]
    ratio = during_sweep.percentile(0.99) / baselines.percentile(0.99)
    return {
        "rows": rows,
        "p99_ratio": round(ratio, 2),
        "goal_p99_ratio": GOAL_P99_RATIO,
        "goal_met": ratio <= GOAL_P99_RATIO,
        "fill_seconds": round(fill_seconds, 1),
        "sweep_seconds": round(sweep_ended - sweep_started, 2),
        "swept_per_second": round(arguments.entries / (sweep_ended - sweep_started)),
        "entries_left": left,
        "sweep_log": sweep_lines[-1] if sweep_lines else None,
    }


def print_results(results: dict[str, Any]) -> None:
    columns = ["phase", "gets", "seconds", "p50_us", "p99_us", "max_us", "gets_per_second"]
    table = [columns] + [[str(row[column]) for column in columns] for row in results["rows"]]
    widths = [max(len(line[index]) for line in table) for index in range(len(columns))]
    print()
    for line in table:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
    print()
    verdict = "met" if results["goal_met"] else "missed"
    print(
        f"p99 during the sweep / p99 of the baselines: {results['p99_ratio']} (goal <= {GOAL_P99_RATIO:g}: {verdict})"
    )
    print(f"sweep: {results['sweep_seconds']} s, {results['swept_per_second']:,} entries/s")
    print(f"entries left in the expired dict: {results['entries_left']}")
    if results["sweep_log"]:
        print(f"daemon: {results['sweep_log']}")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    results, environment = measure_in_scratch("bench_sweep", argv, arguments.tmp_dir, lambda root: run(arguments, root))

    print_results(results)
    print_environment(environment)
    if arguments.json:
        write_json(arguments.json, {**results, **environment})
    return 0 if results["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
