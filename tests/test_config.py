"""Settings built in code are checked as strictly as those read from the environment."""

from __future__ import annotations

import pytest

from sharedict import InvalidError
from sharedict.api.config import Settings

PATHS = {"socket_path": "/tmp/sharedict-test.sock", "data_dir": "/tmp/sharedict-test-data"}


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan")])
def test_invalid_sweep_interval_rejected(value):
    with pytest.raises(InvalidError) as caught:
        Settings(**PATHS, sweep_interval=value)
    assert f"Settings(sweep_interval={value!r}) is invalid" in str(caught.value)
    assert "set it to a positive number of seconds, such as 60" in str(caught.value)


@pytest.mark.parametrize("value", [-1, float("inf"), float("nan"), None])
def test_invalid_expire_after_rejected(value):
    with pytest.raises(InvalidError) as caught:
        Settings(**PATHS, expire_after=value)
    assert f"Settings(expire_after={value!r}) is invalid" in str(caught.value)
    assert "or 0 to turn expiry off" in str(caught.value)


def test_zero_expire_after_accepted():
    assert Settings(**PATHS, expire_after=0).expire_after == 0


def test_defaults_accepted():
    settings = Settings(**PATHS)
    assert settings.sweep_interval == 60.0


@pytest.mark.parametrize("value", ["5", True, b"5", 10**400])
def test_non_number_sweep_interval_rejected(value):
    with pytest.raises(InvalidError) as caught:
        Settings(**PATHS, sweep_interval=value)
    assert "Settings(sweep_interval=" in str(caught.value)


def test_int_expire_after_stored_as_float():
    # The daemon that a client starts parses repr() of the value.
    assert repr(Settings(**PATHS, expire_after=60).expire_after) == "60.0"
