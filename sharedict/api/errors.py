"""Exceptions raised by sharedict, and the table that maps daemon error codes to them.

Every exception has ``sharedict.Error`` as its root, with Modal's names where Modal has
one. A missing key raises the builtin ``KeyError``, as a Python ``dict`` does.
"""

from __future__ import annotations


class Error(Exception):
    """Base class of every exception that sharedict raises."""


class NotFoundError(Error):
    """A dict, or another named object, does not exist (any longer)."""


class AlreadyExistsError(Error):
    """A dict with this name exists already."""


class InvalidError(Error):
    """An argument is invalid: a bad name, a negative count, a wrong type of option."""


class RequestSizeError(Error):
    """A key, a value or a whole request exceeds sharedict's size limits."""


class SerializationError(Error):
    """A key or value could not be pickled, so nothing was sent or stored."""


class DeserializationError(Error):
    """A stored key or value could not be unpickled in this process."""


class StorageFullError(Error):
    """The daemon could not store a write: its disk or memory map is full."""


class DaemonUnavailableError(Error):
    """No daemon answers on the socket and none could be started."""


class ConnectionLostError(Error):
    """The connection to the daemon broke after a write was sent and before its reply.

    The write may or may not have been applied: sharedict never retries it, so that no
    write is applied twice. Read the entry to find out.
    """


class ProtocolError(Error):
    """The daemon and the client do not speak the same protocol, or a frame is malformed."""


class InternalError(Error):
    """The daemon failed while handling a request; its log has the details."""


class LockTimeoutError(Error, TimeoutError):
    """A lock could not be acquired before its timeout ran out."""


class LockNotOwnedError(Error):
    """The lock is not held by this owner: it was released, or its lease ran out."""


class AsyncUsageWarning(UserWarning):
    """A blocking sharedict call was made inside a running event loop."""


# Tracebacks name each class by the module that users import it from, sharedict, as in
# sharedict.NotFoundError. Pickle finds the classes there too.
for _public in (
    Error,
    NotFoundError,
    AlreadyExistsError,
    InvalidError,
    RequestSizeError,
    SerializationError,
    DeserializationError,
    StorageFullError,
    DaemonUnavailableError,
    ConnectionLostError,
    ProtocolError,
    InternalError,
    LockTimeoutError,
    LockNotOwnedError,
    AsyncUsageWarning,
):
    _public.__module__ = "sharedict"
del _public

# Error codes on the wire. The daemon sends the code and a message; the client raises the
# class from this table. Codes are stable: never renumber one, only add new ones.
ERROR_CODES: dict[int, type[Exception]] = {
    1: InternalError,
    2: ProtocolError,
    3: InvalidError,
    4: NotFoundError,
    5: AlreadyExistsError,
    6: RequestSizeError,
    7: KeyError,
    8: LockNotOwnedError,
    9: LockTimeoutError,
    10: StorageFullError,
}

CODE_BY_ERROR: dict[type[Exception], int] = {cls: code for code, cls in ERROR_CODES.items()}


def error_from_code(code: int, message: str) -> Exception:
    """Build the exception for an error reply of the daemon."""
    cls = ERROR_CODES.get(code, InternalError)
    return cls(message)
