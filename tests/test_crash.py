"""A daemon killed at any moment loses no write that returned.

Writer processes write without pause and log each write only after the call returned.
Meanwhile the test kills the daemon with SIGKILL (or stops it with SIGTERM) at random
moments and starts it again. A write interrupted by the kill has an unknown outcome:
the writer retries it until it returns, which is safe because every write here is
idempotent when repeated. At the end every logged write must be in the store.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
import traceback
from pathlib import Path

import pytest

from helpers import wait_until
from sharedict import Dict
from sharedict.api.errors import ConnectionLostError, DaemonUnavailableError

fork = multiprocessing.get_context("fork")

WRITERS = 3
# Writes that must be logged between one restart and the next kill, so that every kill
# falls among running writes.
WRITES_BETWEEN_KILLS = 5
PROGRESS_TIMEOUT = 60.0
JOIN_TIMEOUT = 120.0
DICT_NAME = "crash"


# The writer, run in a forked child.


def _retry(call, counts: dict[str, int]):
    """Call until it returns; an interrupted write may or may not have been applied."""
    while True:
        try:
            return call()
        except (ConnectionLostError, DaemonUnavailableError) as exc:
            counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
            # No daemon runs until the test restarts it; poll for it gently.
            time.sleep(0.01)


def _write(target: Dict, writer: int, seq: int, poppable: list[str], counts: dict[str, int]) -> dict:
    """Run one write, chosen by ``seq``, and return the log record of its outcome."""
    key = f"{writer}-{seq}"
    value = [writer, seq]
    kind = seq % 4

    if kind == 0 and poppable:
        popped = poppable.pop(0)
        _retry(lambda: target.pop(popped, None), counts)
        return {"op": "pop", "key": popped}
    if kind == 1:
        entries = {f"{key}-{part}": [writer, seq, part] for part in range(3)}
        _retry(lambda: target.update(entries), counts)
        return {"op": "update", "entries": entries}
    if kind == 2:
        inserted = _retry(lambda: target.put(key, value, skip_if_exists=True), counts)
        return {"op": "put_if_absent", "key": key, "value": value, "inserted": inserted}

    _retry(lambda: target.put(key, value), counts)
    poppable.append(key)
    return {"op": "put", "key": key, "value": value}


def _writer(writer: int, log_path: str, stop) -> None:
    counts: dict[str, int] = {}
    with open(log_path, "a", buffering=1) as log:
        try:
            target = Dict.from_name(DICT_NAME)
            poppable: list[str] = []
            seq = 0
            while not stop.is_set():
                seq += 1
                record = _write(target, writer, seq, poppable, counts)
                log.write(json.dumps(record) + "\n")
            log.write(json.dumps({"op": "done", "interrupted": counts}) + "\n")
        except BaseException:
            log.write(json.dumps({"op": "failure", "traceback": traceback.format_exc()}) + "\n")


# The test's side.


class Writers:
    """Writer processes and their logs."""

    def __init__(self, directory: Path, count: int) -> None:
        self.log_paths = [str(directory / f"writer-{number}.log") for number in range(count)]
        self.stop_event = fork.Event()
        self.processes = [
            fork.Process(target=_writer, args=(number, path, self.stop_event), daemon=True)
            for number, path in enumerate(self.log_paths)
        ]

    def start(self) -> None:
        for process in self.processes:
            process.start()

    def logged_writes(self) -> int:
        total = 0
        for path in self.log_paths:
            try:
                with open(path, "rb") as log:
                    total += log.read().count(b"\n")
            except FileNotFoundError:
                pass
        return total

    def wait_for_writes(self, count: int) -> bool:
        """Wait until ``count`` more writes are logged, or a writer has exited."""
        target = self.logged_writes() + count
        return wait_until(
            lambda: self.logged_writes() >= target or not all(p.is_alive() for p in self.processes),
            timeout=PROGRESS_TIMEOUT,
        )

    def stop(self) -> None:
        self.stop_event.set()
        for process in self.processes:
            process.join(timeout=JOIN_TIMEOUT)
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join()

    def records(self) -> list[dict]:
        records = []
        for path in self.log_paths:
            with open(path) as log:
                records.extend(json.loads(line) for line in log)
        return records


@pytest.fixture
def writers(daemon, tmp_path):
    Dict.from_name(DICT_NAME, create_if_missing=True).hydrate()
    group = Writers(tmp_path, WRITERS)
    group.start()
    yield group
    group.stop()


_ABSENT = object()


def expected_state(records: list[dict]) -> dict:
    """Replay the logged writes into the state the store must have."""
    state: dict = {}
    for record in records:
        if record["op"] in ("put", "put_if_absent"):
            state[record["key"]] = record["value"]
        elif record["op"] == "update":
            state.update(record["entries"])
        elif record["op"] == "pop":
            state[record["key"]] = _ABSENT
    return state


def stored_state() -> dict:
    """Return every entry of the writers' dict."""
    return dict(Dict.from_name(DICT_NAME).items())


def differences(expected: dict, actual: dict) -> list[str]:
    """Return a line for each key whose stored state differs from the replayed log's."""
    problems = []
    for key, value in expected.items():
        stored = actual.get(key, _ABSENT)
        if value is _ABSENT and stored is not _ABSENT:
            problems.append(f"{key}: popped, but still holds {stored!r}")
        elif value is not _ABSENT and stored != value:
            problems.append(f"{key}: expected {value!r}, found {'nothing' if stored is _ABSENT else repr(stored)}")
    for key in actual.keys() - expected.keys():
        problems.append(f"{key}: stored, but no logged write made it")
    return problems


def interrupt_repeatedly(daemon, writers: Writers, times: int, *, crash: bool) -> None:
    rng = random.Random(os.getpid())
    for _ in range(times):
        assert writers.wait_for_writes(WRITES_BETWEEN_KILLS)
        time.sleep(rng.uniform(0, 0.05))
        daemon.restart(crash=crash)


def check_writers(writers: Writers) -> tuple[list[dict], int]:
    """Stop the writers; return their write records and how many calls the kills interrupted."""
    assert writers.wait_for_writes(WRITES_BETWEEN_KILLS)
    writers.stop()
    records = writers.records()

    failures = [record["traceback"] for record in records if record["op"] == "failure"]
    assert failures == []
    done = [record for record in records if record["op"] == "done"]
    assert len(done) == WRITERS
    interrupted = sum(sum(record["interrupted"].values()) for record in done)
    writes = [record for record in records if record["op"] not in ("done", "failure")]
    return writes, interrupted


def test_sigkill_loses_no_acknowledged_write(daemon, writers):
    interrupt_repeatedly(daemon, writers, 10, crash=True)
    writes, interrupted = check_writers(writers)
    assert interrupted > 0
    assert {record["op"] for record in writes} == {"put", "update", "pop", "put_if_absent"}
    assert differences(expected_state(writes), stored_state()) == []


def test_sigterm_loses_no_acknowledged_write(daemon, writers):
    interrupt_repeatedly(daemon, writers, 5, crash=False)
    writes, interrupted = check_writers(writers)
    assert interrupted > 0
    assert differences(expected_state(writes), stored_state()) == []


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_hundred_sigkills_lose_no_acknowledged_write(daemon, writers):
    interrupt_repeatedly(daemon, writers, 100, crash=True)
    writes, interrupted = check_writers(writers)
    assert interrupted > 0
    assert differences(expected_state(writes), stored_state()) == []
