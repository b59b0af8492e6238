"""Check with strace whether each variant makes a write durable before the call returns.

A probe process sets keys one at a time and records the wall-clock time before and after
each call. The process that does the disk I/O runs under ``strace -f -ttt -T``: the server
for sharedict and Redis, the probe itself for the embedded stores. strace logs the start
time and duration of every sync call (fsync, fdatasync, msync, sync_file_range) and every
write of that process. A write to a file opened with O_DSYNC or O_SYNC counts as a sync
call too. A write counts as durable when a sync call started after the call began and
finished before it returned. That is the behaviour of the configuration measured,
whatever the documentation says.

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
# A write to a file opened with O_DSYNC or O_SYNC returns only once it is on disk, as if an
# fdatasync followed it; LMDB writes its meta page that way.
WRITE_CALLS = ("write", "pwrite64", "writev", "pwritev")
TRACED_CALLS = (*SYNC_CALLS, *WRITE_CALLS, "openat")
PROBE_TIMEOUT = 300.0

# Lines of `strace -f -ttt -T -y`: "PID SECONDS NAME(ARGS) = RESULT <DURATION>", or a call
# split in two by another thread: "... NAME(ARGS <unfinished ...>" then
# "PID SECONDS <... NAME resumed>ARGS) = RESULT <DURATION>".
_COMPLETE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+).*<(\d+\.\d+)>$")
_UNFINISHED = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(\w+)\((.*)<unfinished \.\.\.>$")
_RESUMED = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+<\.\.\. (\w+) resumed>(.*)\)\s+=\s+(-?\d+).*<(\d+\.\d+)>$")
_PATH = re.compile(r"<([^>]*)>")
_FIRST_NUMBER = re.compile(r"^(\d+)")


def strace_command(trace_path: str) -> list[str]:
    """Return the command prefix that runs a program under strace, logging to ``trace_path``.

    ``-I 1`` lets strace die of the SIGTERM it gets when the suite dies (by default it
    blocks it). strace then only detaches from its program, so where util-linux's setpriv
    is installed, the program gets SIGTERM of its own when strace dies.
    """
    command = ["strace", "-I", "1", "-f", "-ttt", "-T", "-y", "-e", "trace=" + ",".join(TRACED_CALLS)]
    command += ["-o", trace_path, "--"]
    if shutil.which("setpriv"):
        command += ["setpriv", "--pdeathsig", "TERM", "--"]
    return command


@dataclass(frozen=True)
class SyncCall:
    """A call that returned only once data was on disk: a sync call, or a write to an O_DSYNC file."""

    name: str
    started: float
    finished: float
    path: str


@dataclass(frozen=True)
class _Call:
    name: str
    arguments: str
    result: int
    started: float
    finished: float


def _calls(text: str) -> list[_Call]:
    calls = []
    unfinished: dict[tuple[str, str], tuple[float, str]] = {}
    for line in text.splitlines():
        match = _COMPLETE.match(line)
        if match:
            _, started, name, arguments, result, duration = match.groups()
            calls.append(_Call(name, arguments, int(result), float(started), float(started) + float(duration)))
            continue
        match = _UNFINISHED.match(line)
        if match:
            pid, started, name, arguments = match.groups()
            unfinished[(pid, name)] = (float(started), arguments)
            continue
        match = _RESUMED.match(line)
        if match:
            pid, resumed, name, rest, result, duration = match.groups()
            if (pid, name) in unfinished:
                started_at, arguments = unfinished.pop((pid, name))
                finished = max(float(resumed), started_at + float(duration))
                calls.append(_Call(name, arguments + rest, int(result), started_at, finished))
    calls.sort(key=lambda call: call.started)
    return calls


def parse_trace(text: str) -> list[SyncCall]:
    """Return the calls of an strace log that made data durable, sorted by start time."""
    synchronous_fds: set[int] = set()
    durable = []
    for call in _calls(text):
        if call.result < 0:
            continue
        if call.name == "openat":
            if "O_DSYNC" in call.arguments or "O_SYNC" in call.arguments:
                synchronous_fds.add(call.result)
            else:
                synchronous_fds.discard(call.result)  # the number was closed and reused
        elif call.name in SYNC_CALLS:
            durable.append(SyncCall(call.name, call.started, call.finished, _path(call.arguments)))
        elif call.name in WRITE_CALLS:
            fd = _FIRST_NUMBER.match(call.arguments)
            if fd and int(fd.group(1)) in synchronous_fds:
                durable.append(SyncCall(f"{call.name} O_DSYNC", call.started, call.finished, _path(call.arguments)))
    return durable


def _path(arguments: str) -> str:
    match = _PATH.search(arguments)
    return os.path.basename(match.group(1)) if match else ""


@dataclass(frozen=True)
class Finding:
    """The strace evidence for one variant."""

    variant: str
    declared_durable: bool
    writes: int
    durable_writes: int
    sync_calls: int
    """Sync calls, and writes to O_DSYNC files, between the first write and the last return."""
    synced_files: list[str]
    """Each such call with the file it made durable, such as ``fdatasync data.mdb``."""

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
    lines = [["system", "declared", "measured", "writes with a sync inside the call", "durable calls", "calls"]]
    for finding in findings:
        measured = "durable" if finding.durable else "not durable"
        if not finding.matches:
            measured += " (MISMATCH)"
        lines.append(
            [
                finding.variant,
                "durable" if finding.declared_durable else "not durable",
                measured,
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
