"""Count the tokens of every Python file of the standard library, memoized in a shared dict.

A pool of worker processes tokenizes the files. Each worker looks a file up in the dict
under ``(SHA-256 of its content, path under the root)``, such as
``("3f9a...", "asyncio/tasks.py")``, and tokenizes it only when the dict has no
result for it yet. It then stores the result, for every later run and every other
process. A second run therefore reads every result from the dict instead of computing
it. A file whose content changes gets a new key, and the old entry expires after 7 days
without activity (the default expiry).

    python examples/memoize_stdlib.py                    # two runs: compute, then reuse
    python examples/memoize_stdlib.py --runs 1 --limit 100
    python examples/memoize_stdlib.py --root ~/src/project --dict project-tokens

The first run starts a sharedict daemon in the background if none is running; stop it
with ``sharedict stop``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing
import os
import sysconfig
import time
import tokenize
from dataclasses import dataclass

from sharedict import Dict, InvalidError

DEFAULT_DICT = "stdlib-tokens"
# Installed third-party packages live inside the standard library's directory on some
# systems; they are not part of the standard library.
SKIPPED_DIRECTORIES = frozenset({"site-packages", "dist-packages"})

# The dict and the root directory of the worker process, set by the pool's initializer.
cache: Dict | None = None
root = ""


@dataclass
class RunSummary:
    """Counts of one run: files computed and reused, files that do not tokenize, and tokens."""

    computed: int = 0
    reused: int = 0
    skipped: int = 0
    tokens: int = 0
    seconds: float = 0.0


def find_python_files(root: str, limit: int | None) -> list[str]:
    """Return the ``.py`` files under ``root`` in sorted order, at most ``limit`` of them."""
    paths = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(name for name in subdirectories if name not in SKIPPED_DIRECTORIES)
        for name in sorted(files):
            path = os.path.join(directory, name)
            # A broken symbolic link or an unreadable file has no content to count.
            if name.endswith(".py") and os.path.isfile(path) and os.access(path, os.R_OK):
                paths.append(path)
        if limit is not None and len(paths) >= limit:
            break
    return paths[:limit]


def count_tokens(source: bytes) -> dict[str, object]:
    """Tokenize a file's content and return its token count, or the reason it cannot be tokenized."""
    try:
        tokens = sum(1 for _ in tokenize.tokenize(io.BytesIO(source).readline))
    except (tokenize.TokenError, SyntaxError, UnicodeDecodeError) as exc:
        # Some files of the standard library's own tests are broken on purpose, for
        # example with an unknown source encoding.
        return {"tokens": 0, "error": f"{type(exc).__name__}: {exc}"}
    return {"tokens": tokens, "error": None}


def open_cache(shared: Dict, files_root: str) -> None:
    """Keep the dict handle and the root directory that the parent passed to this worker process."""
    global cache, root
    cache = shared
    root = files_root


def process_file(path: str) -> tuple[bool, dict[str, object]]:
    """Return (whether the result was reused, the result) for one file; runs in a worker."""
    with open(path, "rb") as file:
        source = file.read()
    # The path comes last and is relative to the root: `sharedict items` on a terminal
    # shows a long key's start and end, so the end names the file.
    key = (hashlib.sha256(source).hexdigest(), os.path.relpath(path, root))

    result = cache.get(key)
    if result is not None:
        return True, result

    result = count_tokens(source)
    cache[key] = result
    return False, result


def run_once(shared: Dict, root_directory: str, paths: list[str], workers: int) -> RunSummary:
    """Process every file in a fresh pool of workers and sum up the results."""
    summary = RunSummary()
    started = time.perf_counter()

    # Spawned workers are fresh interpreters that share nothing with this process but the
    # dict. The handle travels to them pickled, as a reference to the dict.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=open_cache, initargs=(shared, root_directory)) as pool:
        for reused, result in pool.imap_unordered(process_file, paths, chunksize=8):
            if reused:
                summary.reused += 1
            else:
                summary.computed += 1
            if result["error"] is not None:
                summary.skipped += 1
            summary.tokens += result["tokens"]

    summary.seconds = time.perf_counter() - started
    return summary


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Count the tokens of every .py file of the standard library (without site-packages) "
        "with a pool of worker processes, memoizing each file's count in a sharedict Dict.",
    )
    parser.add_argument(
        "--dict", default=DEFAULT_DICT, metavar="NAME", help=f"name of the dict of results (default: {DEFAULT_DICT})"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 2,
        metavar="N",
        help="number of worker processes (default: the number of CPUs)",
    )
    parser.add_argument("--limit", type=int, metavar="N", help="process only the first N files in sorted order")
    parser.add_argument(
        "--runs",
        type=int,
        default=2,
        metavar="N",
        help="number of runs; every run after the first reuses the stored results (default: 2)",
    )
    parser.add_argument(
        "--root",
        default=sysconfig.get_paths()["stdlib"],
        metavar="DIR",
        help="directory to scan instead of the standard library",
    )
    args = parser.parse_args(argv)
    for option in ("workers", "runs", "limit"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option} must be 1 or more, not {value}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    paths = find_python_files(args.root, args.limit)
    if not paths:
        raise SystemExit(f"no .py files found under {args.root}; pass --root with a directory of Python files")

    try:
        shared = Dict.from_name(args.dict, create_if_missing=True)
    except InvalidError as exc:
        raise SystemExit(f"--dict: {exc}") from None
    print(f"{len(paths):,} .py files under {args.root}")
    print(f"dict {args.dict!r} holds {shared.len():,} results; {args.workers} worker processes")

    summaries = []
    for number in range(1, args.runs + 1):
        summary = run_once(shared, args.root, paths, args.workers)
        summaries.append(summary)
        print(
            f"run {number}: {summary.computed:,} computed, {summary.reused:,} reused, "
            f"{summary.skipped:,} skipped as not tokenizable; {summary.tokens:,} tokens in {summary.seconds:.2f} s"
        )

    # The comparison means something only when the first run computed counts that the
    # last one reused.
    if len(summaries) > 1 and summaries[0].computed:
        first, last = summaries[0], summaries[-1]
        print(
            f"run {len(summaries)} took {last.seconds:.2f} s against {first.seconds:.2f} s for run 1 "
            f"({first.seconds / last.seconds:.1f} times as fast)"
        )


if __name__ == "__main__":
    main()
