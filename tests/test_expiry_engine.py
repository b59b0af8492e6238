"""Expiry in the engine, driven by an injected clock: no test here sleeps.

With ``expire_after=100`` a read records its access at most once per second (1%), and
an entry expires 101 s after its last recorded access.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from sharedict.engine import EntryNotFound, GroupCommitWriter, Store
from sharedict.engine.layout import Touch
from sharedict.engine.sweeper import Sweeper

EXPIRE_AFTER = 100.0
GRANULARITY = 1.0
LIFETIME = EXPIRE_AFTER + GRANULARITY
START = 1_700_000_000.0
ENV = "main"


class FakeClock:
    """A wall clock that moves only when told to."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    store = Store(tmp_path / "data", expire_after=EXPIRE_AFTER, clock=clock)
    yield store
    store.close()


@pytest.fixture
def writer(store: Store) -> Iterator[GroupCommitWriter]:
    writer = GroupCommitWriter(store)
    writer.start()
    yield writer
    writer.stop()


# Helpers: each call is one transaction, as one request of the daemon would be.


def write(store: Store, function: Callable[[lmdb.Transaction], Any]) -> Any:
    with store.begin_write() as txn:
        return function(txn)


def new_dict(store: Store, name: str = "d") -> bytes:
    record, _ = write(store, lambda txn: store.create_dict(txn, ENV, name, created_by="test", exist_ok=False))
    return record.object_id


def put(store: Store, object_id: bytes, key: bytes, value: bytes = b"v", *, skip_if_exists: bool = False) -> bool:
    return write(store, lambda txn: store.put(txn, object_id, key, None, value, skip_if_exists=skip_if_exists))


def fill(store: Store, object_id: bytes, count: int, prefix: bytes = b"k") -> None:
    entries = [(prefix + b"%d" % i, None, b"v") for i in range(count)]
    write(store, lambda txn: store.update(txn, object_id, entries))


def record(store: Store, touches: list[Touch]) -> None:
    """Apply the touches of a read, as the daemon's writer does after the reply."""
    for touch in touches:
        write(store, lambda txn, touch=touch: store.touch(txn, touch))


def get(store: Store, object_id: bytes, key: bytes) -> bytes | None:
    """Read a key and record its access; None when the key is missing."""
    with store.reader() as txn:
        try:
            value, touch = store.get(txn, object_id, key)
        except EntryNotFound:
            return None
    record(store, [touch] if touch else [])
    return value


def get_touch(store: Store, object_id: bytes, key: bytes) -> Touch | None:
    with store.reader() as txn:
        return store.get(txn, object_id, key)[1]


def visible(store: Store, object_id: bytes, key: bytes) -> bool:
    """Whether the key is present, without recording an access."""
    with store.reader() as txn:
        return store.contains(txn, object_id, key)[0]


def length(store: Store, object_id: bytes) -> int:
    with store.reader() as txn:
        return store.length(txn, object_id)


def scan(store: Store, object_id: bytes, *, keys: bool = True, values: bool = False) -> list[bytes | None]:
    """Read every entry; record the accesses as the daemon does; return the keys (or values)."""
    with store.reader() as txn:
        entries, touches, done = store.scan(txn, object_id, 0, limit=10_000, max_bytes=1 << 30, keys=keys, values=values)
    assert done
    record(store, touches)
    return [entry.key if keys else entry.value for entry in entries]


def contains(store: Store, object_id: bytes, key: bytes) -> bool:
    with store.reader() as txn:
        found, touch = store.contains(txn, object_id, key)
    record(store, [touch] if touch else [])
    return found


def pop(store: Store, object_id: bytes, key: bytes) -> bytes | None:
    try:
        return write(store, lambda txn: store.pop(txn, object_id, key))
    except EntryNotFound:
        return None


def index_entries(store: Store) -> dict[str, int]:
    """Count the records of the entry tables, to see what a sweep left behind."""
    with store.reader() as txn:
        return {
            "index": txn.stat(store._index)["entries"],
            "order": txn.stat(store._order)["entries"],
            "access": txn.stat(store._access)["entries"],
        }


def sweep(store: Store, writer: GroupCommitWriter, batch_size: int = 1000) -> tuple[Sweeper, int]:
    sweeper = Sweeper(store, writer, interval=3600, batch_size=batch_size)
    return sweeper, sweeper.sweep_once()


