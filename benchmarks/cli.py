"""``python -m benchmarks``: measure sharedict beside diskcache, sqlitedict, Redis and LMDB."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

from benchmarks import report, systems
from benchmarks.results import Result, evaluate_goals
from benchmarks.servers import Servers, redis_server_path
from benchmarks.workloads import FULL, QUICK, WORKLOADS, Context, Scale, describe


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
    parser.add_argument("--quick", action="store_true", help="Small sizes and fewer repetitions, without the goals: one to two minutes.")
    parser.add_argument(
        "--only",
        type=lambda text: sorted(_names(text.upper(), list(WORKLOADS), "workload"), key=list(WORKLOADS).index),
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
        "--markdown", metavar="PATH", help="Write the machine, versions and tables as Markdown to PATH."
    )
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


def run_workloads(
    arguments: argparse.Namespace, variants: Sequence[systems.Variant], root: str
) -> tuple[list[Result], dict[str, str]]:
    """Run the selected workloads; return their results and the error of each that failed.

    A failing workload keeps the results it measured before the failure, and the run
    goes on with the next workload, so one broken system does not void a long run.
    """
    scale = QUICK if arguments.quick else FULL
    results: list[Result] = []
    failures: dict[str, str] = {}
    for workload in arguments.only:
        print(f"{workload}: {describe(workload, scale)}", file=sys.stderr, flush=True)
        _, run = WORKLOADS[workload]
        started = time.monotonic()
        # Each workload's data goes once it is done: the full run would otherwise keep
        # gigabytes of it until the end.
        workload_root = tempfile.mkdtemp(prefix=f"{workload.lower()}-", dir=root)
        context = None
        try:
            with Servers(workload_root) as servers:
                context = Context(workload_root, servers, scale, variants)
                run(context)
        except Exception as exc:
            failures[workload] = traceback.format_exc()
            print(f"  {workload} failed: {exc!r}\n{failures[workload]}", file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(workload_root, ignore_errors=True)
        if context is not None:
            results.extend(context.results)
        print(f"  {workload} took {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return results, failures


def result_sections(results: Sequence[Result], workloads: Sequence[str], scale: Scale) -> list[tuple[str, list[list[str]]]]:
    """Return a titled table per workload that has results, then the goals."""
    sections = []
    for workload in workloads:
        lines = report.table(results, workload)
        if len(lines) > 1:
            sections.append((f"{workload}: {describe(workload, scale)}", lines))
    # At the sizes of --quick, fixed costs such as the daemon's baseline memory decide
    # the ratios, so only a full run judges the goals.
    outcomes = evaluate_goals(results)
    if outcomes and scale is FULL:
        sections.append(("Goals (ratios of figures measured in this run)", report.goal_lines(outcomes)))
    return sections


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    _raise_on_sigterm()
    variants = _select_variants(arguments.systems)
    scale = QUICK if arguments.quick else FULL
    root = tempfile.mkdtemp(prefix="sharedict-bench-", dir=arguments.tmp_dir)
    document = report.environment(root, sys.argv[1:] if argv is None else list(argv))
    started = time.time()

    try:
        if arguments.check_durability:
            from benchmarks.durability import check_durability, finding_lines

            findings = check_durability(variants, root)
            sections = [("Durability: a sync call inside each write call, seen by strace", finding_lines(findings))]
            document["durability"] = [{**dataclasses.asdict(finding), "durable": finding.durable} for finding in findings]
            status = 0 if all(finding.matches for finding in findings) else 1
        else:
            results, failures = run_workloads(arguments, variants, root)
            sections = result_sections(results, arguments.only, scale)
            document["scale_name"] = "quick" if arguments.quick else "full"
            document["scale"] = dataclasses.asdict(scale)
            document["descriptions"] = {workload: describe(workload, scale) for workload in arguments.only}
            document["results"] = results
            document["goals"] = [outcome.to_json() for outcome in evaluate_goals(results)] if scale is FULL else []
            document["failures"] = failures
            if arguments.charts:
                from benchmarks.charts import write_charts

                paths = write_charts(results, arguments.charts, document["descriptions"])
                print(f"wrote {len(paths)} charts to {arguments.charts}", file=sys.stderr)
            status = 1 if failures else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)

    for title, lines in sections:
        print(f"\n{title}")
        print(report.render_text(lines))
    document["seconds"] = round(time.time() - started, 1)
    document["machine"]["load_average_at_end"] = os.getloadavg()
    if arguments.json:
        report.write_json(arguments.json, document)
        print(f"wrote {arguments.json}", file=sys.stderr)
    if arguments.markdown:
        report.write_markdown(arguments.markdown, document, sections)
        print(f"wrote {arguments.markdown}", file=sys.stderr)
    return status
