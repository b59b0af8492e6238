"""Turning a Dict call's keys and values into request bytes and back, with the limits.

Every check runs before anything is sent, so a call that fails here stores nothing.
Messages name the dict and say whether the key or the value was at fault.
"""

from __future__ import annotations

import contextvars
import re
from typing import Any

from sharedict.api import protocol
from sharedict.api.errors import DeserializationError, Error, InvalidError, RequestSizeError, SerializationError
from sharedict.api.serialization import KeyTooDeep, decode_key, dump_value, encode_key, load_value

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
DEFAULT_ENVIRONMENT = "main"

# True while a Dict operation encodes its keys and values. A handle inside them that has
# not looked its dict up yet raises ``LookupNeeded`` instead of making a blocking call, and
# the operation does the lookup through its own driver. So storing such a handle through
# ``.aio`` does not block the event loop.
encoding_in_operation: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sharedict_encoding_in_operation", default=False
)


class LookupNeeded(Exception):
    """A handle inside a key or value must look its dict up before it can be pickled."""

    def __init__(self, handle: Any) -> None:
        super().__init__(handle)
        self.handle = handle


# Bytes of framing per entry and per request, beyond the keys and values themselves.
_ENTRY_OVERHEAD = 16
_REQUEST_OVERHEAD = 64


def check_name(name: Any, what: str = "dict name") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidError(
            f"invalid {what} {name!r}: use 1 to 64 characters of ASCII letters, digits, '-', '_' and '.'"
        )
    return name


def check_environment(environment_name: str | None) -> str:
    if environment_name is None:
        return DEFAULT_ENVIRONMENT
    return check_name(environment_name, "environment name")


def _mib(size: int) -> str:
    # The byte count shows the excess that rounding to MiB hides, as in "100.0 MiB".
    return f"{size / protocol.MiB:.1f} MiB ({size} bytes)"


def _short_repr(obj: Any, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_request_key(key: Any, dict_label: str) -> tuple[bytes, bytes | None]:
    """Encode a key for a request; raises ``TypeError``, ``SerializationError`` or ``RequestSizeError``."""
    if type(key) is not str:
        try:
            hash(key)
        except TypeError as exc:
            raise TypeError(
                f"unhashable key of type {type(key).__name__} for {dict_label}: keys must be hashable, "
                "as in a Python dict; use a tuple instead of a list, or a frozenset instead of a set"
            ) from exc
    try:
        match_key, stored_key = encode_key(key)
    except (Error, LookupNeeded):
        raise  # from a Dict handle inside the key: a failed lookup, or one the operation must do
    except KeyTooDeep as exc:
        raise SerializationError(
            f"cannot encode a key of type {type(key).__name__} for {dict_label}: {exc}; "
            "use a flatter key, such as a string or a hash of this one"
        ) from None
    except Exception as exc:
        raise SerializationError(
            f"cannot pickle a key of type {type(key).__name__} for {dict_label}: {type(exc).__name__}: {exc}; "
            "use a key of plain types such as str, int or a tuple of those"
        ) from exc
    size = max(len(match_key), len(stored_key or b""))
    if size > protocol.MAX_OBJECT_SIZE:
        raise RequestSizeError(
            f"key of {_mib(size)} exceeds the {protocol.MAX_OBJECT_SIZE // protocol.MiB} MiB limit for "
            f"{dict_label}; use a smaller key, such as a hash of this one"
        )
    return match_key, stored_key


def encode_request_value(key: Any, value: Any, dict_label: str) -> bytes:
    """Pickle a value for a request, raising ``SerializationError`` or ``RequestSizeError``."""
    try:
        data = dump_value(value)
    except (Error, LookupNeeded):
        raise  # from a Dict handle inside the value: a failed lookup, or one the operation must do
    except Exception as exc:
        raise SerializationError(
            f"cannot pickle the value of type {type(value).__name__} for key {_short_repr(key)} in {dict_label}: "
            f"{type(exc).__name__}: {exc}; store objects that cloudpickle can pickle, such as the plain data "
            "this object contains"
        ) from exc
    if len(data) > protocol.MAX_OBJECT_SIZE:
        raise RequestSizeError(
            f"value of {_mib(len(data))} for key {_short_repr(key)} exceeds the "
            f"{protocol.MAX_OBJECT_SIZE // protocol.MiB} MiB limit for {dict_label}; "
            "store large objects in files and keep their paths in the dict"
        )
    return data


def encode_update(items: list[tuple[Any, Any]], dict_label: str) -> list[list[bytes | None]]:
    """Encode the entries of an ``update()``; all are checked before any is sent."""
    if len(items) > protocol.MAX_UPDATE_ENTRIES:
        raise RequestSizeError(
            f"update of {len(items)} entries exceeds the limit of {protocol.MAX_UPDATE_ENTRIES} entries for "
            f"{dict_label}; split it into several update() calls"
        )
    entries: list[list[bytes | None]] = []
    total = _REQUEST_OVERHEAD
    for key, value in items:
        match_key, stored_key = encode_request_key(key, dict_label)
        data = encode_request_value(key, value, dict_label)
        entries.append([match_key, stored_key, data])
        total += len(match_key) + len(stored_key or b"") + len(data) + _ENTRY_OVERHEAD
    if total > protocol.MAX_FRAME_SIZE:
        raise RequestSizeError(
            f"update of {_mib(total)} exceeds the {protocol.MAX_FRAME_SIZE // protocol.MiB} MiB limit of one "
            f"request for {dict_label}; split it into several update() calls"
        )
    return entries


def decode_stored_key(data: bytes, dict_label: str) -> Any:
    try:
        return decode_key(data)
    except DeserializationError:
        raise
    except Exception as exc:
        raise DeserializationError(f"cannot unpickle a key of {dict_label}: {_cause(exc)}") from exc


def decode_value(data: bytes, key: Any, dict_label: str) -> Any:
    try:
        return load_value(data)
    except Exception as exc:
        raise DeserializationError(
            f"cannot unpickle the value of key {_short_repr(key)} in {dict_label}: {_cause(exc)}"
        ) from exc


def _cause(exc: Exception) -> str:
    if isinstance(exc, ModuleNotFoundError):
        return f"module {exc.name!r} cannot be imported in this process; install it, or add its directory to sys.path"
    if isinstance(exc, AttributeError):
        return (
            f"{exc}; the class or function that the value refers to is missing here, so run the same "
            "version of the code that stored it"
        )
    return f"{type(exc).__name__}: {exc}"