# The deadline.


def test_entry_visible_a_millisecond_before_deadline(store, clock):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(LIFETIME - 0.001)
    assert visible(store, object_id, b"k")


def test_entry_expires_at_deadline(store, clock):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(LIFETIME)
    assert not visible(store, object_id, b"k")


def test_entry_lives_at_least_expire_after(store, clock):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(EXPIRE_AFTER)
    assert visible(store, object_id, b"k")


def test_unrecorded_read_gets_full_expire_after(store, clock):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(GRANULARITY - 0.001)
    assert get(store, object_id, b"k") == b"v"

    clock.advance(EXPIRE_AFTER)
    assert visible(store, object_id, b"k")


def test_recorded_read_moves_deadline(store, clock):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(50)
    get(store, object_id, b"k")

    clock.advance(LIFETIME - 0.001)
    assert visible(store, object_id, b"k")
    clock.advance(0.001)
    assert not visible(store, object_id, b"k")


def test_fractional_expire_after_never_early(tmp_path, clock):
    store = Store(tmp_path / "data", expire_after=0.0005, clock=clock)
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(0.0005)
    assert visible(store, object_id, b"k")
    store.close()


# What counts as activity.


ACTIVITIES: dict[str, Callable[[Store, bytes], object]] = {
    "get": lambda store, object_id: get(store, object_id, b"k"),
    "contains": lambda store, object_id: contains(store, object_id, b"k"),
    "values": lambda store, object_id: scan(store, object_id, keys=False, values=True),
    "items": lambda store, object_id: scan(store, object_id, keys=True, values=True),
    "put_skip_if_exists": lambda store, object_id: put(store, object_id, b"k", b"other", skip_if_exists=True),
    "put": lambda store, object_id: put(store, object_id, b"k", b"new"),
    "update": lambda store, object_id: write(store, lambda txn: store.update(txn, object_id, [(b"k", None, b"new")])),
}


@pytest.mark.parametrize("activity", ACTIVITIES.values(), ids=ACTIVITIES.keys())
def test_activity_extends_life(store, clock, activity):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(60)
    activity(store, object_id)
    clock.advance(60)
    assert visible(store, object_id, b"k")


NOT_ACTIVITIES: dict[str, Callable[[Store, bytes], object]] = {
    "keys": lambda store, object_id: scan(store, object_id, keys=True, values=False),
    "len": length,
}


@pytest.mark.parametrize("operation", NOT_ACTIVITIES.values(), ids=NOT_ACTIVITIES.keys())
def test_operation_does_not_extend_life(store, clock, operation):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(60)
    operation(store, object_id)
    clock.advance(60)
    assert not visible(store, object_id, b"k")


def test_put_skip_if_exists_keeps_value(store, clock):
    object_id = new_dict(store)
    put(store, object_id, b"k", b"first")
    clock.advance(60)
    assert put(store, object_id, b"k", b"second", skip_if_exists=True) is False
    assert get(store, object_id, b"k") == b"first"


# Invisibility before the sweep: "old" has expired, "new" has not, nothing was swept.


@pytest.fixture
def half_expired(store: Store, clock: FakeClock) -> bytes:
    object_id = new_dict(store)
    put(store, object_id, b"old", b"old value")
    clock.advance(60)
    put(store, object_id, b"new", b"new value")
    clock.advance(LIFETIME - 60)
    return object_id


def test_expired_get_misses(store, half_expired):
    assert get(store, half_expired, b"old") is None


def test_expired_get_raises_entry_not_found(store, half_expired):
    with store.reader() as txn, pytest.raises(EntryNotFound):
        store.get(txn, half_expired, b"old")


def test_expired_contains_is_false(store, half_expired):
    assert contains(store, half_expired, b"old") is False


def test_expired_not_counted_by_len(store, half_expired):
    assert length(store, half_expired) == 1


def test_expired_left_out_of_keys(store, half_expired):
    assert scan(store, half_expired) == [b"new"]


def test_expired_left_out_of_values(store, half_expired):
    assert scan(store, half_expired, keys=False, values=True) == [b"new value"]


