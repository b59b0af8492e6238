"""Summarise a py-spy profile: the share of samples per thread and per function.

py-spy's ``--format raw`` writes one line per distinct stack, frames separated by ``;``
and the sample count last. With ``--subprocesses`` the first frames name the process.
This groups the samples by process role (the sharedict daemon or a client) and by
thread, named after the function the thread started in. For each group it lists the
functions with the largest share of samples, with their callees (inclusive) and on
their own (self)::

    py-spy record --gil --format raw -o daemon.txt --pid DAEMON_PID --duration 15
    python -m benchmarks.profile_summary daemon.txt
"""

from __future__ import annotations

import argparse
import collections
import re
from collections.abc import Sequence

_LINE_NUMBER = re.compile(r":\d+\)$")
# Threads are named after the function that each runs, the first one found in its stack.
_THREAD_ENTRIES = (
    "Connection.serve",
    "GroupCommitWriter._run",
    "Sweeper._run",
    "Server._accept_loop",
    "LockService._run_timer",
)


def _role(process_frames: Sequence[str]) -> str:
    if not process_frames:
        return "process"
    command = process_frames[-1]
    if "sharedict serve" in command:
        return "daemon"
    if "multiprocessing" in command:
        return "worker"
    return "client"


def _thread(frames: Sequence[str]) -> str:
    for frame in frames:
        for entry in _THREAD_ENTRIES:
            if frame.startswith(entry + " "):
                return entry
    return "main"


def summarise(path: str) -> dict[str, tuple[int, collections.Counter[str], collections.Counter[str]]]:
    """Return, per "role/thread" group, its sample count and inclusive and self counts per frame."""
    groups: dict[str, tuple[int, collections.Counter[str], collections.Counter[str]]] = {}
    with open(path) as file:
        for line in file:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = stack.split(";")
            process_frames = [frame for frame in frames if frame.startswith("process ")]
            frames = [frame for frame in frames if not frame.startswith("process ")]
            group = f"{_role(process_frames)}/{_thread(frames)}"

            total, inclusive, self_counts = groups.get(group, (0, collections.Counter(), collections.Counter()))
            for frame in {_LINE_NUMBER.sub(")", frame) for frame in frames}:
                inclusive[frame] += count
            if frames:
                self_counts[frames[-1]] += count
            groups[group] = (total + count, inclusive, self_counts)
    return groups


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_summary", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="A py-spy profile written with --format raw.")
    parser.add_argument("--top", type=int, default=25, help="Functions to list per thread [default: 25].")
    parser.add_argument("--group", help="Only the groups whose name contains this text, such as 'daemon'.")
    arguments = parser.parse_args(argv)

    groups = summarise(arguments.path)
    all_samples = sum(total for total, _, _ in groups.values())
    for group, (total, inclusive, self_counts) in sorted(groups.items(), key=lambda item: -item[1][0]):
        if arguments.group and arguments.group not in group:
            continue
        print(f"== {group}: {total} samples, {100 * total / all_samples:.1f}% of all")
        print("   inclusive")
        for frame, count in inclusive.most_common(arguments.top):
            print(f"   {100 * count / total:5.1f}%  {frame}")
        print("   self (with line)")
        for frame, count in self_counts.most_common(arguments.top // 2):
            print(f"   {100 * count / total:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
