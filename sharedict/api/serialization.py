"""Keys and values as bytes: the canonical key encoding, and cloudpickle for values.

Keys of type ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, and tuples and
frozensets of those get a canonical encoding in which keys that are equal under ``==``
have the same bytes in every process: ``1``, ``1.0`` and ``True`` are one key, and a
frozenset is encoded in sorted order whatever the hash seed. This is the *match key*.

Because ``1.0`` and ``True`` must come back from ``keys()`` as the objects first stored,
a key whose exact types differ from its canonical form also gets a *stored key*, an
encoding that keeps the types; for plain strings, ints and bytes the two are the same
and only the match key travels. Keys of any other hashable type are pickled, and match
by their pickled bytes. Inside a tuple or frozenset each such item is pickled on its
own, so that pickle's memo of shared objects never spans two items, and a frozenset of
such items is sorted by their bytes, whatever the hash seed.
"""

from __future__ import annotations

import math
import pickle
import struct
from typing import Any

import cloudpickle

from sharedict.api.errors import DeserializationError

PICKLE_PROTOCOL = 5

TAG_NONE = b"N"
TAG_FALSE = b"0"
TAG_TRUE = b"1"
TAG_INT = b"I"
TAG_FLOAT = b"F"
TAG_STR = b"S"
TAG_BYTES = b"Y"
TAG_TUPLE = b"T"
TAG_FROZENSET = b"Z"
TAG_PICKLE = b"P"

_LENGTH = struct.Struct(">I")
_DOUBLE = struct.Struct(">d")
_CANONICAL_NAN = _DOUBLE.pack(math.nan)

# Values of these exact types pickle the same with the standard pickler, which is several
# times faster than cloudpickle for small objects.
PLAIN_VALUE_TYPES = frozenset({str, bytes, int, float, bool, type(None)})

MAX_KEY_DEPTH = 100
"""Most levels of tuples and frozensets nested inside one another in a key.

Encoding and decoding recurse once per level, so a limit well below Python's recursion
limit lets every key that was stored be read back, even from a deep call stack.
"""


class KeyTooDeep(ValueError):
    """A key nests tuples or frozensets more than ``MAX_KEY_DEPTH`` levels deep."""