def test_expired_put_skip_if_exists_inserts(store, half_expired):
    assert put(store, half_expired, b"old", b"fresh", skip_if_exists=True) is True
    assert get(store, half_expired, b"old") == b"fresh"
    assert length(store, half_expired) == 2


def test_expired_put_moves_key_to_end(store, half_expired):
    put(store, half_expired, b"old", b"fresh")
    assert scan(store, half_expired) == [b"new", b"old"]


def test_expired_pop_misses(store, half_expired):
    assert pop(store, half_expired, b"old") is None
    assert length(store, half_expired) == 1


def test_expired_entries_still_stored_before_sweep(store, half_expired):
    assert index_entries(store)["index"] == 2


# len() counts from whichever end of the last-access index is nearer.


@pytest.mark.parametrize(("expired", "live"), [(0, 0), (0, 5), (5, 0), (3, 7), (7, 3), (4, 4)])
def test_len_exact_for_any_split(store, clock, expired, live):
    before = new_dict(store, "before")
    object_id = new_dict(store, "d")
    after = new_dict(store, "after")
    for neighbour in (before, after):
        fill(store, neighbour, 3, prefix=b"n")
    fill(store, object_id, expired, prefix=b"old")
    clock.advance(60)
    fill(store, object_id, live, prefix=b"new")
    for neighbour in (before, after):
        fill(store, neighbour, 3, prefix=b"m")
    clock.advance(LIFETIME - 60)
    assert length(store, object_id) == live


# Recording granularity.


def test_read_within_granularity_records_nothing(store, clock):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(GRANULARITY - 0.001)
    assert get_touch(store, object_id, b"k") is None


def test_read_after_granularity_records(store, clock):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(GRANULARITY)
    assert get_touch(store, object_id, b"k") is not None


def test_read_after_recorded_read_records_nothing(store, clock):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(10)
    get(store, object_id, b"k")
    clock.advance(GRANULARITY - 0.001)
    assert get_touch(store, object_id, b"k") is None


def recorded_access_ms(store: Store) -> list[int]:
    """The access times in the last-access index, whose keys are data id, time, sequence number."""
    with store.reader() as txn:
        return [int.from_bytes(key[8:16], "big") for key in txn.cursor(db=store._access).iternext(values=False)]


def test_overwrite_within_granularity_records_nothing(store, clock):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(GRANULARITY - 0.001)
    put(store, object_id, b"k", b"new")
    assert recorded_access_ms(store) == [int(START * 1000)]


def test_overwrite_within_granularity_never_expires_early(store, clock):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(GRANULARITY - 0.001)
    put(store, object_id, b"k", b"new")
    clock.advance(EXPIRE_AFTER - 0.001)
    assert visible(store, object_id, b"k")


def test_overwrite_after_granularity_records(store, clock):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(GRANULARITY)
    put(store, object_id, b"k", b"new")
    assert recorded_access_ms(store) == [int(clock.now * 1000)]


def test_scan_within_granularity_records_nothing(store, clock):
    object_id = new_dict(store)
    fill(store, object_id, 10)
    clock.advance(GRANULARITY / 2)
    with store.reader() as txn:
        _, touches, _ = store.scan(txn, object_id, 0, limit=100, max_bytes=1 << 20, keys=True, values=True)
    assert touches == []


def test_touch_applied_late_keeps_read_time(store, clock):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(LIFETIME - 0.5)
    touch = get_touch(store, object_id, b"k")
    clock.advance(1)  # the touch waited in the writer's queue past the old deadline
    record(store, [touch])

    clock.advance(EXPIRE_AFTER - 0.5)
    assert visible(store, object_id, b"k")


def test_touch_of_replaced_entry_changes_nothing(store, clock):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(50)
    touch = get_touch(store, object_id, b"k")
    pop(store, object_id, b"k")
    clock.advance(-40)  # the new entry's own access is older than the touch's read
    put(store, object_id, b"k")
    record(store, [touch])

    clock.advance(LIFETIME)
    assert not visible(store, object_id, b"k")


def test_touches_within_granularity_record_once(store, clock):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(10)
    first = get_touch(store, object_id, b"k")
    clock.advance(GRANULARITY / 2)
    second = get_touch(store, object_id, b"k")  # read before the first touch was applied
    record(store, [first, second])

    clock.now = START + 10 + LIFETIME
    assert not visible(store, object_id, b"k")


