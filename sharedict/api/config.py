"""Settings shared by the client and the daemon, read from the environment.

| setting        | variable                   | default                                          |
| -------------- | -------------------------- | ------------------------------------------------ |
| socket_path    | ``SHAREDICT_SOCKET``       | ``$XDG_RUNTIME_DIR/sharedict/sharedict.sock``,    |
|                |                            | else ``/tmp/sharedict-<uid>/sharedict.sock``      |
| data_dir       | ``SHAREDICT_DATA_DIR``     | ``$XDG_DATA_HOME/sharedict``, else               |
|                |                            | ``~/.local/share/sharedict``                     |
| expire_after   | ``SHAREDICT_EXPIRE_AFTER`` | 604800 seconds (7 days); 0 disables expiry       |
| sweep_interval | ``SHAREDICT_SWEEP_INTERVAL`` | 60 seconds                                     |
| autostart      | ``SHAREDICT_AUTOSTART``    | 1; 0 makes a client fail when no daemon answers  |
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from sharedict.api.errors import InvalidError

DEFAULT_EXPIRE_AFTER = 7 * 24 * 3600.0
DEFAULT_SWEEP_INTERVAL = 60.0


def default_socket_path(environ: Mapping[str, str] = os.environ) -> str:
    runtime_dir = environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return os.path.join(runtime_dir, "sharedict", "sharedict.sock")
    return os.path.join("/tmp", f"sharedict-{os.getuid()}", "sharedict.sock")


def default_data_dir(environ: Mapping[str, str] = os.environ) -> str:
    data_home = environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data_home, "sharedict")


def _seconds(environ: Mapping[str, str], variable: str, default: float) -> float:
    raw = environ.get(variable)
    if raw is None or raw == "":
        return default
    try:
        seconds = float(raw)
    except ValueError:
        raise InvalidError(f"{variable}={raw!r} is not a number of seconds; set it to a number such as 3600") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidError(f"{variable}={raw!r} is invalid; set it to zero or a finite positive number of seconds")
    return seconds


@dataclass(frozen=True)
class Settings:
    """Where the daemon listens and keeps its data, and how it expires entries."""

    socket_path: str
    data_dir: str
    expire_after: float = DEFAULT_EXPIRE_AFTER
    sweep_interval: float = DEFAULT_SWEEP_INTERVAL
    autostart: bool = True

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        autostart = environ.get("SHAREDICT_AUTOSTART", "1").strip().lower()
        if autostart not in ("0", "1", "true", "false", "yes", "no", ""):
            raise InvalidError(f"SHAREDICT_AUTOSTART={autostart!r} is invalid; set it to 1 or 0")
        return cls(
            socket_path=os.path.abspath(environ.get("SHAREDICT_SOCKET") or default_socket_path(environ)),
            data_dir=os.path.abspath(environ.get("SHAREDICT_DATA_DIR") or default_data_dir(environ)),
            expire_after=_seconds(environ, "SHAREDICT_EXPIRE_AFTER", DEFAULT_EXPIRE_AFTER),
            sweep_interval=_seconds(environ, "SHAREDICT_SWEEP_INTERVAL", DEFAULT_SWEEP_INTERVAL),
            autostart=autostart not in ("0", "false", "no"),
        )
