"""The report of a run: the machine and versions, the tables of figures, the goals, the JSON."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.results import GoalOutcome, Result

Measured = TypeVar("Measured")

LIBRARIES = ("sharedict", "lmdb", "msgpack", "cloudpickle", "diskcache", "sqlitedict", "redis", "hiredis", "matplotlib")
REPOSITORY = Path(__file__).resolve().parent.parent


# The environment of a run.


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _filesystem(path: str) -> str:
    """Return the type of the filesystem that contains ``path``, from /proc/mounts."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    real = os.path.realpath(path)
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and (real == fields[1] or real.startswith(fields[1].rstrip("/") + "/")):
            if len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


def machine(data_root: str) -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "kernel": platform.release(),
        "data_filesystem": _filesystem(data_root),
        # Other programs running at the same time skew every figure; this shows how busy the machine was.
        "load_average_at_start": os.getloadavg(),
    }


def _redis_server_version() -> str | None:
    from benchmarks.servers import redis_server_path

    executable = redis_server_path()
    if executable is None:
        return None
    output = subprocess.run([executable, "--version"], capture_output=True, text=True, check=False).stdout
    for word in output.split():
        if word.startswith("v="):
            return word[2:]
    return output.strip() or None


def versions() -> dict[str, Any]:
    found: dict[str, Any] = {"python": platform.python_version(), "python_implementation": platform.python_implementation()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["redis-server"] = _redis_server_version()
    found["sqlite"] = sqlite3.sqlite_version
    try:
        import lmdb

        found["liblmdb"] = ".".join(str(part) for part in lmdb.version())
    except ImportError:
        found["liblmdb"] = None
    return found


def git_commit() -> str | None:
    """Return the commit of the repository, with ``-dirty`` when files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if changes else "")


# The table.


def format_value(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(results: Sequence[Result], workload: str) -> list[list[str]]:
    """Return the rows of one workload's table: a header, then one row per variant."""
    rows = [result for result in results if result.workload == workload]
    columns: list[tuple[str, str]] = []
    for result in rows:
        if (result.metric, result.unit) not in columns:
            columns.append((result.metric, result.unit))
    systems: list[str] = []
    for result in rows:
        if result.system not in systems:
            systems.append(result.system)

    header = ["system", "durable", *(f"{metric} ({unit})" for metric, unit in columns)]
    lines = [header]
    for system in systems:
        by_metric = {(r.metric, r.unit): r for r in rows if r.system == system}
        durable = next(r.durable for r in rows if r.system == system)
        cells = [format_value(by_metric[column].value) if column in by_metric else "-" for column in columns]
        lines.append([system, "yes" if durable else "no", *cells])
    return lines


def render_text(lines: list[list[str]]) -> str:
    widths = [max(len(line[index]) for line in lines) for index in range(len(lines[0]))]
    rendered = []
    for line in lines:
        cells = [cell.ljust(width) if index < 2 else cell.rjust(width) for index, (cell, width) in enumerate(zip(line, widths))]
        rendered.append("  ".join(cells).rstrip())
    return "\n".join(rendered)


def _is_number(cell: str) -> bool:
    try:
        float(cell.replace(",", ""))
    except ValueError:
        return cell == "-"
    return True


def render_markdown(lines: list[list[str]]) -> str:
    """Render a table in Markdown, with the columns of numbers aligned right."""
    header, *body = lines
    alignment = []
    for index in range(len(header)):
        numeric = bool(body) and all(_is_number(line[index]) for line in body)
        alignment.append("---:" if numeric else "---")
    return "\n".join("| " + " | ".join(line) + " |" for line in [header, alignment, *body])


def goal_lines(outcomes: Sequence[GoalOutcome]) -> list[list[str]]:
    lines = [["goal", "target", "sharedict", "baseline", "ratio", "status"]]
    for outcome in outcomes:
        ratio = outcome.ratio
        status = {True: "met", False: "missed", None: "not measured"}[outcome.met]
        lines.append(
            [
                outcome.goal.label,
                outcome.goal.describe(),
                format_value(outcome.value) if outcome.value is not None else "-",
                format_value(outcome.baseline) if outcome.baseline is not None else "-",
                f"{ratio:.2f}" if ratio is not None and outcome.goal.baseline_system else "-",
                status,
            ]
        )
    return lines


# JSON.


def write_json(path: str, document: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as file:
        json.dump(document, file, indent=2, default=_json_default)
        file.write("\n")


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def write_markdown(path: str, document: dict[str, Any], sections: Sequence[tuple[str, list[list[str]]]]) -> None:
    """Write the environment of a run and its tables as Markdown, for docs/benchmarks.md."""
    machine_facts = document["machine"]
    found = document["versions"]
    library_names = [name for name in LIBRARIES if found.get(name)]
    lines = [
        f"- machine: {describe_machine(machine_facts)}",
        f"- load average (1, 5, 15 min) {describe_load(machine_facts)}",
        f"- Python {found['python']} ({found['python_implementation']})",
        "- " + ", ".join(f"{name} {found[name]}" for name in library_names),
        f"- redis-server {found['redis-server']}, SQLite {found['sqlite']}, LMDB {found['liblmdb']}",
        f"- commit {document['commit']}",
        f"- command: `{' '.join(document['command'])}`",
    ]
    for title, table_lines in sections:
        lines += ["", f"### {title}", "", render_markdown(table_lines)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


def describe_machine(machine_facts: dict[str, Any]) -> str:
    """Describe the machine of a run in one line: CPU, memory, kernel and the data's filesystem."""
    memory = machine_facts["memory_bytes"]
    return (
        f"{machine_facts['cpu']}, {machine_facts['logical_cpus']} logical CPUs, "
        + (f"{memory / (1 << 30):.1f} GiB memory" if memory else "memory unknown")
        + f", Linux {machine_facts['kernel']}, data on {machine_facts['data_filesystem']}"
    )


def describe_load(machine_facts: dict[str, Any]) -> str:
    """Describe the load averages at the start and the end of a run."""
    return (
        f"at the start {_load(machine_facts['load_average_at_start'])}, "
        f"at the end {_load(machine_facts.get('load_average_at_end'))}"
    )


def measure_in_scratch(
    program: str, argv: Sequence[str] | None, tmp_dir: str | None, measure: Callable[[str], Measured]
) -> tuple[Measured, dict[str, Any]]:
    """Run ``measure(root)`` in a scratch directory, removed afterwards; return its result and the run's environment.

    The environment contains the machine with its load averages before and after,
    the versions, the commit and the command of ``python -m benchmarks.PROGRAM``.
    """
    root = tempfile.mkdtemp(prefix=f"{program.replace('_', '-')}-", dir=tmp_dir)
    try:
        machine_facts = machine(root)
        result = measure(root)
        machine_facts["load_average_at_end"] = os.getloadavg()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result, {
        "machine": machine_facts,
        "versions": versions(),
        "commit": git_commit(),
        "command": ["python", "-m", f"benchmarks.{program}", *(sys.argv[1:] if argv is None else argv)],
    }


def print_environment(environment: dict[str, Any]) -> None:
    """Print the machine, the load averages, the Python and LMDB versions and the commit of a run."""
    machine_facts = environment["machine"]
    found = environment["versions"]
    print(f"machine: {describe_machine(machine_facts)}")
    print(f"load average (1, 5, 15 min): {describe_load(machine_facts)}")
    print(f"python {found['python']}, lmdb {found['liblmdb']}, commit {environment['commit']}")


def _load(averages: Sequence[float] | None) -> str:
    return ", ".join(f"{average:.1f}" for average in averages) if averages else "unknown"


def environment(data_root: str, arguments: Sequence[str]) -> dict[str, Any]:
    return {
        "machine": machine(data_root),
        "versions": versions(),
        "commit": git_commit(),
        "command": [os.path.basename(sys.executable), "-m", "benchmarks", *arguments],
    }
