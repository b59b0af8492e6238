"""Expiry against a real daemon, started with ``--expire-after 2 --sweep-interval 0.2``.

An entry expires between 2 and 2.02 s after its last activity. Waiting is real here,
so each test sleeps only until a known deadline, or polls for a condition.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import pytest

from sharedict import Dict, InvalidError
from sharedict.api import protocol
from sharedict.api.cli import main
from sharedict.api.config import Settings
from sharedict.api.transport import Client, Request

EXPIRE_AFTER = 2.0
LIFETIME = EXPIRE_AFTER * 1.01  # the maximum time an untouched entry stays visible
WAIT_TIMEOUT = 20.0

EXPIRY_ARGS = ["--expire-after", "2", "--sweep-interval", "0.2"]
# Sweeps every hour, so that expired entries stay stored for the whole test.
UNSWEPT_ARGS = ["--expire-after", "2", "--sweep-interval", "3600"]


@pytest.fixture
def daemon_args() -> list[str]:
    return EXPIRY_ARGS


def wait_for(condition: Callable[[], bool], description: str, timeout: float = WAIT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {description}")
        time.sleep(0.05)


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def status(daemon) -> dict:
    return daemon.client().call(Request(protocol.STATUS))


def stored_keys(kv: Dict) -> set:
    """Return the keys; listing keys is not activity, so it leaves expiry unchanged."""
    return set(kv.keys())


# Activity keeps an entry, inactivity ends it.


def test_entry_read_every_half_second_survives(daemon):
    kv = Dict.from_name("kv", create_if_missing=True)
    kv.update(hot="value", cold="value")

    for _ in range(8):
        time.sleep(0.5)
        assert kv["hot"] == "value"

    assert stored_keys(kv) == {"hot"}


def test_expired_entry_invisible(daemon):
    kv = Dict.from_name("kv", create_if_missing=True)
    kv["k"] = "old"
    time.sleep(LIFETIME)

    assert kv.get("k") is None
    assert "k" not in kv
    assert len(kv) == 0
    assert list(kv.keys()) == []
    assert list(kv.items()) == []
    assert kv.put("k", "new", skip_if_exists=True) is True
    assert kv["k"] == "new"


@pytest.mark.parametrize("daemon_args", [UNSWEPT_ARGS])
def test_expired_entry_invisible_before_sweep(daemon, capsys):
    kv = Dict.from_name("kv", create_if_missing=True)
    kv["k"] = "old"
    time.sleep(LIFETIME)

    # The status counts stored entries, expired or not, so it shows the entry unswept.
    assert status(daemon)["entries"] == 1
    assert kv.get("k") is None
    assert "k" not in kv
    assert len(kv) == 0
    assert list(kv.keys()) == []
    assert list(kv.values()) == []
    assert main(["get", "kv", "k"]) == 1
    assert main(["items", "kv", "--json"]) == 0
    assert "old" not in capsys.readouterr().out
    assert kv.put("k", "new", skip_if_exists=True) is True
    assert kv["k"] == "new"


def test_keys_and_len_do_not_keep_entry(daemon):
    kv = Dict.from_name("kv", create_if_missing=True)
    kv["k"] = "value"
    written_after = time.time()
    for _ in range(3):
        time.sleep(0.5)
        list(kv.keys())
        len(kv)
    sleep_until(written_after + LIFETIME)

    assert "k" not in kv


# Restarts keep the last access.


@pytest.mark.parametrize("daemon_args", [["--expire-after", "8", "--sweep-interval", "0.2"]])
def test_restart_keeps_last_access(daemon):
    kv = Dict.from_name("kv", create_if_missing=True)
    written_before = time.time()
    kv.update(old="value", recent="value")
    time.sleep(4)
    assert kv["recent"] == "value"
    # The writer commits in order, so once this write is durable the read's access is too.
    kv["barrier"] = "value"

    daemon.restart(crash=True)
    assert stored_keys(kv) == {"old", "recent", "barrier"}

    wait_for(lambda: "old" not in stored_keys(kv), "the old entry to expire")
    assert time.time() >= written_before + 8
    assert "recent" in stored_keys(kv)


# Status and log.


def test_status_reports_expire_after(daemon):
    info = status(daemon)
    assert info["expire_after"] == 2.0
    assert info["sweep_interval"] == 0.2


def test_status_reports_sweeps(daemon, capsys):
    kv = Dict.from_name("kv", create_if_missing=True)
    kv.update(a=1, b=2, c=3)
    expired_at = time.time() + LIFETIME
    wait_for(lambda: status(daemon)["swept_entries"] == 3, "the sweep of 3 entries")
    wait_for(lambda: status(daemon)["last_sweep_at"] >= expired_at, "the end of that sweep")
    capsys.readouterr()

    assert main(["status", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["expire_after"] == 2.0
    assert info["swept_entries"] == 3
    assert info["last_sweep_at"] >= expired_at

    assert main(["status"]) == 0
    rows = dict(line.split("  ", 1) for line in capsys.readouterr().out.splitlines())
    assert rows["expire after"].strip() == "2 s"
    assert rows["swept entries"].strip() == "3"
    assert rows["last sweep"].strip() != "not yet"

    wait_for(lambda: "sweep removed 3 expired entries" in daemon.log(), "the sweep's log line")


# Settings from the environment.


class TestServeEnvironment:
    @pytest.fixture
    def daemon_args(self, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        # The daemon fixture starts the daemon after this, so it inherits these variables.
        monkeypatch.setenv("SHAREDICT_EXPIRE_AFTER", "3")
        monkeypatch.setenv("SHAREDICT_SWEEP_INTERVAL", "0.5")
        return []

    def test_serve_reads_expiry_environment(self, daemon):
        info = status(daemon)
        assert info["expire_after"] == 3.0
        assert info["sweep_interval"] == 0.5


def test_autostart_passes_expiry_environment(tmp_path):
    socket_dir = tempfile.mkdtemp(prefix="sd-", dir="/tmp")
    environ = {
        "SHAREDICT_SOCKET": os.path.join(socket_dir, "sharedict.sock"),
        "SHAREDICT_DATA_DIR": str(tmp_path / "data"),
        "SHAREDICT_AUTOSTART": "1",
        "SHAREDICT_EXPIRE_AFTER": "3",
        "SHAREDICT_SWEEP_INTERVAL": "0.5",
    }
    client = Client(Settings.from_environ(environ))
    try:
        info = client.call(Request(protocol.STATUS))
    finally:
        if client.daemon_is_up():
            pid = client.call(Request(protocol.STATUS))["pid"]
            client.call(Request(protocol.SHUTDOWN))
            wait_for(lambda: not _process_exists(pid), "the auto-started daemon to stop")
        client.close()
        shutil.rmtree(socket_dir, ignore_errors=True)
    assert info["expire_after"] == 3.0
    assert info["sweep_interval"] == 0.5


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_invalid_expire_after_environment_rejected(tmp_path, value):
    environ = {"SHAREDICT_EXPIRE_AFTER": value, "SHAREDICT_DATA_DIR": str(tmp_path)}
    with pytest.raises(InvalidError, match="SHAREDICT_EXPIRE_AFTER"):
        Settings.from_environ(environ)
