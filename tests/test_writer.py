"""The group commit writer: writes of clients that write at the same time share commits.

The gathering tests drive ``_gather`` directly with a long time limit, so that they wait
for events, never for the clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sharedict.engine import GroupCommitWriter, Store
from sharedict.engine import writer as writer_module

WAIT_LIMIT = 30.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "data")
    yield store
    store.close()


@pytest.fixture
def idle_writer(store: Store, monkeypatch: pytest.MonkeyPatch) -> GroupCommitWriter:
    """A writer whose thread is not started, with gathering limited only by WAIT_LIMIT."""
    monkeypatch.setattr(writer_module, "MAX_GATHER_SECONDS", WAIT_LIMIT)
    writer = GroupCommitWriter(store)
    writer._commit_seconds = 2 * WAIT_LIMIT
    return writer


def count(txn: object) -> None:
    """A write that changes nothing."""


def gather(writer: GroupCommitWriter, late_source: str | None = None) -> tuple[float, list[object]]:
    """Run one gathering pause while another thread queues a write from ``late_source``.

    Returns the seconds it took and the sources of the queued writes when it ended.
    """

    def submit_late() -> None:
        time.sleep(0.05)
        writer.submit(count, source=late_source)

    late = threading.Thread(target=submit_late) if late_source else None
    if late:
        late.start()
    started = time.monotonic()
    with writer._cond:
        writer._gather()
        sources = [write.source for write in writer._queue]
    elapsed = time.monotonic() - started
    if late:
        late.join()
    return elapsed, sources


def test_batch_waits_for_steady_writer(idle_writer):
    idle_writer._batch_sources.extend([{"a", "b"}, {"a", "b"}])
    idle_writer.submit(count, source="a")
    _, sources = gather(idle_writer, late_source="b")
    assert sources == ["a", "b"]


def test_steady_writer_ends_the_wait(idle_writer):
    idle_writer._batch_sources.extend([{"a", "b"}, {"a", "b"}])
    idle_writer.submit(count, source="a")
    elapsed, _ = gather(idle_writer, late_source="b")
    assert elapsed < WAIT_LIMIT


def test_batch_does_not_wait_for_occasional_writer(idle_writer):
    idle_writer._batch_sources.extend([{"a"}, {"c"}, {"a"}, {"a", "b"}])
    idle_writer.submit(count, source="a")
    elapsed, _ = gather(idle_writer)
    assert elapsed < WAIT_LIMIT


def test_single_writer_never_waits(idle_writer):
    idle_writer._batch_sources.extend([{"a"}, {"a"}, {"a"}, {"a"}])
    idle_writer.submit(count, source="a")
    elapsed, _ = gather(idle_writer)
    assert elapsed < WAIT_LIMIT


def test_stop_ends_the_wait(idle_writer):
    idle_writer._batch_sources.extend([{"a", "b"}, {"a", "b"}])
    idle_writer.submit(count, source="a")
    threading.Timer(0.05, idle_writer.stop).start()
    elapsed, _ = gather(idle_writer)
    assert elapsed < WAIT_LIMIT


def test_steady_writers_all_commit(store):
    """Four clients that wait for each write, as connections do, through the gathering pauses."""
    writer = GroupCommitWriter(store)
    writer.start()

    def client(name: bytes) -> None:
        for _ in range(50):
            done = threading.Event()
            writer.submit(lambda txn: store.next_counter(txn, name), lambda result, error: done.set(), source=name)
            done.wait()

    names = [b"client-%d" % index for index in range(4)]
    threads = [threading.Thread(target=client, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.stop()

    with store.begin_write() as txn:
        counters = [store.next_counter(txn, name) - 1 for name in names]
    assert counters == [50, 50, 50, 50]
