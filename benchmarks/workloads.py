"""The workloads W1 to W9, each run on every selected variant that supports it.

Every workload starts with fresh servers and fresh directories, warms each store up with
keys of its own before timing, and checks a value it read back, so that a store that
silently lost writes cannot post a figure.

The systems take turns: each timed phase is cut into ``Scale.rounds`` blocks, and every
system runs its share of a block before the next block starts. On a machine that other
jobs share, a busy spell then slows every system alike instead of the one that happened
to be running, and the ratios between systems stay meaningful.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import systems
from benchmarks.measure import Latencies, WorkerPool, WorkerReport, combined_rate, consume, time_each, time_once
from benchmarks.results import Result
from benchmarks.servers import Servers
from benchmarks.systems import Store, StoreSpec, Variant

KiB = 1 << 10
MiB = 1 << 20

# sharedict limits a serialised value to 100 MiB, and the pickle header takes a few
# bytes of that, so the large value of W7 is 100 MiB less this margin.
LARGE_VALUE_MARGIN = 4 * KiB
# sharedict takes at most 10,000 entries per update(); bulk loads use chunks of this size.
CHUNK = 10_000
SET_SHARE = 0.10
MIXED_PLAN_LENGTH = 50_000


@dataclass(frozen=True)
class Scale:
    """The sizes of every workload: ``FULL`` for a full run, ``QUICK`` for ``--quick``."""

    set_get_keys: int = 20_000
    large_set_get_keys: int = 5_000
    mixed_keys: int = 10_000
    mixed_seconds: float = 3.0
    mixed_processes: tuple[int, ...] = (1, 2, 4)
    update_entries: int = 10_000
    iterate_items: int = 100_000
    iterate_repetitions: int = 3
    durable_processes: int = 4
    durable_writes: int = 1_000
    gathered_gets: int = 10_000
    gathered_repetitions: int = 5
    large_value_bytes: int = 100 * MiB - LARGE_VALUE_MARGIN
    large_value_repetitions: int = 3
    sizes: tuple[int, ...] = (1_000, 100_000, 1_000_000)
    sized_gets: int = 5_000
    memory_entries: int = 1_000_000
    warm_up: int = 1_000
    rounds: int = 5


FULL = Scale()
QUICK = Scale(
    set_get_keys=500,
    large_set_get_keys=200,
    mixed_keys=1_000,
    mixed_seconds=0.2,
    update_entries=1_000,
    iterate_items=5_000,
    iterate_repetitions=1,
    durable_writes=50,
    gathered_gets=5_000,
    gathered_repetitions=2,
    large_value_bytes=4 * MiB,
    large_value_repetitions=1,
    sizes=(1_000, 5_000, 10_000),
    sized_gets=300,
    memory_entries=20_000,
    warm_up=50,
    rounds=2,
)


def make_key(index: int) -> str:
    return f"key-{index:07d}"


def make_text(size: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choices("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", k=size))


def chunks(start: int, stop: int, value: Any) -> Iterator[dict[str, Any]]:
    for first in range(start, stop, CHUNK):
        yield {make_key(index): value for index in range(first, min(first + CHUNK, stop))}


def split(items: Sequence[Any], count: int) -> list[Sequence[Any]]:
    """Cut ``items`` into ``count`` blocks of nearly equal size, in order."""
    size = -(-len(items) // count)
    return [items[start : start + size] for start in range(0, len(items), size)]


def check_value(read: Any, expected: Any, variant: Variant) -> None:
    """Raise unless a value read back equals the one stored (bytes for Redis and LMDB)."""
    if isinstance(read, bytes) and isinstance(expected, str):
        read = read.decode()
    if read != expected:
        preview = repr(read)[:60]
        raise RuntimeError(f"{variant.name} returned {preview} instead of the stored value; its figures are void")


class Context:
    """The servers, scratch directory and collected results of one workload run."""

    def __init__(self, root: str, servers: Servers, scale: Scale, variants: Sequence[Variant]) -> None:
        self.root = root
        self.servers = servers
        self.scale = scale
        self.variants = variants
        self.results: list[Result] = []

    def select(self, candidates: Sequence[Variant]) -> list[Variant]:
        """Return the candidates that the run's --systems selected."""
        return [variant for variant in candidates if variant in self.variants]

    def spec(self, variant: Variant, name: str) -> StoreSpec:
        if variant.system == "sharedict":
            address = self.servers.sharedict().socket_path
        elif variant.system == "redis":
            address = self.servers.redis(variant.options["appendfsync"]).socket_path
        else:
            address = tempfile.mkdtemp(prefix=variant.name.replace(" ", "-") + "-", dir=self.root)
        return StoreSpec(variant, address, name)

    @contextlib.contextmanager
    def open_stores(self, candidates: Sequence[Variant], name: str) -> Iterator[dict[Variant, Store]]:
        """Open the named dict of every selected candidate; all are closed together at the end."""
        stores: dict[Variant, Store] = {}
        try:
            for variant in self.select(candidates):
                stores[variant] = self.spec(variant, name).open()
            yield stores
        finally:
            for store in stores.values():
                store.close()

    def record(
        self,
        workload: str,
        variant: Variant,
        metric: str,
        value: float,
        unit: str,
        *,
        higher_is_better: bool = False,
        **parameters: Any,
    ) -> None:
        self.results.append(
            Result(workload, variant.name, metric, value, unit, variant.durable, higher_is_better, parameters)
        )

    def progress(self, message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)


