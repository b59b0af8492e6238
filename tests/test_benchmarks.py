"""The benchmark suite still runs: a tiny configuration end to end, with no speed asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 180


def run_suite(*arguments: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", *arguments],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict]:
    output = tmp_path_factory.mktemp("bench")
    json_path = output / "results.json"
    completed = run_suite(
        "--only", "W1", "--systems", "sharedict", "--json", str(json_path), "--tmp-dir", str(output)
    )
    document = json.loads(json_path.read_text()) if json_path.exists() else {}
    return completed, document


def test_quick_run_exits_zero(quick_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    completed, _ = quick_run
    assert completed.returncode == 0, completed.stderr


def test_quick_run_writes_w1_figures(quick_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    _, document = quick_run
    metrics = {result["metric"] for result in document.get("results", []) if result["system"] == "sharedict"}
    assert metrics == {"set p50", "set p99", "set", "get p50", "get p99", "get"}


def test_quick_run_records_durability(quick_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    _, document = quick_run
    assert all(result["durable"] is True for result in document.get("results", []))


def test_quick_run_records_environment(quick_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    _, document = quick_run
    assert document["machine"]["logical_cpus"] >= 1
    assert document["versions"]["python"]
    assert document["versions"]["lmdb"]


def test_quick_run_prints_table(quick_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    completed, _ = quick_run
    assert "sharedict" in completed.stdout
    assert "get p50" in completed.stdout


def test_quick_run_judges_no_goals(quick_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    completed, document = quick_run
    assert "Goals" not in completed.stdout
    assert document["goals"] == []


def test_quick_run_leaves_no_data(quick_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    _, document = quick_run
    # The run's scratch directory lived beside the JSON file and must be gone.
    json_dir = Path(document["command"][document["command"].index("--json") + 1]).parent
    assert [path.name for path in json_dir.iterdir()] == ["results.json"]


def test_charts_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    completed = run_suite(
        "--only", "W6", "--systems", "sharedict", "--charts", str(tmp_path / "charts"), "--tmp-dir", str(tmp_path)
    )
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "charts" / "w6.png").stat().st_size > 0


def test_unknown_system_is_a_usage_error() -> None:
    completed = run_suite("--systems", "memcached")
    assert completed.returncode == 2
    assert "memcached" in completed.stderr


def test_floors_run_writes_every_step(tmp_path: Path) -> None:
    json_path = tmp_path / "floors.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_floors", "--count", "20"]
        + ["--json", str(json_path), "--tmp-dir", str(tmp_path)],
        cwd=REPOSITORY,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert completed.returncode == 0, completed.stderr
    floors = json.loads(json_path.read_text())["floors"]
    steps = ["append + fdatasync", "LMDB commit, 1 table", "LMDB commit, sharedict layout", "sharedict put"]
    placements = ["", ", one CPU", ", two CPUs"] if len(os.sched_getaffinity(0)) > 1 else ["", ", one CPU"]
    for placement in placements:
        steps += [f"socket round trip{placement}", f"sharedict get{placement}"]
    assert sorted(floors) == sorted(steps)
    assert all(figures["p50_us"] > 0 for figures in floors.values())
