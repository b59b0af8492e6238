"""``python -m benchmarks``: measure sharedict beside diskcache, sqlitedict, Redis and LMDB."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import report, systems
from benchmarks.results import Result, evaluate_goals
from benchmarks.servers import Servers, redis_server_path
from benchmarks.workloads import FULL, QUICK, WORKLOADS, Context, describe


def _names(text: str, allowed: Sequence[str], kind: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"invalid {kind} {', '.join(unknown) or repr(text)}; choose from {', '.join(allowed)}"
        )
    return names


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure sharedict beside diskcache, sqlitedict, Redis (through redis-py) and LMDB "
        "(through py-lmdb). Starts its own sharedict daemon and redis-server in temporary directories.",
    )
    parser.add_argument("--quick", action="store_true", help="Small sizes and fewer repetitions: about a minute.")
    parser.add_argument(
        "--only",
        type=lambda text: [name.upper() for name in _names(text.upper(), list(WORKLOADS), "workload")],
        default=list(WORKLOADS),
        metavar="W1,W3",
        help="Comma-separated workloads to run [default: all].",
    )
    parser.add_argument(
        "--systems",
        type=lambda text: _names(text, systems.SYSTEMS, "system"),
        default=list(systems.SYSTEMS),
        metavar="sharedict,redis",
        help=f"Comma-separated systems to measure, from {', '.join(systems.SYSTEMS)} [default: all].",
    )
    parser.add_argument("--json", metavar="PATH", help="Write the results, machine and versions as JSON to PATH.")
    parser.add_argument("--charts", metavar="DIR", help="Write one PNG chart per workload to DIR (needs matplotlib).")
    parser.add_argument(
        "--check-durability",
        action="store_true",
        help="Instead of the workloads, check with strace which systems fsync a write before the call returns.",
    )
    parser.add_argument(
        "--tmp-dir",
        metavar="DIR",
        help="Directory for the data of every system; it decides which disk the fsyncs hit "
        "[default: the system's temporary directory].",
    )
    return parser.parse_args(argv)


def _select_variants(names: Sequence[str]) -> list[systems.Variant]:
    variants = [variant for variant in systems.VARIANTS if variant.system in names]
    if "redis" in names and redis_server_path() is None:
        print(
            "note: redis-server is not installed, so Redis is skipped; "
            "install it with `apt-get install -y redis-server`",
            file=sys.stderr,
        )
        variants = [variant for variant in variants if variant.system != "redis"]
    return variants


def _raise_on_sigterm() -> None:
    # SIGTERM becomes SystemExit, so the finally blocks that stop the servers run.
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def run_workloads(arguments: argparse.Namespace, variants: Sequence[systems.Variant], root: str) -> list[Result]:
    scale = QUICK if arguments.quick else FULL
    results: list[Result] = []
    for workload in arguments.only:
        print(f"{workload}: {describe(workload, scale)}", file=sys.stderr, flush=True)
        _, run = WORKLOADS[workload]
        started = time.monotonic()
        with Servers(root) as servers:
            context = Context(root, servers, scale, variants)
            try:
                run(context)
            finally:
                results.extend(context.results)
        print(f"  {workload} took {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return results


def print_results(results: Sequence[Result], workloads: Sequence[str], scale_name: str) -> None:
    scale = QUICK if scale_name == "quick" else FULL
    for workload in workloads:
        lines = report.table(results, workload)
        if len(lines) < 2:
            continue
        print(f"\n{workload}: {describe(workload, scale)}")
        print(report.render_text(lines))

    outcomes = evaluate_goals(results)
    if outcomes:
        print("\nGoals (ratios of figures measured in this run)")
        print(report.render_text(report.goal_lines(outcomes)))


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    _raise_on_sigterm()
    variants = _select_variants(arguments.systems)
    root = tempfile.mkdtemp(prefix="sharedict-bench-", dir=arguments.tmp_dir)
    document = report.environment(root, sys.argv[1:] if argv is None else list(argv))
    started = time.time()

    try:
        if arguments.check_durability:
            from benchmarks.durability import check_durability, finding_lines

            findings = check_durability(variants, root)
            print(report.render_text(finding_lines(findings)))
            document["durability"] = [
                {**dataclasses.asdict(finding), "durable": finding.durable} for finding in findings
            ]
            status = 0 if all(finding.matches for finding in findings) else 1
        else:
            results = run_workloads(arguments, variants, root)
            print_results(results, arguments.only, "quick" if arguments.quick else "full")
            document["scale"] = dataclasses.asdict(QUICK if arguments.quick else FULL)
            document["scale_name"] = "quick" if arguments.quick else "full"
            document["results"] = results
            document["goals"] = [outcome.to_json() for outcome in evaluate_goals(results)]
            document["descriptions"] = {
                workload: describe(workload, QUICK if arguments.quick else FULL) for workload in arguments.only
            }
            if arguments.charts:
                from benchmarks.charts import write_charts

                paths = write_charts(results, arguments.charts, document["descriptions"])
                print(f"\nwrote {len(paths)} charts to {arguments.charts}", file=sys.stderr)
            status = 0
    finally:
        shutil.rmtree(root, ignore_errors=True)

    document["seconds"] = round(time.time() - started, 1)
    if arguments.json:
        report.write_json(arguments.json, document)
        print(f"wrote {arguments.json}", file=sys.stderr)
    return status