ALL_MAIN = (
    systems.SHAREDICT,
    systems.DISKCACHE,
    systems.SQLITEDICT,
    systems.REDIS_ALWAYS,
    systems.REDIS_EVERYSEC,
    systems.LMDB,
)
READ_ONLY = (systems.SHAREDICT, systems.DISKCACHE, systems.SQLITEDICT, systems.REDIS_EVERYSEC, systems.LMDB)
DURABLE = (systems.SHAREDICT, systems.DISKCACHE_FULL, systems.REDIS_ALWAYS, systems.LMDB)


# W1 and W2: one client sets distinct keys, then gets them all in random order.


def _setter(store: Store, value: Any) -> Callable[[str], None]:
    return lambda key: store.set(key, value)


def set_then_get(context: Context, workload: str, key_count: int, value_size: int) -> None:
    scale = context.scale
    value = make_text(value_size)
    keys = [make_key(index) for index in range(key_count)]
    shuffled = random.Random(1).sample(keys, len(keys))
    warm_keys = [f"warm-{index}" for index in range(scale.warm_up)]

    with context.open_stores(ALL_MAIN, workload.lower()) as stores:
        for store in stores.values():
            for key in warm_keys:
                store.set(key, value)
            for key in warm_keys:
                store.get(key)

        context.progress(f"{workload} sets, {len(stores)} systems in turn")
        sets: dict[Variant, list[Latencies]] = {variant: [] for variant in stores}
        for block in split(keys, scale.rounds):
            for variant, store in stores.items():
                sets[variant].append(time_each(_setter(store, value), block))

        context.progress(f"{workload} gets, {len(stores)} systems in turn")
        gets: dict[Variant, list[Latencies]] = {variant: [] for variant in stores}
        for block in split(shuffled, scale.rounds):
            for variant, store in stores.items():
                gets[variant].append(time_each(store.get, block))

        for variant, store in stores.items():
            check_value(store.get(keys[-1]), value, variant)

    parameters = {"keys": key_count, "value_bytes": value_size, "rounds": scale.rounds}
    for variant in sets:
        set_latencies = Latencies.combine(sets[variant])
        get_latencies = Latencies.combine(gets[variant])
        context.record(workload, variant, "set p50", set_latencies.percentile(0.50), "µs", **parameters)
        context.record(workload, variant, "set p99", set_latencies.percentile(0.99), "µs", **parameters)
        context.record(
            workload, variant, "set", set_latencies.ops_per_second, "ops/s", higher_is_better=True, **parameters
        )
        context.record(workload, variant, "get p50", get_latencies.percentile(0.50), "µs", **parameters)
        context.record(workload, variant, "get p99", get_latencies.percentile(0.99), "µs", **parameters)
        context.record(
            workload, variant, "get", get_latencies.ops_per_second, "ops/s", higher_is_better=True, **parameters
        )


def run_w1(context: Context) -> None:
    set_then_get(context, "W1", context.scale.set_get_keys, 100)


def run_w2(context: Context) -> None:
    set_then_get(context, "W2", context.scale.large_set_get_keys, 10 * KiB)


# W3: several processes, 90% get and 10% set on shared keys.


