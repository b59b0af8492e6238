"""Growth under load: the map grows while readers iterate, and no client notices.

Writers add entries whose values carry a SHA-256 digest of themselves, while readers
iterate the dict again and again and check every value. The daemon starts with a small
map, so it must grow several times during the run. No client may meet an error (a
``MapFullError`` reaching a client would be one), and no reader may see a torn value.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import pytest
from stress import workloads
from stress.lmdb_integrity import check_data_dir

from helpers import stop_process
from sharedict import Dict

MiB = 1 << 20
QUICK_BYTES = 200 * MiB
QUICK_INITIAL_MAP = 32 * MiB
TOTAL_BYTES = 2048 * MiB
INITIAL_MAP = 64 * MiB
VALUE_SIZE = 512 << 10

_GROWN = re.compile(r"map grown from (\d+) MiB to (\d+) MiB")


def run_growth(tmp_path, *, total_bytes: int, initial_map: int, writers: int, readers: int) -> dict[str, int]:
    """Write ``total_bytes`` of new entries while readers iterate; return the figures.

    Raises ``AssertionError`` with the first client errors when any client met one.
    """
    socket_dir = tempfile.mkdtemp(prefix="sd-", dir="/tmp")
    socket_path = os.path.join(socket_dir, "sharedict.sock")
    data_dir = str(tmp_path / "data")
    log_path = str(tmp_path / "daemon.log")
    process = workloads.start_daemon(socket_path, data_dir, log_path, map_size=initial_map)
    tally = workloads.Tally()
    try:
        handle = Dict.from_name("growth", create_if_missing=True, client=workloads.client_of(socket_path, data_dir))
        handle.hydrate()
        readers_threads = workloads.Threads()
        for reader in range(readers):
            readers_threads.start(
                f"reader-{reader}", workloads.read_everything, handle, reader, tally, readers_threads.stop_event
            )
        writer_threads = workloads.Threads()
        for writer in range(writers):
            writer_threads.start(
                f"writer-{writer}",
                workloads.write_new_entries,
                handle,
                writer,
                total_bytes // writers,
                VALUE_SIZE,
                tally,
                writer_threads.stop_event,
            )
        assert writer_threads.join(timeout=3600), "the writers did not finish within an hour"
        assert readers_threads.stop(), "the readers did not stop"
        entries = len(handle)
    finally:
        stop_process(process)
        shutil.rmtree(socket_dir, ignore_errors=True)
    assert tally.errors == [], tally.errors

    with open(log_path, errors="replace") as log:
        growths = [int(new_size) for _, new_size in _GROWN.findall(log.read())]
    return {
        "bytes_written": tally.bytes_written,
        "entries": entries,
        "map_mib_before": initial_map // MiB,
        "map_mib_after": growths[-1] if growths else initial_map // MiB,
        "map_growths": len(growths),
        "data_file_mib": workloads.data_file_size(data_dir) // MiB,
        "values_read": tally.values_read,
        "reader_passes": tally.passes,
        "torn_values": tally.torn_values,
        "client_errors": len(tally.errors),
        "integrity_problems": len(check_data_dir(data_dir).problems),
    }


def check_result(result: dict[str, int], total_bytes: int) -> None:
    assert result["bytes_written"] >= total_bytes
    assert result["map_growths"] >= 2
    assert result["map_mib_after"] * MiB > total_bytes
    assert result["torn_values"] == 0
    assert result["values_read"] > 0
    assert result["integrity_problems"] == 0


def test_map_grows_under_load(tmp_path, figures):
    result = run_growth(tmp_path, total_bytes=QUICK_BYTES, initial_map=QUICK_INITIAL_MAP, writers=2, readers=1)
    figures(**result)
    check_result(result, QUICK_BYTES)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_two_gigabytes_grow_map_under_load(tmp_path, figures):
    result = run_growth(tmp_path, total_bytes=TOTAL_BYTES, initial_map=INITIAL_MAP, writers=4, readers=4)
    figures(**result)
    check_result(result, TOTAL_BYTES)
