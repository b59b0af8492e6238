"""The on-disk layout of a store: sub-database keys, record formats and small codecs.

Layout of the sub-databases (all keys big-endian, so that byte order is numeric order):

``names``    ``env NUL name`` -> object id (8 bytes)
``dicts``    object id -> msgpack record: name, env, created_at, created_by, data id, owner pid
``stats``    data id -> entry count and next sequence number
``index``    data id + key ref -> sequence number + value
``order``    data id + sequence number -> last access + key ref + stored key
``access``   data id + last access + sequence number -> empty: the last-access index
``garbage``  data id -> empty: entries of cleared or deleted dicts, removed in the background
``meta``     small named counters, such as the fencing tokens of locks

A dict's entries live under its *data id*, not under its object id. ``clear()`` and
deletion give the dict a fresh data id (or drop the record) in one small transaction and
leave the old entries to the background sweeper, so that both are O(1) and atomic.

The *key ref* of an entry is the client's canonical key bytes when they fit into an LMDB
key, and their SHA-256 digest otherwise, so that keys of any size work. The *sequence
number* orders entries by insertion: overwriting keeps it, deleting and inserting again
takes a new one. Times are wall-clock milliseconds; ``expiry.py`` states when an entry
expires and when a read records its access.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import NamedTuple

import lmdb
import msgpack

FORMAT_VERSION = 1

# LMDB rejects keys over 511 bytes. A key ref is one tag byte plus the canonical key, or
# plus a 32-byte digest, behind an 8-byte data id.
INLINE_KEY_LIMIT = 480
INLINE = b"\x00"
HASHED = b"\x01"

U64 = struct.Struct(">Q")
MAX_SEQ = 2**64 - 1
STATS = struct.Struct(">QQ")  # entry count, next sequence number
ORDER_HEAD = struct.Struct(">QBH")  # last access, flags, key ref length
FLAG_STORED_KEY = 1  # the stored key differs from the canonical key and follows the key ref


@dataclass(frozen=True)
class DictRecord:
    """A named or ephemeral dict as the engine stores it."""

    object_id: bytes
    name: str | None
    environment_name: str
    created_at: float
    created_by: str
    data_id: bytes
    owner_pid: int | None = None

    def pack(self) -> bytes:
        return msgpack.packb(
            [self.name, self.environment_name, self.created_at, self.created_by, self.data_id, self.owner_pid]
        )

    @classmethod
    def unpack(cls, object_id: bytes, raw: bytes) -> DictRecord:
        name, env, created_at, created_by, data_id, owner_pid = msgpack.unpackb(raw)
        return cls(object_id, name, env, created_at, created_by, data_id, owner_pid)


class Entry(NamedTuple):
    """One entry returned by ``Store.scan``: its position, its stored key and its value.

    A tuple, because a scan makes one per entry and the daemon sends them as they are.
    """

    seq: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class Touch:
    """An access a read found due: the writer records it later, without blocking the read."""

    index_key: bytes
    seq: int
    read_ms: int


def key_ref(match_key: bytes) -> bytes:
    """Return the part of the index key that identifies ``match_key`` within a dict."""
    if len(match_key) <= INLINE_KEY_LIMIT:
        return INLINE + match_key
    return HASHED + hashlib.sha256(match_key).digest()


def successor(data_id: bytes) -> bytes | None:
    """Return the smallest key above every key that starts with ``data_id``; None if none is."""
    value = int.from_bytes(data_id, "big") + 1
    if value >> 64:
        return None
    return value.to_bytes(8, "big")


def last_with_prefix(cursor: lmdb.Cursor, prefix: bytes) -> bool:
    """Position ``cursor`` on the last key that starts with the 8-byte ``prefix``."""
    above = successor(prefix)
    if above is None or not cursor.set_range(above):
        found = cursor.last()
    else:
        found = cursor.prev()
    return found and cursor.key().startswith(prefix)


def name_key(environment_name: str, name: str) -> bytes:
    return environment_name.encode() + b"\x00" + name.encode()


def pack_order(access_ms: int, ref: bytes, stored_key: bytes | None) -> bytes:
    if stored_key is None:
        return ORDER_HEAD.pack(access_ms, 0, len(ref)) + ref
    return ORDER_HEAD.pack(access_ms, FLAG_STORED_KEY, len(ref)) + ref + stored_key


def unpack_order(order_value: bytes) -> tuple[int, bytes, bytes]:
    """Return (last access, key ref, stored key) of an ``order`` record."""
    access_ms, flags, ref_length = ORDER_HEAD.unpack_from(order_value)
    start = ORDER_HEAD.size
    ref = order_value[start : start + ref_length]
    if flags & FLAG_STORED_KEY:
        return access_ms, ref, order_value[start + ref_length :]
    return access_ms, ref, ref[1:]