def _mixed_plan(key_count: int, seed: int) -> list[tuple[bool, str]]:
    rng = random.Random(seed)
    return [(rng.random() < SET_SHARE, make_key(rng.randrange(key_count))) for _ in range(MIXED_PLAN_LENGTH)]


def mixed_warm_up(store: Store, key_count: int, value: str, seconds: float, seed: int) -> int:
    for is_set, key in _mixed_plan(key_count, seed + 1)[:200]:
        if is_set:
            store.set(key, value)
        else:
            store.get(key)
    return 200


def mixed_body(store: Store, key_count: int, value: str, seconds: float, seed: int) -> int:
    plan = _mixed_plan(key_count, seed)
    clock = time.perf_counter
    deadline = clock() + seconds
    operations = 0
    while clock() < deadline:
        is_set, key = plan[operations % MIXED_PLAN_LENGTH]
        if is_set:
            store.set(key, value)
        else:
            store.get(key)
        operations += 1
    return operations


def run_w3(context: Context) -> None:
    scale = context.scale
    value = make_text(100)
    variants = context.select(ALL_MAIN)
    if not variants:
        return

    specs = {variant: context.spec(variant, "w3") for variant in variants}
    for spec in specs.values():
        store = spec.open()
        try:
            for entries in chunks(0, scale.mixed_keys, value):
                store.update(entries)
        finally:
            store.close()

    seconds_per_round = scale.mixed_seconds / scale.rounds
    with WorkerPool(max(scale.mixed_processes)) as pool:
        for processes in scale.mixed_processes:
            label = f"{processes} process{'es' if processes > 1 else ''}"
            context.progress(f"W3 {label}, {len(variants)} systems in turn")
            runs: dict[Variant, list[list[WorkerReport]]] = {variant: [] for variant in variants}
            for round_number in range(scale.rounds):
                for variant, spec in specs.items():
                    arguments = [
                        (scale.mixed_keys, value, seconds_per_round, round_number * processes + worker)
                        for worker in range(processes)
                    ]
                    runs[variant].append(pool.run(spec, mixed_warm_up, mixed_body, arguments))

            for variant in variants:
                context.record(
                    "W3",
                    variant,
                    label,
                    combined_rate(runs[variant]),
                    "ops/s",
                    higher_is_better=True,
                    keys=scale.mixed_keys,
                    set_share=SET_SHARE,
                    seconds=scale.mixed_seconds,
                    rounds=scale.rounds,
                )


# W4: bulk update, and iteration over the whole dict.


def run_w4(context: Context) -> None:
    scale = context.scale
    value = make_text(100)
    update_count = scale.iterate_items // scale.update_entries

    with context.open_stores(ALL_MAIN, "w4") as stores:
        # The warm-up keys are the first of the measured ones, so the dict contains
        # exactly iterate_items entries when iteration starts.
        for store in stores.values():
            store.update({make_key(index): value for index in range(100)})

        context.progress(f"W4 updates, {len(stores)} systems in turn")
        update_seconds: dict[Variant, list[float]] = {variant: [] for variant in stores}
        for number in range(update_count):
            first = number * scale.update_entries
            entries = {make_key(index): value for index in range(first, first + scale.update_entries)}
            for variant, store in stores.items():
                update_seconds[variant].append(time_once(lambda: store.update(entries)))  # noqa: B023 - called at once

        context.progress(f"W4 iteration, {len(stores)} systems in turn")
        for variant, store in stores.items():
            counted = consume(store.items())
            if counted != scale.iterate_items:
                raise RuntimeError(f"{variant.name} iterated {counted} items, expected {scale.iterate_items}")
        iterate_seconds: dict[Variant, list[float]] = {variant: [] for variant in stores}
        for _ in range(scale.iterate_repetitions):
            for variant, store in stores.items():
                iterate_seconds[variant].append(time_once(lambda: consume(store.items())))  # noqa: B023 - called at once

        for variant, store in stores.items():
            check_value(store.get(make_key(0)), value, variant)

    for variant in update_seconds:
        median_update = statistics.median(update_seconds[variant]) * 1000
        median_iteration = statistics.median(iterate_seconds[variant]) * 1000
        context.record("W4", variant, "update", median_update, "ms", entries=scale.update_entries)
        context.record("W4", variant, "iterate", median_iteration, "ms", items=scale.iterate_items)


# W5: several processes of durable sets.


