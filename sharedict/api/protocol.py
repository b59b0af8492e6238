"""The wire protocol between clients and the daemon, without any I/O.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack. A request
is the array ``[request_id, operation, *arguments]``; a reply is ``[request_id, status,
result]``, where status 0 means success and any other status is an error code from
``sharedict.api.errors.ERROR_CODES`` with a message as the result. Request ids let one
connection carry many requests at once, and replies may come back in any order.

The first request on a connection is ``hello`` with the protocol version; the daemon
rejects any other first request and any other version.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import msgpack

PROTOCOL_VERSION = 1

MiB = 1 << 20
MAX_OBJECT_SIZE = 100 * MiB
"""Largest serialised key or value."""

MAX_UPDATE_ENTRIES = 10_000
"""Most entries in one ``update()``."""

MAX_FRAME_SIZE = 256 * MiB
"""Largest frame on the wire.

A put of a 100 MiB key and a 100 MiB value fits, with room. A key that contains a bool
or a float also travels in its exact form, as a second copy. So a put of such a key and
a value that are each under 100 MiB can exceed this limit and fail with
``RequestSizeError``.
"""

HEADER = struct.Struct(">I")

STATUS_OK = 0

# Operations. Their names are part of the protocol.
HELLO = "hello"
DICT_OPEN = "dict_open"
DICT_CREATE = "dict_create"
DICT_BY_ID = "dict_by_id"
DICT_EPHEMERAL = "dict_ephemeral"
DICT_LIST = "dict_list"
DICT_DELETE = "dict_delete"
GET = "get"
CONTAINS = "contains"
LEN = "len"
PUT = "put"
UPDATE = "update"
POP = "pop"
CLEAR = "clear"
SCAN = "scan"
STATUS = "status"
SHUTDOWN = "shutdown"
LOCK_ACQUIRE = "lock_acquire"
LOCK_RELEASE = "lock_release"
LOCK_EXTEND = "lock_extend"
LOCK_CANCEL = "lock_cancel"
LOCK_HELD = "lock_held"

_packer_options = {"use_bin_type": True}
_unpacker_options = {"raw": False, "strict_map_key": True}


class FrameTooLarge(Exception):
    """A frame header announced more bytes than ``MAX_FRAME_SIZE``."""

    def __init__(self, size: int) -> None:
        super().__init__(
            f"frame of {size} bytes exceeds the {MAX_FRAME_SIZE // MiB} MiB limit of the protocol"
        )
        self.size = size


class MalformedFrame(Exception):
    """A frame is not valid msgpack, or not a request or reply of the expected shape."""


def encode_frame(message: Any) -> list[bytes]:
    """Encode a message as a frame: the header and the body as separate buffers.

    Keeping them apart lets the sender hand both to one ``sendmsg`` call without copying
    a large body a second time.
    """
    body = msgpack.packb(message, **_packer_options)
    if len(body) > MAX_FRAME_SIZE:
        raise FrameTooLarge(len(body))
    return [HEADER.pack(len(body)), body]


def encode_frame_bytes(message: Any) -> bytes:
    """Encode a small message as one bytes object."""
    body = msgpack.packb(message, **_packer_options)
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes | memoryview) -> Any:
    try:
        return msgpack.unpackb(body, **_unpacker_options)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise MalformedFrame(f"frame is not valid msgpack: {exc}") from exc


class FrameReader:
    """Splits a byte stream into frame bodies.

    Feed it whatever ``recv`` returned; iterate ``frames()`` for complete bodies. A
    header that announces an oversized frame raises ``FrameTooLarge`` before any of its
    body is buffered.

    Data fed while nothing is buffered, the usual case for a request or a reply, is
    split without copying: its bodies are memoryviews of the received bytes. Only an
    incomplete frame at its end is copied into the buffer.
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._buffer = bytearray()
        self._received: bytes | None = None
        self._max_frame_size = max_frame_size

    def feed(self, data: bytes | memoryview) -> None:
        if self._received is None and not self._buffer and type(data) is bytes:
            self._received = data
            return
        self._buffer_received()
        self._buffer += data

    def _buffer_received(self) -> None:
        if self._received is not None:
            self._buffer += self._received
            self._received = None

    def frames(self) -> Iterator[bytes | memoryview]:
        """Yield each complete frame body once; a caller may stop iterating at any frame."""
        if self._received is not None:
            received, self._received = self._received, None
            yield from self._split(received, memoryview(received))
        else:
            yield from self._split(self._buffer, None)

    def _split(self, data: bytes | bytearray, view: memoryview | None) -> Iterator[bytes | memoryview]:
        start = 0
        try:
            while len(data) - start >= HEADER.size:
                (size,) = HEADER.unpack_from(data, start)
                if size > self._max_frame_size:
                    raise FrameTooLarge(size)
                end = start + HEADER.size + size
                if len(data) < end:
                    break
                # A body cut from the buffer is copied, since the buffer changes later.
                body = view[start + HEADER.size : end] if view is not None else bytes(data[start + HEADER.size : end])
                # Consume the frame before yielding it: a caller that returns from its
                # loop at this frame must not find it again in the next call.
                start = end
                yield body
        finally:
            if view is None:
                del self._buffer[:start]
            elif start < len(data):
                # Data fed while this generator was suspended comes after the rest of
                # this one, which goes first.
                self._buffer[:0] = view[start:]
                self._buffer_received()
