"""The daemon that owns a data directory's store and serves it on a Unix socket."""

from sharedict.daemon.security import AlreadyRunning, SetupError
from sharedict.daemon.server import Server

__all__ = ["AlreadyRunning", "Server", "SetupError"]
