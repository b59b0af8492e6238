"""Long readers do not pin the data file: readers stream a large dict slowly while writers churn.

Each page of an iteration is a read transaction of its own, so a slow reader holds no
snapshot between pages, and LMDB can reuse the pages that the writers free. The data
file must therefore stay near its size before the churn, and the reader slots in use
must stay far below LMDB's maximum, however slowly the readers go.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest
from stress import workloads
from stress.lmdb_integrity import check_data_dir

from helpers import stop_process, wait_until
from sharedict import Dict

MiB = 1 << 20
VALUE_SIZE = 2048
# Bound on the data file after the churn, relative to its size before: the churn
# rewrites the whole dict several times, which a pinned snapshot would add in full.
MAX_GROWTH_RATIO = 1.5


def run_long_readers(tmp_path, *, entries: int, rounds: int, streamers: int, pause: float) -> dict[str, int | float]:
    """Fill a dict, then churn it ``rounds`` times while ``streamers`` readers iterate slowly; return the figures."""
    socket_dir = tempfile.mkdtemp(prefix="sd-", dir="/tmp")
    socket_path = os.path.join(socket_dir, "sharedict.sock")
    data_dir = str(tmp_path / "data")
    process = workloads.start_daemon(socket_path, data_dir, str(tmp_path / "daemon.log"))
    tally = workloads.Tally()
    try:
        handle = Dict.from_name("long-readers", create_if_missing=True, client=workloads.client_of(socket_path, data_dir))
        keys = [f"key-{number}" for number in range(entries)]
        workloads.fill(handle, keys, VALUE_SIZE)
        size_before = workloads.data_file_size(data_dir)

        slots = workloads.ReaderSlots(data_dir)
        readers = workloads.Threads()
        for reader in range(streamers):
            readers.start(f"reader-{reader}", workloads.read_everything, handle, reader, tally, readers.stop_event, pause)
        writers = workloads.Threads()
        halves = (keys[: entries // 2], keys[entries // 2 :])
        for writer, part in enumerate(halves):
            writers.start(f"writer-{writer}", workloads.churn, handle, writer, part, VALUE_SIZE, rounds, tally, writers.stop_event)
        deadline = time.monotonic() + 3600
        while not writers.join(timeout=0.05):
            slots.sample()
            assert time.monotonic() < deadline, "the writers did not finish within an hour"
        # Fast writers can finish before a slow reader has read the whole dict once. A
        # pass takes at least entries * pause seconds, and several times that on a busy
        # machine.
        pass_timeout = 60 + 4 * entries * pause
        assert wait_until(lambda: tally.passes > 0, timeout=pass_timeout), "no reader finished a pass over the dict"
        assert readers.stop(), "the readers did not stop"
        slots.close()

        size_after = workloads.data_file_size(data_dir)
        length = len(handle)
    finally:
        stop_process(process)
        shutil.rmtree(socket_dir, ignore_errors=True)
    assert tally.errors == [], tally.errors

    return {
        "entries": length,
        "bytes_rewritten": tally.bytes_written,
        "data_file_mib_before": size_before / MiB,
        "data_file_mib_after": size_after / MiB,
        "growth_ratio": size_after / size_before,
        "streamers": streamers,
        "values_read": tally.values_read,
        "reader_passes": tally.passes,
        "torn_values": tally.torn_values,
        "max_reader_slots_in_use": slots.max_in_use,
        "reader_slots": slots.max_readers,
        "client_errors": len(tally.errors),
        "integrity_problems": len(check_data_dir(data_dir).problems),
    }


def check_result(result: dict[str, int | float], entries: int) -> None:
    assert result["entries"] == entries
    assert result["growth_ratio"] <= MAX_GROWTH_RATIO
    assert result["bytes_rewritten"] > 2 * result["data_file_mib_before"] * MiB
    assert result["reader_passes"] > 0
    assert result["torn_values"] == 0
    assert result["max_reader_slots_in_use"] <= result["streamers"] + 8
    assert result["integrity_problems"] == 0


def test_slow_readers_leave_file_bounded(tmp_path, figures):
    result = run_long_readers(tmp_path, entries=5_000, rounds=6, streamers=8, pause=0.0002)
    figures(**result)
    check_result(result, 5_000)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_slow_readers_through_heavy_churn(tmp_path, figures):
    result = run_long_readers(tmp_path, entries=100_000, rounds=6, streamers=32, pause=0.0005)
    figures(**result)
    check_result(result, 100_000)
