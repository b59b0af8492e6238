"""The user's side of sharedict: ``Dict``, ``Lock``, their errors, and the transport to the daemon."""

from sharedict.api.config import Settings
from sharedict.api.dict import Dict, DictInfo
from sharedict.api.errors import (
    AlreadyExistsError,
    AsyncUsageWarning,
    ConnectionLostError,
    DaemonUnavailableError,
    DeserializationError,
    Error,
    InternalError,
    InvalidError,
    LockNotOwnedError,
    LockTimeoutError,
    NotFoundError,
    ProtocolError,
    RequestSizeError,
    SerializationError,
    StorageFullError,
)
from sharedict.api.lock import Lock
from sharedict.api.manager import DictManager
from sharedict.api.transport import Client

__all__ = [
    "AlreadyExistsError",
    "AsyncUsageWarning",
    "Client",
    "ConnectionLostError",
    "DaemonUnavailableError",
    "DeserializationError",
    "Dict",
    "DictInfo",
    "DictManager",
    "Error",
    "InternalError",
    "InvalidError",
    "Lock",
    "LockNotOwnedError",
    "LockTimeoutError",
    "NotFoundError",
    "ProtocolError",
    "RequestSizeError",
    "SerializationError",
    "Settings",
    "StorageFullError",
]