def _int_bytes(number: int) -> bytes:
    return TAG_INT + number.to_bytes((number.bit_length() + 8) // 8, "big", signed=True)


def _join(tag: bytes, parts: list[bytes]) -> bytes:
    return tag + _LENGTH.pack(len(parts)) + b"".join(_LENGTH.pack(len(part)) + part for part in parts)


def _encode(key: Any, depth: int = 0) -> tuple[bytes, bytes]:
    """Return the match encoding of a key, and its exact encoding that keeps bool and float apart from int.

    ``depth`` is the number of tuples and frozensets that contain ``key``.
    """
    kind = type(key)
    if kind is str:
        encoded = TAG_STR + key.encode("utf-8", "surrogatepass")
        return encoded, encoded
    if kind is int:
        encoded = _int_bytes(key)
        return encoded, encoded
    if kind is bytes:
        encoded = TAG_BYTES + key
        return encoded, encoded
    if kind is bool:
        return _int_bytes(int(key)), TAG_TRUE if key else TAG_FALSE
    if kind is float:
        if math.isnan(key):
            encoded = TAG_FLOAT + _CANONICAL_NAN
            return encoded, encoded
        exact = TAG_FLOAT + _DOUBLE.pack(key)
        if key.is_integer():
            return _int_bytes(int(key)), exact  # also maps -0.0 to 0
        return exact, exact
    if key is None:
        return TAG_NONE, TAG_NONE
    if kind is tuple or kind is frozenset:
        if depth == MAX_KEY_DEPTH:
            raise KeyTooDeep(f"the key nests tuples or frozensets more than {MAX_KEY_DEPTH} levels deep")
        pairs = [_encode(item, depth + 1) for item in key]
        match_parts = [match for match, _ in pairs]
        exact_parts = [exact for _, exact in pairs]
        if kind is tuple:
            return _join(TAG_TUPLE, match_parts), _join(TAG_TUPLE, exact_parts)
        return _join(TAG_FROZENSET, sorted(match_parts)), _join(TAG_FROZENSET, sorted(exact_parts))
    pickled = TAG_PICKLE + cloudpickle.dumps(key, protocol=PICKLE_PROTOCOL)
    return pickled, pickled


def encode_key(key: Any) -> tuple[bytes, bytes | None]:
    """Return the match key and, when it differs, the stored key of ``key``.

    Raises ``TypeError`` for a key that is not hashable, as a Python dict does,
    ``KeyTooDeep`` for a key nested more than ``MAX_KEY_DEPTH`` levels deep, and whatever
    pickling raises for a key that cannot be pickled.
    """
    if type(key) is str:  # the common case, first
        return TAG_STR + key.encode("utf-8", "surrogatepass"), None
    hash(key)
    match_key, stored_key = _encode(key)
    return match_key, None if stored_key == match_key else stored_key


def decode_key(data: bytes) -> Any:
    """Rebuild a key from its stored (or match) encoding."""
    if data[:1] == TAG_STR:  # the common case, first
        return data[1:].decode("utf-8", "surrogatepass")
    key, end = _decode(memoryview(data), 0)
    if end != len(data):
        raise DeserializationError(f"stored key has {len(data) - end} trailing bytes; the data directory may be damaged")
    return key


def match_key_of(stored_key: bytes) -> bytes:
    """Return the match key of a stored key, without unpickling anything.

    This turns the exact encoding back into the canonical one at the byte level: bools
    and integral floats become ints, and frozensets are sorted again. Pickled items
    are the same in both encodings, so a key whose classes cannot be imported here
    still gets its match key. A match key is returned unchanged.
    """
    tag = stored_key[:1]
    if tag == TAG_TRUE:
        return _int_bytes(1)
    if tag == TAG_FALSE:
        return _int_bytes(0)
    if tag == TAG_FLOAT:
        return _encode(_DOUBLE.unpack_from(stored_key, 1)[0])[0]
    if tag in (TAG_TUPLE, TAG_FROZENSET):
        parts = [match_key_of(item) for item in _items(stored_key)[0]]
        return _join(tag, parts if tag == TAG_TUPLE else sorted(parts))
    return stored_key


def _items(data: bytes) -> tuple[list[bytes], int]:
    """Return the encodings of the items of a tuple or frozenset key, and the position after the last.

    A position past the end of ``data`` means that the last item was cut short.
    """
    (count,) = _LENGTH.unpack_from(data, 1)
    position = 1 + _LENGTH.size
    items = []
    for _ in range(count):
        (length,) = _LENGTH.unpack_from(data, position)
        position += _LENGTH.size
        items.append(data[position : position + length])
        position += length
    return items, position


def checked_match_key(data: bytes, depth: int = 0) -> bytes:
    """Return the match key of a stored or match key, checking that ``encode_key`` could have made it.

    ``match_key_of`` trusts its input. A key from a file written by hand must also use
    known tags, have no bytes left over, write each int in its shortest form and contain
    no item twice in a frozenset. Otherwise it decodes to a key whose own match key
    differs, which a get never finds and a put stores a second time. Pickled keys are
    taken as they are, since checking them would mean unpickling them.

    Raises ``ValueError`` (or ``struct.error`` for a truncated length) naming the fault.
    """
    tag, body = data[:1], data[1:]
    if tag in (TAG_NONE, TAG_TRUE, TAG_FALSE):
        if body:
            raise ValueError(f"{len(body)} bytes follow the type tag {tag!r}")
        return match_key_of(data)
    if tag == TAG_INT:
        if not body or _int_bytes(int.from_bytes(body, "big", signed=True)) != data:
            raise ValueError("an int is not in its shortest encoding")
        return data
    if tag == TAG_FLOAT:
        if len(body) != _DOUBLE.size:
            raise ValueError(f"a float has {len(body)} bytes instead of {_DOUBLE.size}")
        return _encode(_DOUBLE.unpack(body)[0])[0]
    if tag == TAG_STR:
        body.decode("utf-8", "surrogatepass")  # UnicodeDecodeError is a ValueError
        return data
    if tag in (TAG_BYTES, TAG_PICKLE):
        return data
    if tag in (TAG_TUPLE, TAG_FROZENSET):
        if depth == MAX_KEY_DEPTH:
            raise KeyTooDeep(f"the key nests tuples or frozensets more than {MAX_KEY_DEPTH} levels deep")
        items, end = _items(data)
        if end > len(data):
            raise ValueError("an item of a tuple or frozenset runs past the end of the key")
        if end < len(data):
            raise ValueError(f"{len(data) - end} bytes follow the last item of a tuple or frozenset")
        parts = [checked_match_key(item, depth + 1) for item in items]
        if tag == TAG_FROZENSET:
            parts.sort()
            # Distinct NaN objects are unequal, so a frozenset may contain two NaNs, and nothing else twice.
            if any(first == second and _CANONICAL_NAN not in first for first, second in zip(parts, parts[1:])):
                raise ValueError("a frozenset contains the same item twice")
        return _join(tag, parts)
    raise ValueError(f"unknown type tag {tag!r}")


def _decode(data: memoryview, start: int) -> tuple[Any, int]:
    tag = bytes(data[start : start + 1])
    body = start + 1
    if tag == TAG_STR:
        return bytes(data[body:]).decode("utf-8", "surrogatepass"), len(data)
    if tag == TAG_INT:
        return int.from_bytes(data[body:], "big", signed=True), len(data)
    if tag == TAG_BYTES:
        return bytes(data[body:]), len(data)
    if tag == TAG_FLOAT:
        return _DOUBLE.unpack_from(data, body)[0], body + _DOUBLE.size
    if tag == TAG_NONE:
        return None, body
    if tag == TAG_TRUE:
        return True, body
    if tag == TAG_FALSE:
        return False, body
    if tag in (TAG_TUPLE, TAG_FROZENSET):
        (count,) = _LENGTH.unpack_from(data, body)
        position = body + _LENGTH.size
        items = []
        for _ in range(count):
            (length,) = _LENGTH.unpack_from(data, position)
            position += _LENGTH.size
            item, _ = _decode(data[position : position + length], 0)
            items.append(item)
            position += length
        return (tuple(items) if tag == TAG_TUPLE else frozenset(items)), position
    if tag == TAG_PICKLE:
        return pickle.loads(data[body:]), len(data)
    raise DeserializationError(f"stored key has an unknown type tag {tag!r}; the data directory may be damaged")


def dump_value(value: Any) -> bytes:
    """Pickle a value: with the standard pickler for plain scalars, else with cloudpickle."""
    if type(value) in PLAIN_VALUE_TYPES:
        return pickle.dumps(value, protocol=PICKLE_PROTOCOL)
    return cloudpickle.dumps(value, protocol=PICKLE_PROTOCOL)


def load_value(data: bytes) -> Any:
    return pickle.loads(data)