# A wall clock that jumps backwards.


def test_clock_jump_back_keeps_entry(store, clock):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(-3600)
    assert visible(store, object_id, b"k")


def test_clock_jump_back_does_not_age_recorded_access(store, clock):
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(50)
    get(store, object_id, b"k")
    read_at = clock.now

    clock.now = START - 3600
    get(store, object_id, b"k")
    put(store, object_id, b"k", b"overwritten")
    put(store, object_id, b"k", b"other", skip_if_exists=True)

    clock.now = read_at + LIFETIME - 0.001
    assert visible(store, object_id, b"k")


def test_clock_jump_back_sweeps_nothing_early(store, writer, clock):
    object_id = new_dict(store)
    fill(store, object_id, 10)
    clock.advance(LIFETIME - 1)
    clock.advance(-3600)
    _, removed = sweep(store, writer)
    assert removed == 0


# The sweep.


@pytest.fixture
def mixed(store: Store, clock: FakeClock) -> dict[str, bytes]:
    """Dict "a" with 2,500 expired and 10 live entries, "b" with 5 live, "c" with 3 expired."""
    dicts = {name: new_dict(store, name) for name in ("a", "b", "c")}
    fill(store, dicts["a"], 2500, prefix=b"old")
    fill(store, dicts["c"], 3, prefix=b"old")
    clock.advance(60)
    fill(store, dicts["a"], 10, prefix=b"new")
    fill(store, dicts["b"], 5, prefix=b"new")
    clock.advance(LIFETIME - 60)
    return dicts


def test_sweep_returns_removed_count(store, writer, mixed):
    _, removed = sweep(store, writer)
    assert removed == 2503


def test_sweep_counts_swept_entries(store, writer, mixed):
    sweeper, _ = sweep(store, writer)
    assert sweeper.swept_entries == 2503


def test_sweep_sets_last_sweep_at(store, writer, mixed):
    sweeper, _ = sweep(store, writer)
    assert sweeper.last_sweep_at is not None


def test_sweep_leaves_live_entries(store, writer, mixed):
    sweep(store, writer)
    assert [length(store, mixed[name]) for name in ("a", "b", "c")] == [10, 5, 0]


def test_sweep_frees_index_records(store, writer, mixed):
    sweep(store, writer)
    assert index_entries(store) == {"index": 15, "order": 15, "access": 15}


def test_sweep_updates_entry_count(store, writer, mixed):
    sweep(store, writer)
    with store.reader() as txn:
        assert store.count_entries(txn) == 15


def test_sweep_leaves_other_dicts_scannable(store, writer, mixed):
    sweep(store, writer)
    assert scan(store, mixed["b"]) == [b"new%d" % i for i in range(5)]


def test_sweep_commits_in_batches(store, writer, mixed):
    commits_before = writer.commits
    sweep(store, writer, batch_size=1000)
    assert writer.commits - commits_before >= 3


def test_sweep_logs_removed_count(store, writer, mixed, caplog):
    caplog.set_level("INFO", logger="sharedict.engine.sweeper")
    sweep(store, writer)
    assert "sweep removed 2503 expired entries" in caplog.text


def test_remove_expired_stops_at_limit(store, mixed):
    removed, _ = write(store, lambda txn: store.remove_expired(txn, limit=1000))
    assert removed == 1000


def test_remove_expired_resumes_in_same_dict(store, mixed):
    _, position = write(store, lambda txn: store.remove_expired(txn, limit=1000))
    removed, _ = write(store, lambda txn: store.remove_expired(txn, limit=1000, start=position))
    assert removed == 1000


def test_remove_expired_reports_end(store, mixed):
    _, position = write(store, lambda txn: store.remove_expired(txn, limit=10_000))
    assert position is None


def test_remove_expired_bounds_dicts_visited(store, clock):
    for index in range(5):
        new_dict(store, f"empty-{index}")
    removed, position = write(store, lambda txn: store.remove_expired(txn, limit=2))
    assert (removed, position is None) == (0, False)


