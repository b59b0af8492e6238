"""Check with strace whether each variant makes a write durable before the call returns.

A probe process sets keys one at a time and records the wall-clock time before and after
each call. The process that does the disk I/O runs under ``strace -f -ttt -T``, which
logs every sync call (fsync, fdatasync, msync, sync_file_range) with its start time and
duration: the server for sharedict and Redis, the probe itself for the embedded stores.
A write counts as durable when a sync call started after the call began and finished
before it returned. That is the behaviour of the configuration measured, whatever the
documentation says.

strace timestamps and ``time.time()`` both read CLOCK_REALTIME, so the two logs compare.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import systems
from benchmarks.servers import Servers
from benchmarks.systems import StoreSpec, Variant

PROBE_WRITES = 200
PROBE_WARM_UP = 10
SYNC_CALLS = ("fsync", "fdatasync", "msync", "sync_file_range", "syncfs", "sync")
PROBE_TIMEOUT = 300.0

# Lines of `strace -f -ttt -T -y`: "PID SECONDS NAME(ARGS) = RESULT <DURATION>", or a call
# split in two by another thread: "... NAME(ARGS <unfinished ...>" then
# "PID SECONDS <... NAME resumed>...) = RESULT <DURATION>".
_COMPLETE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+).*<(\d+\.\d+)>$")
_UNFINISHED = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(\w+)\((.*)<unfinished \.\.\.>$")
_RESUMED = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+<\.\.\. (\w+) resumed>.*=\s+(-?\d+).*<(\d+\.\d+)>$")
_PATH = re.compile(r"<([^>]*)>")


def strace_command(trace_path: str) -> list[str]:
    return ["strace", "-f", "-ttt", "-T", "-y", "-e", "trace=" + ",".join(SYNC_CALLS), "-o", trace_path, "--"]


@dataclass(frozen=True)
class SyncCall:
    name: str
    started: float
    finished: float
    path: str


def parse_trace(text: str) -> list[SyncCall]:
    """Return the sync calls of an strace log that succeeded, sorted by start time."""
    calls = []
    unfinished: dict[tuple[str, str], tuple[float, str]] = {}
    for line in text.splitlines():
        match = _COMPLETE.match(line)
        if match:
            _, started, name, arguments, result, duration = match.groups()
            if int(result) == 0:
                calls.append(SyncCall(name, float(started), float(started) + float(duration), _path(arguments)))
            continue
        match = _UNFINISHED.match(line)
        if match:
            pid, started, name, arguments = match.groups()
            unfinished[(pid, name)] = (float(started), _path(arguments))
            continue
        match = _RESUMED.match(line)
        if match:
            pid, resumed, name, result, duration = match.groups()
            started_at, path = unfinished.pop((pid, name), (None, ""))
            if started_at is not None and int(result) == 0:
                calls.append(SyncCall(name, started_at, max(float(resumed), started_at + float(duration)), path))
    calls.sort(key=lambda call: call.started)
    return calls


def _path(arguments: str) -> str:
    match = _PATH.search(arguments)
    return os.path.basename(match.group(1)) if match else ""


@dataclass(frozen=True)
class Finding:
    """What strace showed for one variant."""

    variant: str
    declared_durable: bool
    writes: int
    durable_writes: int
    sync_calls: int
    synced_files: list[str]

    @property
    def durable(self) -> bool:
        return self.durable_writes == self.writes

    @property
    def matches(self) -> bool:
        return self.durable == self.declared_durable


def judge(variant: Variant, intervals: Sequence[tuple[float, float]], calls: Sequence[SyncCall]) -> Finding:
    """Count the writes whose call interval contains a whole sync call."""
    starts = [call.started for call in calls]
    durable_writes = 0
    for began, returned in intervals:
        position = bisect.bisect_left(starts, began)
        while position < len(calls) and calls[position].started <= returned:
            if calls[position].finished <= returned:
                durable_writes += 1
                break
            position += 1

    first, last = intervals[0][0], intervals[-1][1]
    during = [call for call in calls if first <= call.started <= last]
    files = sorted({f"{call.name} {call.path}".strip() for call in during})
    return Finding(variant.name, variant.durable, len(intervals), durable_writes, len(during), files)


def _probe_command(spec: StoreSpec, times_path: str) -> list[str]:
    arguments = json.dumps({"variant": spec.variant.name, "address": spec.address, "name": spec.name, "times": times_path})
    return [sys.executable, "-m", "benchmarks.durability", arguments]


def check_variant(variant: Variant, root: str) -> Finding:
    """Run the probe for one variant with the right process under strace."""
    work = tempfile.mkdtemp(prefix="durability-", dir=root)
    trace_path = os.path.join(work, "strace.log")
    times_path = os.path.join(work, "times.json")
    tracer = strace_command(trace_path)
    embedded = variant.system not in ("sharedict", "redis")

    with Servers(work, wrapper=None if embedded else tracer) as servers:
        if variant.system == "sharedict":
            address = servers.sharedict().socket_path
        elif variant.system == "redis":
            address = servers.redis(variant.options["appendfsync"]).socket_path
        else:
            address = os.path.join(work, "store")
        command = _probe_command(StoreSpec(variant, address, "durability"), times_path)
        if embedded:
            command = [*tracer, *command]
        subprocess.run(command, check=True, timeout=PROBE_TIMEOUT, cwd=Path(__file__).resolve().parent.parent)
    # Leaving the block stopped the traced server, so strace has written its whole log.

    intervals = [tuple(pair) for pair in json.loads(Path(times_path).read_text())]
    calls = parse_trace(Path(trace_path).read_text())
    return judge(variant, intervals, calls)


def check_durability(variants: Sequence[Variant], root: str) -> list[Finding]:
    if shutil.which("strace") is None:
        raise RuntimeError("strace is not installed; install it with `apt-get install -y strace`")
    findings = []
    for variant in variants:
        print(f"  durability {variant.name}", file=sys.stderr, flush=True)
        findings.append(check_variant(variant, root))
    return findings


def finding_lines(findings: Sequence[Finding]) -> list[list[str]]:
    lines = [["system", "declared", "measured", "writes with a sync inside the call", "sync calls", "synced"]]
    for finding in findings:
        lines.append(
            [
                finding.variant,
                "durable" if finding.declared_durable else "not durable",
                ("durable" if finding.durable else "not durable") + ("" if finding.matches else " (MISMATCH)"),
                f"{finding.durable_writes} of {finding.writes}",
                str(finding.sync_calls),
                ", ".join(finding.synced_files) or "-",
            ]
        )
    return lines


# The probe process.


def probe(arguments: dict[str, Any]) -> None:
    variant = next(variant for variant in systems.VARIANTS if variant.name == arguments["variant"])
    store = StoreSpec(variant, arguments["address"], arguments["name"]).open()
    value = "x" * 100
    intervals = []
    try:
        for index in range(PROBE_WARM_UP):
            store.set(f"warm-{index}", value)
        for index in range(PROBE_WRITES):
            began = time.time()
            store.set(f"key-{index}", value)
            intervals.append((began, time.time()))
    finally:
        store.close()
    Path(arguments["times"]).write_text(json.dumps(intervals))


if __name__ == "__main__":
    probe(json.loads(sys.argv[1]))
