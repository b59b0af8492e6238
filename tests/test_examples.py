"""The programs in examples/ run against the test's daemon and print what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sharedict import Dict, NotFoundError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RUN_TIMEOUT = 120

# One line per run of memoize_stdlib.py, for example
# "run 1: 12 computed, 0 reused, 0 skipped as not tokenizable; 40,960 tokens in 1.52 s".
RUN_LINE = re.compile(
    r"^run (?P<run>\d+): (?P<computed>[\d,]+) computed, (?P<reused>[\d,]+) reused, "
    r"(?P<skipped>[\d,]+) skipped as not tokenizable; (?P<tokens>[\d,]+) tokens in [\d.]+ s$",
    re.MULTILINE,
)


def run_example(name: str, *args: str, env: dict[str, str], cwd: Path) -> str:
    """Run an example as a program and return its output; fail with its stderr if it fails."""
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert completed.returncode == 0, f"{name} exited with {completed.returncode}:\n{completed.stderr}"
    return completed.stdout


def parse_runs(output: str) -> list[dict[str, int]]:
    """Return the numbers of each run line of memoize_stdlib.py's output."""
    return [
        {field: int(text.replace(",", "")) for field, text in match.groupdict().items()}
        for match in RUN_LINE.finditer(output)
    ]


def test_quickstart_prints_value(child_env, tmp_path):
    output = run_example("quickstart.py", env=child_env, cwd=tmp_path)

    assert output == "dictionary\n"
    assert Dict.from_name("kv")["cloud"] == "dictionary"


def test_async_quickstart_prints_value(child_env, tmp_path):
    output = run_example("async_quickstart.py", env=child_env, cwd=tmp_path)

    assert output == "key: value\n"
    assert Dict.from_name("async-dict")["key"] == "value"


def test_worker_objects_used_by_parent(child_env, tmp_path):
    output = run_example("worker_objects.py", env=child_env, cwd=tmp_path)
    dict_id = re.search(r"di-[0-9a-f]{16}", output).group()

    assert "the worker stored 4 entries in di-" in output
    assert "square(7) = 49" in output
    assert "instance of Greeter: greet() = 'hello from the worker'" in output
    assert "module statistics: mean([1, 2, 3, 4]) = 2.5" in output
    assert "d[d] == d is True" in output
    assert "d[d]['lambda'](3) = 9" in output
    with pytest.raises(NotFoundError):  # the ephemeral dict is gone with its block
        Dict.from_id(dict_id).len()


def test_memoize_stdlib_second_run_reuses(child_env, tmp_path):
    output = run_example(
        "memoize_stdlib.py", "--limit", "12", "--workers", "2", "--dict", "stdlib", env=child_env, cwd=tmp_path
    )
    first, second = parse_runs(output)

    assert first["computed"] == 12
    assert first["reused"] == 0
    assert first["tokens"] > 0
    assert second["computed"] == 0
    assert second["reused"] == 12
    assert second["tokens"] == first["tokens"]
    assert Dict.from_name("stdlib").len() == 12


def test_memoize_recomputes_changed_file(child_env, tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    (root / "one.py").write_text("x = 1\n")  # 6 tokens, with ENCODING and ENDMARKER
    (root / "two.py").write_text("def f():\n    return 2\n")  # 13 tokens
    (root / "bad.py").write_text("# -*- coding: uft-8 -*-\n")  # an unknown encoding
    arguments = ("--root", str(root), "--runs", "1", "--workers", "1", "--dict", "project")

    (first,) = parse_runs(run_example("memoize_stdlib.py", *arguments, env=child_env, cwd=tmp_path))
    (root / "one.py").write_text("x = [1]\n")  # 8 tokens
    (second,) = parse_runs(run_example("memoize_stdlib.py", *arguments, env=child_env, cwd=tmp_path))

    assert first == {"run": 1, "computed": 3, "reused": 0, "skipped": 1, "tokens": 19}
    assert second == {"run": 1, "computed": 1, "reused": 2, "skipped": 1, "tokens": 21}
    assert Dict.from_name("project").len() == 4


def test_memoize_rejects_zero_workers(tmp_path):
    # The options are checked before the dict is used, so no daemon is needed.
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "memoize_stdlib.py"), "--workers", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )

    assert completed.returncode == 2
    assert "--workers must be 1 or more, not 0" in completed.stderr