def test_remove_expired_visits_every_dict(store, clock):
    dicts = [new_dict(store, f"d{index}") for index in range(7)]
    for object_id in dicts:
        fill(store, object_id, 3)
    clock.advance(LIFETIME)
    total = 0
    position: bytes | None = b""
    while position is not None:
        removed, position = write(store, lambda txn: store.remove_expired(txn, limit=2, start=position))
        total += removed
    assert total == 21


def test_sweep_removes_cleared_dict_garbage(store, writer):
    object_id = new_dict(store)
    fill(store, object_id, 2500)
    write(store, lambda txn: store.clear(txn, object_id))
    sweep(store, writer)
    assert index_entries(store) == {"index": 0, "order": 0, "access": 0}


def test_sweep_removes_deleted_dict_garbage(store, writer):
    object_id = new_dict(store)
    fill(store, object_id, 1500)
    write(store, lambda txn: store.delete_dict(txn, object_id))
    sweep(store, writer)
    assert index_entries(store) == {"index": 0, "order": 0, "access": 0}


def test_cleared_dict_keeps_new_entries_through_sweep(store, writer):
    object_id = new_dict(store)
    fill(store, object_id, 1500)
    write(store, lambda txn: store.clear(txn, object_id))
    put(store, object_id, b"after")
    sweep(store, writer)
    assert scan(store, object_id) == [b"after"]


def test_stopped_sweeper_stops_between_batches(store, writer, mixed):
    sweeper = Sweeper(store, writer, interval=3600, batch_size=1000)
    sweeper.stop()
    assert sweeper.sweep_once() == 0


# Expiry off, and invalid settings.


def test_expire_after_zero_never_expires(tmp_path, clock):
    store = Store(tmp_path / "data", expire_after=0, clock=clock)
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(10 * 365 * 24 * 3600)
    assert visible(store, object_id, b"k")
    assert length(store, object_id) == 1
    store.close()


def test_expire_after_zero_sweeps_nothing(tmp_path, clock):
    store = Store(tmp_path / "data", expire_after=0, clock=clock)
    writer = GroupCommitWriter(store)
    writer.start()
    object_id = new_dict(store)
    fill(store, object_id, 10)
    clock.advance(10 * 365 * 24 * 3600)
    _, removed = sweep(store, writer)
    writer.stop()
    store.close()
    assert removed == 0


def test_expire_after_zero_still_records_reads(tmp_path, clock):
    # A daemon restarted with expiry turned on must not expire what was read all along.
    store = Store(tmp_path / "data", expire_after=0, clock=clock)
    object_id = new_dict(store)
    put(store, object_id, b"k")
    clock.advance(30 * 24 * 3600)
    touch = get_touch(store, object_id, b"k")
    store.close()
    assert touch is not None


@pytest.mark.parametrize("expire_after", [-1.0, math.inf, math.nan])
def test_invalid_expire_after_raises(tmp_path, expire_after):
    with pytest.raises(ValueError, match="expire_after"):
        Store(tmp_path / "data", expire_after=expire_after)


# Updates of many entries: new keys take a faster path than present or expired ones.


def test_update_mixes_new_present_and_expired_keys(store: Store, clock: FakeClock) -> None:
    object_id = new_dict(store)
    fill(store, object_id, 3)
    clock.advance(LIFETIME)
    put(store, object_id, b"live")
    entries = [
        (b"k1", None, b"back"),
        (b"new", None, b"1"),
        (b"live", None, b"2"),
        (b"new", None, b"3"),
    ]
    write(store, lambda txn: store.update(txn, object_id, entries))

    # The expired k1 comes back as a new entry, after the present one.
    assert scan(store, object_id) == [b"live", b"k1", b"new"]
    assert scan(store, object_id, keys=False, values=True) == [b"2", b"back", b"3"]
    assert length(store, object_id) == 3


def test_update_keeps_entry_count_exact(store: Store, clock: FakeClock) -> None:
    object_id = new_dict(store)
    fill(store, object_id, 3)
    clock.advance(LIFETIME)
    entries = [(b"k0", None, b"back"), (b"new", None, b"1"), (b"new", None, b"2"), (b"other", None, b"3")]
    write(store, lambda txn: store.update(txn, object_id, entries))
    write(store, lambda txn: store.remove_expired(txn, limit=100))

    with store.reader() as txn:
        assert store.count_entries(txn) == 3
