"""Turning a Dict call's keys and values into request bytes and back, with the limits.

Every check runs before anything is sent, so a call that fails here stores nothing.
Messages name the dict and say whether the key or the value was at fault.
"""

from __future__ import annotations

import contextvars
import pickle
import re
from collections.abc import Iterator
from typing import Any

from sharedict.api import protocol
from sharedict.api.errors import DeserializationError, Error, InvalidError, RequestSizeError, SerializationError
from sharedict.api.serialization import (
    PICKLE_PROTOCOL,
    PLAIN_VALUE_TYPES,
    TAG_STR,
    KeyTooDeep,
    decode_key,
    dump_value,
    encode_key,
    load_value,
)

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


def _limit(limit: int) -> str:
    # Sizes in messages are given in bytes, which MiB would round to the limit; the
    # limit is given in both.
    return f"{limit // protocol.MiB} MiB ({limit:,} bytes)"


def _short_repr(obj: Any, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_request_key(key: Any, dict_label: str) -> tuple[bytes, bytes | None]:
    """Encode a key for a request; raises ``TypeError``, ``SerializationError`` or ``RequestSizeError``."""
    if type(key) is str:
        # The common case, encoded here as encode_key() encodes it. A gathered get.aio
        # costs the client about 6 µs, so two function calls fewer are worth it.
        match_key = TAG_STR + key.encode("utf-8", "surrogatepass")
        if len(match_key) > protocol.MAX_OBJECT_SIZE:
            _check_key_size(match_key, None, dict_label)
        return match_key, None
    try:
        hash(key)
    except TypeError as exc:
        # The message names the key and Python's reason, since a tuple is unhashable
        # only because of an item, which the reason names.
        raise TypeError(
            f"unhashable key {_short_repr(key)} for {dict_label} ({exc}): keys must be hashable, "
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
    _check_key_size(match_key, stored_key, dict_label)
    return match_key, stored_key


def _check_key_size(match_key: bytes, stored_key: bytes | None, dict_label: str) -> None:
    size = max(len(match_key), len(stored_key or b""))
    if size > protocol.MAX_OBJECT_SIZE:
        raise RequestSizeError(
            f"key of {size:,} bytes exceeds the {_limit(protocol.MAX_OBJECT_SIZE)} limit for "
            f"{dict_label}; use a smaller key, such as a hash of this one"
        )


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
    _check_value_size(key, data, dict_label)
    return data


def _check_value_size(key: Any, data: bytes, dict_label: str) -> None:
    if len(data) > protocol.MAX_OBJECT_SIZE:
        raise RequestSizeError(
            f"value of {len(data):,} bytes for key {_short_repr(key)} exceeds the "
            f"{_limit(protocol.MAX_OBJECT_SIZE)} limit for {dict_label}; "
            "store large objects in files and keep their paths in the dict"
        )


def encode_update(items: list[tuple[Any, Any]], dict_label: str) -> list[tuple[bytes, bytes | None, bytes]]:
    """Encode the entries of an ``update()``; all are checked before any is sent."""
    if len(items) > protocol.MAX_UPDATE_ENTRIES:
        raise RequestSizeError(
            f"update of {len(items)} entries exceeds the limit of {protocol.MAX_UPDATE_ENTRIES} entries for "
            f"{dict_label}; split it into several update() calls"
        )
    entries: list[tuple[bytes, bytes | None, bytes]] = []
    total = _REQUEST_OVERHEAD + _ENTRY_OVERHEAD * len(items)
    for key, value in items:
        if type(key) is str and type(value) in PLAIN_VALUE_TYPES:
            # The bytes that encode_key() and dump_value() return for these types, built
            # here because the two calls took about a sixth of the encoding time of a
            # large update (measured on a 2-core VM). Neither can fail, no Dict handle can
            # hide in them, and the sizes are checked below.
            match_key = TAG_STR + key.encode("utf-8", "surrogatepass")
            data = pickle.dumps(value, PICKLE_PROTOCOL)
            entries.append((match_key, None, data))
            total += len(match_key) + len(data)
            continue

        match_key, stored_key = encode_request_key(key, dict_label)
        data = encode_request_value(key, value, dict_label)
        entries.append((match_key, stored_key, data))
        total += len(match_key) + len(data) + (len(stored_key) if stored_key is not None else 0)

    # No key or value can exceed its limit while all of them together stay within it.
    if total > protocol.MAX_OBJECT_SIZE:
        for (key, _), (match_key, stored_key, data) in zip(items, entries):
            _check_key_size(match_key, stored_key, dict_label)
            _check_value_size(key, data, dict_label)
    if total > protocol.MAX_FRAME_SIZE:
        raise RequestSizeError(
            f"update of {total:,} bytes exceeds the {_limit(protocol.MAX_FRAME_SIZE)} limit of one request "
            f"for {dict_label}; split it into several update() calls"
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
        raise _value_error(exc, key, dict_label) from exc


def _value_error(exc: Exception, key: Any, dict_label: str) -> DeserializationError:
    return DeserializationError(f"cannot unpickle the value of key {_short_repr(key)} in {dict_label}: {_cause(exc)}")


# Decoding a page of entries, as ``scan`` returns them: [sequence number, stored key,
# value]. Each is a generator, so an entry that fails to decode raises only when the
# caller reaches it, after the entries before it.


def decode_keys(entries: list[list[Any]], dict_label: str) -> Iterator[Any]:
    for _, key_data, _ in entries:
        yield decode_stored_key(key_data, dict_label)


def decode_values(entries: list[list[Any]], dict_label: str) -> Iterator[Any]:
    for _, key_data, value_data in entries:
        try:
            value = load_value(value_data)
        except Exception as exc:
            # The key only names the entry, so a key that cannot be unpickled here must not
            # hide why the value failed.
            try:
                key = decode_stored_key(key_data, dict_label)
            except DeserializationError:
                key = _UNREADABLE_KEY
            raise _value_error(exc, key, dict_label) from exc
        yield value


def decode_items(entries: list[list[Any]], dict_label: str) -> Iterator[tuple[Any, Any]]:
    for _, key_data, value_data in entries:
        key = decode_stored_key(key_data, dict_label)
        try:
            value = load_value(value_data)
        except Exception as exc:
            raise _value_error(exc, key, dict_label) from exc
        yield key, value


class _UnreadableKey:
    def __repr__(self) -> str:
        return "<a key that cannot be unpickled here>"


_UNREADABLE_KEY = _UnreadableKey()


def _cause(exc: Exception) -> str:
    if isinstance(exc, ModuleNotFoundError):
        return f"module {exc.name!r} cannot be imported in this process; install it, or add its directory to sys.path"
    if isinstance(exc, AttributeError):
        return (
            f"{exc}; the class or function that the value refers to is missing here, so run the same "
            "version of the code that stored it"
        )
    return f"{type(exc).__name__}: {exc}"
