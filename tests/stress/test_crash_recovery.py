"""No acknowledged write is lost across SIGKILLs, and the LMDB environment stays consistent.

The writer processes of ``tests/test_crash.py`` (plain writes, ``update``, ``pop`` and
put-if-absent, each logged after it returned) run while the daemon is killed with SIGKILL
at random moments and started again. At the end the dict must equal the replayed log,
key for key, and the environment must open read-only and pass the integrity check.
"""

from __future__ import annotations

import pytest
from stress.lmdb_integrity import check_data_dir
from test_crash import (  # noqa: F401 - ``writers`` is a fixture
    check_writers,
    differences,
    expected_state,
    interrupt_repeatedly,
    stored_state,
    writers,
)

QUICK_KILLS = 3
KILLS = 100


def kill_repeatedly(daemon, writers, kills: int) -> tuple[dict[str, int], list[str], list[str]]:  # noqa: F811
    """Kill the daemon ``kills`` times among the writers; return the figures, the lost writes and the integrity problems."""
    interrupt_repeatedly(daemon, writers, kills, crash=True)
    writes, interrupted = check_writers(writers)

    actual = stored_state()
    lost = differences(expected_state(writes), actual)
    daemon.stop()
    integrity = check_data_dir(daemon.data_dir)
    figures = {
        "kills_survived": kills,
        "writes_checked": len(writes),
        "retries_while_down": interrupted,
        "writes_lost": len(lost),
        "entries_stored": len(actual),
        "entries_in_lmdb": integrity.entries,
        "integrity_problems": len(integrity.problems),
    }
    return figures, lost, integrity.problems


def test_sigkills_keep_store_consistent(daemon, writers, figures):  # noqa: F811 - the fixture
    result, lost, problems = kill_repeatedly(daemon, writers, QUICK_KILLS)
    figures(**result)
    assert lost == []
    assert problems == []
    assert result["entries_in_lmdb"] == result["entries_stored"]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_hundred_sigkills_keep_every_write(daemon, writers, figures):  # noqa: F811 - the fixture
    result, lost, problems = kill_repeatedly(daemon, writers, KILLS)
    figures(**result)
    assert lost == []
    assert problems == []
    assert result["retries_while_down"] > 0
    assert result["entries_in_lmdb"] == result["entries_stored"]
