"""Request handlers: check each request's arguments and run it against the engine.

Reads run at once on the connection's thread in a short read transaction. Writes go to
the group commit writer, and their replies are sent from its callback once the write is
durable. Keys and values stay opaque bytes here: the daemon never unpickles anything.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sharedict.api import protocol
from sharedict.api.errors import CODE_BY_ERROR, AlreadyExistsError, InvalidError, NotFoundError, ProtocolError, RequestSizeError, StorageFullError
from sharedict.engine import DictExists, DictNotFound, DictRecord, EngineError, EntryNotFound, StorageFull

if TYPE_CHECKING:
    from sharedict.daemon.connection import Connection
    from sharedict.daemon.server import Server

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
SCAN_MAX_ENTRIES = 1000
SCAN_MAX_BYTES = 4 << 20

_ENGINE_ERRORS: dict[type[EngineError], type[Exception]] = {
    DictNotFound: NotFoundError,
    DictExists: AlreadyExistsError,
    EntryNotFound: KeyError,
    StorageFull: StorageFullError,
}


class RequestError(Exception):
    """A request that the daemon rejects, with the error code to send back."""

    def __init__(self, error: type[Exception], message: str) -> None:
        super().__init__(message)
        self.code = CODE_BY_ERROR[error]


def record_to_wire(record: DictRecord) -> dict[str, Any]:
    return {
        "id": record.object_id,
        "name": record.name,
        "env": record.environment_name,
        "created_at": record.created_at,
        "created_by": record.created_by,
    }


def error_code(exc: BaseException) -> tuple[int, str]:
    """Return the wire error code and message for an exception raised by a handler."""
    if isinstance(exc, RequestError):
        return exc.code, str(exc)
    for engine_error, error in _ENGINE_ERRORS.items():
        if isinstance(exc, engine_error):
            return CODE_BY_ERROR[error], str(exc)
    return CODE_BY_ERROR[type(exc)] if type(exc) in CODE_BY_ERROR else 1, f"internal error: {exc!r}"


# Argument checks. Each names the operation and the argument, since a client that sends a
# wrong type is a bug that its author must be able to find.


def _check_arity(op: str, args: list[Any], count: int) -> None:
    if len(args) != count:
        raise RequestError(ProtocolError, f"{op} takes {count} arguments, got {len(args)}")


def _bytes(op: str, what: str, value: Any, *, optional: bool = False, limit: int = protocol.MAX_OBJECT_SIZE) -> bytes:
    if value is None and optional:
        return value
    if not isinstance(value, bytes):
        raise RequestError(ProtocolError, f"{op}: {what} must be bytes, got {type(value).__name__}")
    if len(value) > limit:
        raise RequestError(
            RequestSizeError,
            f"{op}: {what} of {len(value)} bytes exceeds the limit of {limit} bytes",
        )
    return value


def _object_id(op: str, value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != 8:
        raise RequestError(ProtocolError, f"{op}: dict id must be 8 bytes")
    return value


def _text(op: str, what: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RequestError(ProtocolError, f"{op}: {what} must be a string, got {type(value).__name__}")
    return value


def _name(op: str, what: str, value: Any) -> str:
    name = _text(op, what, value)
    if not NAME_PATTERN.fullmatch(name):
        raise RequestError(
            InvalidError,
            f"invalid {what} {name!r}: use 1 to 64 ASCII letters, digits, '-', '_' or '.'",
        )
    return name


def _int(op: str, what: str, value: Any, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or value >= 1 << 64:
        raise RequestError(ProtocolError, f"{op}: {what} must be an integer from {minimum} to 2**64-1")
    return value


def _bool(op: str, what: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RequestError(ProtocolError, f"{op}: {what} must be true or false")
    return value


def _check_update_entry(raw: list[Any]) -> None:
    _bytes(protocol.UPDATE, "key", raw[0])
    _bytes(protocol.UPDATE, "stored key", raw[1], optional=True)
    _bytes(protocol.UPDATE, "value", raw[2])


class Handlers:
    """The daemon's operations, looked up by name.

    A read handler returns its result; a write handler returns the function for the
    writer and the number of bytes it stores.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.store = server.store
        self.reads: dict[str, Callable[[Connection, list[Any]], Any]] = {
            protocol.DICT_OPEN: self.dict_open,
            protocol.DICT_BY_ID: self.dict_by_id,
            protocol.DICT_LIST: self.dict_list,
            protocol.GET: self.get,
            protocol.CONTAINS: self.contains,
            protocol.LEN: self.length,
            protocol.SCAN: self.scan,
            protocol.STATUS: self.status,
        }
        self.writes: dict[str, Callable[[Connection, list[Any]], tuple[Callable[[Any], Any], int]]] = {
            protocol.DICT_CREATE: self.dict_create,
            protocol.DICT_EPHEMERAL: self.dict_ephemeral,
            protocol.DICT_DELETE: self.dict_delete,
            protocol.PUT: self.put,
            protocol.UPDATE: self.update,
            protocol.POP: self.pop,
            protocol.CLEAR: self.clear,
        }

    # Reads.

    def dict_open(self, conn: Connection, args: list[Any]) -> dict[str, Any]:
        _check_arity(protocol.DICT_OPEN, args, 2)
        env = _name(protocol.DICT_OPEN, "environment name", args[0])
        name = _name(protocol.DICT_OPEN, "dict name", args[1])
        with self.store.reader() as txn:
            return record_to_wire(self.store.lookup_dict(txn, env, name))

    def dict_by_id(self, conn: Connection, args: list[Any]) -> dict[str, Any]:
        _check_arity(protocol.DICT_BY_ID, args, 1)
        object_id = _object_id(protocol.DICT_BY_ID, args[0])
        with self.store.reader() as txn:
            return record_to_wire(self.store.dict_by_id(txn, object_id))

    def dict_list(self, conn: Connection, args: list[Any]) -> list[dict[str, Any]]:
        _check_arity(protocol.DICT_LIST, args, 1)
        env = None if args[0] is None else _name(protocol.DICT_LIST, "environment name", args[0])
        with self.store.reader() as txn:
            return [record_to_wire(record) for record in self.store.list_dicts(txn, env)]

    def get(self, conn: Connection, args: list[Any]) -> list[Any]:
        _check_arity(protocol.GET, args, 2)
        object_id = _object_id(protocol.GET, args[0])
        key = _bytes(protocol.GET, "key", args[1])
        with self.store.reader() as txn:
            try:
                value, touch = self.store.get(txn, object_id, key)
            except EntryNotFound:
                return [False, None]
        if touch is not None:
            self.server.record_access(touch)
        return [True, value]

    def contains(self, conn: Connection, args: list[Any]) -> bool:
        _check_arity(protocol.CONTAINS, args, 2)
        object_id = _object_id(protocol.CONTAINS, args[0])
        key = _bytes(protocol.CONTAINS, "key", args[1])
        with self.store.reader() as txn:
            found, touch = self.store.contains(txn, object_id, key)
        if touch is not None:
            self.server.record_access(touch)
        return found

    def length(self, conn: Connection, args: list[Any]) -> int:
        _check_arity(protocol.LEN, args, 1)
        object_id = _object_id(protocol.LEN, args[0])
        with self.store.reader() as txn:
            return self.store.length(txn, object_id)

    def scan(self, conn: Connection, args: list[Any]) -> list[Any]:
        _check_arity(protocol.SCAN, args, 5)
        object_id = _object_id(protocol.SCAN, args[0])
        after_seq = _int(protocol.SCAN, "position", args[1])
        limit = min(_int(protocol.SCAN, "page size", args[2], minimum=1), SCAN_MAX_ENTRIES)
        keys = _bool(protocol.SCAN, "keys flag", args[3])
        values = _bool(protocol.SCAN, "values flag", args[4])
        with self.store.reader() as txn:
            entries, touches, done = self.store.scan(
                txn, object_id, after_seq, limit=limit, max_bytes=SCAN_MAX_BYTES, keys=keys, values=values
            )
        for touch in touches:
            self.server.record_access(touch)
        return [entries, done]  # msgpack sends each Entry tuple as [seq, key, value]

    def status(self, conn: Connection, args: list[Any]) -> dict[str, Any]:
        _check_arity(protocol.STATUS, args, 0)
        return self.server.status()

    # Writes.

    def dict_create(self, conn: Connection, args: list[Any]) -> tuple[Callable[[Any], Any], int]:
        _check_arity(protocol.DICT_CREATE, args, 3)
        env = _name(protocol.DICT_CREATE, "environment name", args[0])
        name = _name(protocol.DICT_CREATE, "dict name", args[1])
        exist_ok = _bool(protocol.DICT_CREATE, "exist_ok flag", args[2])

        def write(txn: Any) -> list[Any]:
            record, created = self.store.create_dict(txn, env, name, created_by=conn.user_name, exist_ok=exist_ok)
            return [record_to_wire(record), created]

        return write, 0

    def dict_ephemeral(self, conn: Connection, args: list[Any]) -> tuple[Callable[[Any], Any], int]:
        _check_arity(protocol.DICT_EPHEMERAL, args, 1)
        env = _name(protocol.DICT_EPHEMERAL, "environment name", args[0])

        def write(txn: Any) -> dict[str, Any]:
            record, _ = self.store.create_dict(
                txn, env, None, created_by=conn.user_name, exist_ok=False, owner_pid=conn.pid
            )
            return record_to_wire(record)

        return write, 0

    def dict_delete(self, conn: Connection, args: list[Any]) -> tuple[Callable[[Any], Any], int]:
        _check_arity(protocol.DICT_DELETE, args, 1)
        object_id = _object_id(protocol.DICT_DELETE, args[0])

        def write(txn: Any) -> None:
            self.store.delete_dict(txn, object_id)

        return write, 0

    def put(self, conn: Connection, args: list[Any]) -> tuple[Callable[[Any], Any], int]:
        _check_arity(protocol.PUT, args, 5)
        object_id = _object_id(protocol.PUT, args[0])
        key = _bytes(protocol.PUT, "key", args[1])
        stored_key = _bytes(protocol.PUT, "stored key", args[2], optional=True)
        value = _bytes(protocol.PUT, "value", args[3])
        skip_if_exists = _bool(protocol.PUT, "skip_if_exists flag", args[4])

        def write(txn: Any) -> bool:
            return self.store.put(txn, object_id, key, stored_key, value, skip_if_exists=skip_if_exists)

        return write, len(key) + len(value) + len(stored_key or b"")

    def update(self, conn: Connection, args: list[Any]) -> tuple[Callable[[Any], Any], int]:
        _check_arity(protocol.UPDATE, args, 2)
        object_id = _object_id(protocol.UPDATE, args[0])
        raw_entries = args[1]
        if not isinstance(raw_entries, list):
            raise RequestError(ProtocolError, "update: entries must be a list")
        if len(raw_entries) > protocol.MAX_UPDATE_ENTRIES:
            raise RequestError(
                RequestSizeError,
                f"update of {len(raw_entries)} entries exceeds the limit of {protocol.MAX_UPDATE_ENTRIES}",
            )
        size = 0
        for raw in raw_entries:
            if type(raw) is not list or len(raw) != 3:
                raise RequestError(ProtocolError, "update: each entry must be [key, stored key, value]")
            key, stored_key, value = raw
            if type(key) is not bytes or type(value) is not bytes or not (stored_key is None or type(stored_key) is bytes):
                _check_update_entry(raw)  # raises, naming the part at fault
            size += len(key) + len(value) + (len(stored_key) if stored_key is not None else 0)
        # No key or value can exceed its limit while all of them together stay within it.
        if size > protocol.MAX_OBJECT_SIZE:
            for raw in raw_entries:
                _check_update_entry(raw)

        def write(txn: Any) -> None:
            self.store.update(txn, object_id, raw_entries)

        return write, size

    def pop(self, conn: Connection, args: list[Any]) -> tuple[Callable[[Any], Any], int]:
        _check_arity(protocol.POP, args, 2)
        object_id = _object_id(protocol.POP, args[0])
        key = _bytes(protocol.POP, "key", args[1])

        def write(txn: Any) -> list[Any]:
            try:
                return [True, self.store.pop(txn, object_id, key)]
            except EntryNotFound:
                return [False, None]

        return write, 0

    def clear(self, conn: Connection, args: list[Any]) -> tuple[Callable[[Any], Any], int]:
        _check_arity(protocol.CLEAR, args, 1)
        object_id = _object_id(protocol.CLEAR, args[0])

        def write(txn: Any) -> None:
            self.store.clear(txn, object_id)

        return write, 0