def durable_warm_up(store: Store, worker: int, first: int, writes: int, value: str) -> int:
    for index in range(20):
        store.set(f"warm-{worker}-{index}", value)
    return 20


def durable_body(store: Store, worker: int, first: int, writes: int, value: str) -> int:
    for index in range(first, first + writes):
        store.set(f"w5-{worker}-{index}", value)
    return writes


def run_w5(context: Context) -> None:
    scale = context.scale
    value = make_text(100)
    variants = context.select(DURABLE)
    if not variants:
        return

    specs = {variant: context.spec(variant, "w5") for variant in variants}
    writes_per_round = -(-scale.durable_writes // scale.rounds)
    runs: dict[Variant, list[list[WorkerReport]]] = {variant: [] for variant in variants}
    context.progress(f"W5 {len(variants)} systems in turn")
    with WorkerPool(scale.durable_processes) as pool:
        for first in range(0, scale.durable_writes, writes_per_round):
            writes = min(writes_per_round, scale.durable_writes - first)
            arguments = [(worker, first, writes, value) for worker in range(scale.durable_processes)]
            for variant, spec in specs.items():
                runs[variant].append(pool.run(spec, durable_warm_up, durable_body, arguments))

    for variant in variants:
        context.record(
            "W5",
            variant,
            "writes",
            combined_rate(runs[variant]),
            "writes/s",
            higher_is_better=True,
            processes=scale.durable_processes,
            writes_per_process=scale.durable_writes,
            rounds=scale.rounds,
        )


# W6: many gets gathered on one async connection, against the blocking loop.


async def _time_gathered(handle: Any, keys: Sequence[str]) -> float:
    # The warm-up opens the event loop's connection, so the timed round does not pay for it.
    await asyncio.gather(*(handle.get.aio(key) for key in keys[:1000]))
    gc.collect()
    started = time.perf_counter()
    await asyncio.gather(*(handle.get.aio(key) for key in keys))
    return time.perf_counter() - started


def run_w6(context: Context) -> None:
    scale = context.scale
    if systems.SHAREDICT not in context.variants:
        return
    variant = systems.SHAREDICT
    value = make_text(100)
    keys = [make_key(index) for index in range(scale.gathered_gets)]
    context.progress("W6 sharedict")

    store = context.spec(variant, "w6").open()
    try:
        for entries in chunks(0, scale.gathered_gets, value):
            store.update(entries)
        handle = store.dict  # type: ignore[attr-defined]

        def blocking_loop() -> None:
            for key in keys:
                handle.get(key)

        blocking_loop()
        # The two forms take turns, so that a busy spell of the machine hits both.
        blocking_seconds = []
        gathered_seconds = []
        for _ in range(scale.gathered_repetitions):
            blocking_seconds.append(time_once(blocking_loop))
            gathered_seconds.append(asyncio.run(_time_gathered(handle, keys)))
        check_value(store.get(keys[-1]), value, variant)
    finally:
        store.close()

    parameters = {"gets": scale.gathered_gets, "repetitions": scale.gathered_repetitions}
    blocking_rate = len(keys) / statistics.median(blocking_seconds)
    gathered_rate = len(keys) / statistics.median(gathered_seconds)
    context.record("W6", variant, "blocking", blocking_rate, "ops/s", higher_is_better=True, **parameters)
    context.record("W6", variant, "gathered", gathered_rate, "ops/s", higher_is_better=True, **parameters)


# W7: one large value.


def run_w7(context: Context) -> None:
    scale = context.scale
    block = os.urandom(MiB)
    value = (block * (scale.large_value_bytes // MiB + 1))[: scale.large_value_bytes]

    with context.open_stores(ALL_MAIN, "w7") as stores:
        for store in stores.values():
            store.set("warm", block)
            store.get("warm")

        context.progress(f"W7 {len(stores)} systems in turn")
        put_seconds: dict[Variant, list[float]] = {variant: [] for variant in stores}
        get_seconds: dict[Variant, list[float]] = {variant: [] for variant in stores}
        for _ in range(scale.large_value_repetitions):
            for variant, store in stores.items():
                put_seconds[variant].append(time_once(lambda: store.set("large", value)))  # noqa: B023 - called at once
                get_seconds[variant].append(time_once(lambda: store.get("large")))  # noqa: B023 - called at once

        for variant, store in stores.items():
            check_value(store.get("large"), value, variant)

    parameters = {"value_bytes": scale.large_value_bytes, "repetitions": scale.large_value_repetitions}
    for variant in put_seconds:
        context.record("W7", variant, "put", statistics.median(put_seconds[variant]) * 1000, "ms", **parameters)
        context.record("W7", variant, "get", statistics.median(get_seconds[variant]) * 1000, "ms", **parameters)


# W8: get latency as the dict grows.


def run_w8(context: Context) -> None:
    scale = context.scale
    value = make_text(100)
    rng = random.Random(8)

    with context.open_stores(READ_ONLY, "w8") as stores:
        filled = 0
        for size in scale.sizes:
            context.progress(f"W8 {size:,} entries, {len(stores)} systems in turn")
            for store in stores.values():
                for entries in chunks(filled, size, value):
                    store.update(entries)
            filled = size

            keys = [make_key(rng.randrange(size)) for _ in range(scale.sized_gets)]
            gets: dict[Variant, list[Latencies]] = {variant: [] for variant in stores}
            for store in stores.values():
                for key in keys[: scale.warm_up]:
                    store.get(key)
            for block in split(keys, scale.rounds):
                for variant, store in stores.items():
                    gets[variant].append(time_each(store.get, block))

            for variant, store in stores.items():
                check_value(store.get(keys[0]), value, variant)
                p50 = Latencies.combine(gets[variant]).percentile(0.50)
                context.record("W8", variant, f"get p50 at {size:,}", p50, "µs", entries=size)


# W9: the server's memory with many entries.


def process_memory(pid: int) -> dict[str, float]:
    """Return VmRSS and RssAnon of a process in MiB, from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon"):
            fields[name] = int(rest.split()[0]) / 1024  # the kernel reports kB
    return fields


def run_w9(context: Context) -> None:
    scale = context.scale
    value = make_text(100)

    for variant in context.select((systems.SHAREDICT, systems.REDIS_EVERYSEC)):
        context.progress(f"W9 {variant.name}")
        spec = context.spec(variant, "w9")
        server = context.servers.sharedict() if variant.system == "sharedict" else context.servers.redis("everysec")
        store = spec.open()
        try:
            empty = process_memory(server.pid)
            for entries in chunks(0, scale.memory_entries, value):
                store.update(entries)
            for index in range(0, scale.memory_entries, max(1, scale.memory_entries // 1000)):
                store.get(make_key(index))
            check_value(store.get(make_key(scale.memory_entries - 1)), value, variant)
            loaded = process_memory(server.pid)
        finally:
            store.close()

        parameters = {"entries": scale.memory_entries, "value_bytes": 100, "pid_status": "/proc/PID/status"}
        context.record("W9", variant, "RssAnon", loaded["RssAnon"], "MiB", **parameters)
        context.record("W9", variant, "RSS", loaded["VmRSS"], "MiB", **parameters)
        context.record("W9", variant, "RssAnon empty", empty["RssAnon"], "MiB", **parameters)


# Each description is a format string over the fields of Scale.
WORKLOADS: dict[str, tuple[str, Callable[[Context], None]]] = {
    "W1": ("one client: set {set_get_keys:,} distinct keys with 100-byte values, then get them all", run_w1),
    "W2": ("one client: set {large_set_get_keys:,} distinct keys with 10 KiB values, then get them all", run_w2),
    "W3": ("{mixed_processes} processes doing 90% get, 10% set on {mixed_keys:,} shared keys", run_w3),
    "W4": ("update of {update_entries:,} entries (median); iterating {iterate_items:,} items", run_w4),
    "W5": ("{durable_processes} processes each doing {durable_writes:,} durable sets", run_w5),
    "W6": ("{gathered_gets:,} gets gathered with .aio on one connection, and the blocking loop", run_w6),
    "W7": ("one value of {large_value_bytes:,} bytes: put, then get", run_w7),
    "W8": ("get p50 with {sizes} entries in the dict", run_w8),
    "W9": ("server memory holding {memory_entries:,} entries of 100 bytes", run_w9),
}


def describe(workload: str, scale: Scale) -> str:
    template, _ = WORKLOADS[workload]
    fields = dataclasses.asdict(scale)
    for name, value in fields.items():
        if isinstance(value, tuple):
            numbers = [f"{number:,}" for number in value]
            fields[name] = ", ".join(numbers[:-1]) + " and " + numbers[-1] if len(numbers) > 1 else numbers[0]
    return template.format(**fields)
