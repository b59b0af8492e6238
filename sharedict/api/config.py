"""Settings shared by the client and the daemon, read from the environment.

| setting        | variable                   | default                                          |
| -------------- | -------------------------- | ------------------------------------------------ |
| socket_path    | ``SHAREDICT_SOCKET``       | ``$XDG_RUNTIME_DIR/sharedict/sharedict.sock``,    |
|                |                            | else ``/tmp/sharedict-<uid>/sharedict.sock``      |
| data_dir       | ``SHAREDICT_DATA_DIR``     | ``$XDG_DATA_HOME/sharedict``, else               |
|                |                            | ``~/.local/share/sharedict``                     |
| expire_after   | ``SHAREDICT_EXPIRE_AFTER`` | 604800 seconds (7 days); 0 disables expiry       |
| sweep_interval | ``SHAREDICT_SWEEP_INTERVAL`` | 60 seconds; must be more than 0                |
| autostart      | ``SHAREDICT_AUTOSTART``    | 1; 0 makes a client fail when no daemon answers  |

``SHAREDICT_AUTOSTART`` takes 1, true, yes or on, and 0, false, no or off, in upper or
lower case; empty means the default. An invalid value of any variable raises
``InvalidError`` when the settings are read, before anything is started.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass

from sharedict.api.errors import InvalidError

DEFAULT_EXPIRE_AFTER = 7 * 24 * 3600.0
DEFAULT_SWEEP_INTERVAL = 60.0

# The values each setting accepts, worded to follow "set it to" or "pass".
EXPIRE_AFTER_VALUES = "a positive number of seconds, such as 604800 (7 days), or 0 to turn expiry off"
SWEEP_INTERVAL_VALUES = "a positive number of seconds, such as 60"

AUTOSTART_ON = ("1", "true", "yes", "on")
AUTOSTART_OFF = ("0", "false", "no", "off")

# Longest path that fits ``sockaddr_un.sun_path`` on Linux, which has 108 bytes with the
# terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


def default_socket_path(environ: Mapping[str, str] = os.environ) -> str:
    runtime_dir = environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return os.path.join(runtime_dir, "sharedict", "sharedict.sock")
    return os.path.join("/tmp", f"sharedict-{os.getuid()}", "sharedict.sock")


def socket_path_from_environ(environ: Mapping[str, str] = os.environ) -> str:
    """Return the socket path that ``SHAREDICT_SOCKET``, or its default, selects."""
    return os.path.abspath(environ.get("SHAREDICT_SOCKET") or default_socket_path(environ))


def default_data_dir(environ: Mapping[str, str] = os.environ) -> str:
    data_home = environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data_home, "sharedict")


def check_socket_path(socket_path: str) -> None:
    """Raise ``InvalidError`` when ``socket_path`` is too long to bind or connect a Unix socket."""
    length = len(os.fsencode(socket_path))
    if length > MAX_SOCKET_PATH_BYTES:
        raise InvalidError(
            f"socket path {socket_path} is {length} bytes long, over the limit of {MAX_SOCKET_PATH_BYTES} bytes "
            "for Unix sockets; set SHAREDICT_SOCKET (or --socket) to a shorter path"
        )


def parse_seconds(raw: str | float, *, zero_allowed: bool) -> float:
    """Parse a finite, positive number of seconds; ``zero_allowed`` also accepts 0.

    Raises ``ValueError`` for any other text, such as ``inf``, ``nan`` or ``-1``.
    """
    seconds = float(raw)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero_allowed):
        raise ValueError(f"{raw!r} is out of range")
    return seconds


def _seconds(environ: Mapping[str, str], variable: str, default: float, *, zero_allowed: bool, values: str) -> float:
    raw = environ.get(variable)
    if raw is None or raw == "":
        return default
    try:
        return parse_seconds(raw, zero_allowed=zero_allowed)
    except ValueError:
        raise InvalidError(f"{variable}={raw!r} is invalid; set it to {values}") from None


def _autostart(environ: Mapping[str, str]) -> bool:
    raw = environ.get("SHAREDICT_AUTOSTART", "")
    value = raw.strip().lower()
    if value == "" or value in AUTOSTART_ON:
        return True
    if value in AUTOSTART_OFF:
        return False
    raise InvalidError(
        f"SHAREDICT_AUTOSTART={raw!r} is invalid; set it to {_one_of(AUTOSTART_ON)} to let clients start a "
        f"daemon, or to {_one_of(AUTOSTART_OFF)} to make them fail when none runs; letter case does not matter"
    )


def _one_of(values: tuple[str, ...]) -> str:
    return f"{', '.join(values[:-1])} or {values[-1]}"


@dataclass(frozen=True)
class Settings:
    """Where the daemon listens and keeps its data, and how it expires entries."""

    socket_path: str
    data_dir: str
    expire_after: float = DEFAULT_EXPIRE_AFTER
    sweep_interval: float = DEFAULT_SWEEP_INTERVAL
    autostart: bool = True

    def __post_init__(self) -> None:
        # An autostarted daemon gets these values, so a bad one fails here, in the caller.
        for field, value, zero_allowed, values in (
            ("expire_after", self.expire_after, True, EXPIRE_AFTER_VALUES),
            ("sweep_interval", self.sweep_interval, False, SWEEP_INTERVAL_VALUES),
        ):
            # Text, bools and Decimals pass float(), but the daemon parses repr() of the value.
            try:
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise TypeError(type(value).__name__)
                seconds = parse_seconds(value, zero_allowed=zero_allowed)
            except (TypeError, ValueError, OverflowError):
                raise InvalidError(f"Settings({field}={value!r}) is invalid; set it to {values}") from None
            # Stored as a float, whose repr() the daemon parses. The dataclass is frozen.
            object.__setattr__(self, field, seconds)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read the settings from ``environ``; raise ``InvalidError`` naming any invalid variable."""
        return cls(
            socket_path=socket_path_from_environ(environ),
            data_dir=os.path.abspath(environ.get("SHAREDICT_DATA_DIR") or default_data_dir(environ)),
            expire_after=_seconds(
                environ, "SHAREDICT_EXPIRE_AFTER", DEFAULT_EXPIRE_AFTER, zero_allowed=True, values=EXPIRE_AFTER_VALUES
            ),
            sweep_interval=_seconds(
                environ,
                "SHAREDICT_SWEEP_INTERVAL",
                DEFAULT_SWEEP_INTERVAL,
                zero_allowed=False,
                values=SWEEP_INTERVAL_VALUES,
            ),
            autostart=_autostart(environ),
        )
