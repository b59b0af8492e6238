"""No client can crash the daemon: fuzzed frames while a well-behaved client works.

``fuzzing.py`` describes the frames. Afterwards the daemon must still serve, the
well-behaved client must have met no error, the daemon's threads, open files and memory
must be back near where they started, and the LMDB environment must be consistent.
"""

from __future__ import annotations

import pytest
from stress.fuzzing import FuzzStats, WellBehavedClient, create_fuzz_dicts, fuzz, open_fds, process_status
from stress.lmdb_integrity import check_data_dir

from helpers import wait_until
from sharedict.api import protocol
from sharedict.api.transport import Request

QUICK_FRAME_GOAL = 1_000
FRAME_GOAL = 100_000
# Memory the daemon may keep after the run: the allocator's free lists and the LMDB
# pages it touched. A leak of one frame per session would exceed it many times over.
RSS_GROWTH_LIMIT = 256 << 20


def run_fuzzer(daemon, frame_goal: int, sessions_per_round: int) -> tuple[list[str], dict[str, int | float]]:
    """Fuzz the daemon until ``frame_goal`` frames were sent; return the internal errors met, and the figures."""
    status_client = daemon.client()
    context = create_fuzz_dicts(daemon.client())
    well_behaved = WellBehavedClient(daemon.client())
    well_behaved.start()
    assert well_behaved.wait_for_calls(5)
    pid = daemon.process.pid
    before = process_status(pid)
    fds_before = open_fds(pid)
    connections_before = status_client.call(Request(protocol.STATUS))["connections"]

    stats = FuzzStats()
    fuzz(
        daemon.socket_path,
        context,
        frame_goal=frame_goal,
        is_daemon_alive=lambda: daemon.process.poll() is None,
        stats=stats,
        sessions_per_round=sessions_per_round,
    )
    served_after = well_behaved.wait_for_calls(5)
    well_behaved.stop()

    settled = wait_until(
        lambda: status_client.call(Request(protocol.STATUS))["connections"] <= connections_before, timeout=60
    )
    after = process_status(pid)
    fds_after = open_fds(pid)
    daemon_crashes = 0 if daemon.process.poll() is None else 1
    daemon.stop()
    return stats.internal_errors, {
        "frames_sent": stats.frames_sent,
        "bytes_sent": stats.bytes_sent,
        "sessions": stats.sessions,
        "sessions_closed_by_daemon": stats.closed_by_daemon,
        "replies": stats.replies,
        "internal_error_replies": stats.internal_error_count,
        "daemon_crashes": daemon_crashes,
        "well_behaved_calls": well_behaved.calls,
        "well_behaved_errors": len(well_behaved.errors) + (0 if served_after else 1),
        "connections_settled": int(settled),
        "rss_mib_before": before["rss_bytes"] / 2**20,
        "rss_mib_after": after["rss_bytes"] / 2**20,
        "rss_growth_bytes": after["rss_bytes"] - before["rss_bytes"],
        "threads_before": before["threads"],
        "threads_after": after["threads"],
        "open_fds_before": fds_before,
        "open_fds_after": fds_after,
        "integrity_problems": len(check_data_dir(daemon.data_dir).problems),
    }


def check_result(internal_errors: list[str], result: dict[str, int | float], frame_goal: int) -> None:
    assert internal_errors == []
    assert result["frames_sent"] >= frame_goal
    assert result["daemon_crashes"] == 0
    assert result["well_behaved_errors"] == 0
    assert result["connections_settled"] == 1
    assert result["threads_after"] <= result["threads_before"] + 1
    assert result["open_fds_after"] <= result["open_fds_before"] + 1
    assert result["rss_growth_bytes"] < RSS_GROWTH_LIMIT
    assert result["integrity_problems"] == 0


def test_fuzzed_frames_leave_daemon_serving(daemon, figures):
    internal_errors, result = run_fuzzer(daemon, QUICK_FRAME_GOAL, sessions_per_round=100)
    figures(**result)
    check_result(internal_errors, result, QUICK_FRAME_GOAL)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_hundred_thousand_fuzzed_frames(daemon, figures):
    internal_errors, result = run_fuzzer(daemon, FRAME_GOAL, sessions_per_round=1000)
    figures(**result)
    check_result(internal_errors, result, FRAME_GOAL)
