"""sharedict: a local, persistent key-value store with the API of Modal's ``modal.Dict``."""

__version__ = "0.1.0"

from sharedict.api import (  # noqa: E402 - the version must exist before the daemon imports it
    AlreadyExistsError,
    AsyncUsageWarning,
    Client,
    ConnectionLostError,
    DaemonUnavailableError,
    DeserializationError,
    Dict,
    DictInfo,
    Error,
    InternalError,
    InvalidError,
    Lock,
    LockNotOwnedError,
    LockTimeoutError,
    NotFoundError,
    ProtocolError,
    RequestSizeError,
    SerializationError,
    StorageFullError,
)

__all__ = [
    "AlreadyExistsError",
    "AsyncUsageWarning",
    "Client",
    "ConnectionLostError",
    "DaemonUnavailableError",
    "DeserializationError",
    "Dict",
    "DictInfo",
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
    "StorageFullError",
    "__version__",
]
