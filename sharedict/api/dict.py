"""``Dict``: a named, persistent dict that every process of the machine shares.

The API is Modal's ``modal.Dict``. Every I/O method blocks when called, and has an
awaitable twin: ``d.get("k")`` and ``await d.get.aio("k")``; ``d.items()`` and
``async for k, v in d.items.aio()``.

Guarantees:
    * Every call is atomic, and a write returns only once it is durable on disk.
    * Keys of the built-in scalar types, and tuples and frozensets of them, match as in a
      Python dict (``1``, ``1.0`` and ``True`` are one key), in every process. Keys of
      other types match when they pickle to the same bytes. Iteration follows insertion
      order.
    * Values are stored copies: mutating a fetched value changes nothing until it is put
      back.
    * Handles are thread-safe, fork-safe and usable from any event loop. They pickle by
      reference, so a handle can be a value, a key or a function argument.
"""

from __future__ import annotations

import datetime
from asyncio import _get_running_loop  # unlike get_running_loop(), returns None outside a loop
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from sharedict.api import protocol
from sharedict.api.codec import (
    DEFAULT_ENVIRONMENT,
    LookupNeeded,
    check_environment,
    check_name,
    decode_items,
    decode_keys,
    decode_value,
    decode_values,
    encode_request_key,
    encode_request_value,
    encode_update,
    encoding_in_operation,
)
from sharedict.api.errors import (
    ConnectionLostError,
    DaemonUnavailableError,
    DeserializationError,
    InvalidError,
    NotFoundError,
    RequestSizeError,
)
from sharedict.api.operation import Items, OperationBody, _warn_if_in_event_loop, iteration, operation
from sharedict.api.transport import Client, Request, check_client

PAGE_SIZE = 1000
_PLAIN_TYPES = frozenset({str, bytes, int, float, bool, type(None)})
_MISSING = object()
# The errors of a reply that _reply_error rewrites.
_REPLY_ERRORS = (NotFoundError, ConnectionLostError, DaemonUnavailableError, RequestSizeError)
_NO_KEY = object()
_Encoded = TypeVar("_Encoded")


@dataclass(frozen=True)
class DictInfo:
    """Facts about a dict that never change."""

    name: str | None
    created_at: datetime.datetime
    created_by: str | None


def _hex_id(object_id: bytes) -> str:
    return "di-" + object_id.hex()


def _parse_id(dict_id: str) -> bytes:
    if isinstance(dict_id, str) and dict_id.startswith("di-") and len(dict_id) == 19:
        try:
            return bytes.fromhex(dict_id[3:])
        except ValueError:
            pass
    raise InvalidError(f"invalid dict id {dict_id!r}: expected 'di-' and 16 hex digits, as in Dict.object_id")


class Dict:
    """A handle on a named or ephemeral dict; make one with ``from_name``, ``from_id`` or ``ephemeral``."""

    _name: str | None
    _environment_name: str
    _create_if_missing: bool
    _client: Client | None
    _id: bytes | None
    _info: DictInfo | None
    _label: str  # names the dict in messages

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "Dict(...) cannot be constructed directly; use Dict.from_name(...), Dict.from_id(...) or Dict.ephemeral()"
        )

    @classmethod
    def _handle(
        cls,
        *,
        name: str | None,
        environment_name: str,
        object_id: bytes | None = None,
        create_if_missing: bool = False,
        client: Client | None = None,
    ) -> Dict:
        handle = object.__new__(cls)
        handle._name = name
        handle._environment_name = environment_name
        handle._create_if_missing = create_if_missing
        handle._client = check_client(client)
        handle._id = object_id
        handle._info = None
        handle._label = handle._describe()
        return handle

    # Constructors. None of them does I/O: the first call on the handle looks it up.

    @staticmethod
    def from_name(
        name: str,
        *,
        environment_name: str | None = None,
        create_if_missing: bool = False,
        client: Client | None = None,
    ) -> Dict:
        """Return a handle on the dict ``name``; a missing dict raises ``NotFoundError`` on first use.

        With ``create_if_missing=True`` the first use creates the dict instead.
        """
        return Dict._handle(
            name=check_name(name),
            environment_name=check_environment(environment_name),
            create_if_missing=create_if_missing,
            client=client,
        )

    @staticmethod
    def from_id(dict_id: str, client: Client | None = None) -> Dict:
        """Return a handle on the dict whose ``object_id`` is ``dict_id``."""
        return Dict._handle(name=None, environment_name="", object_id=_parse_id(dict_id), client=client)

    @staticmethod
    def ephemeral(*, client: Client | None = None, environment_name: str | None = None) -> EphemeralDict:
        """Return a context manager of a new, unnamed dict, deleted when the block exits.

        Works with ``with`` and ``async with``. The daemon also deletes the dict when the
        process that created it disconnects, for example by dying.
        """
        return EphemeralDict(client, check_environment(environment_name))

    # Identity.

    @property
    def name(self) -> str | None:
        """The dict's name; ``None`` for an ephemeral dict, or for ``from_id`` before first use."""
        return self._name

    @property
    def object_id(self) -> str:
        """The dict's id, ``di-`` and 16 hex digits; looks the dict up if needed."""
        if self._id is None:
            self._look_up_now()
        return _hex_id(self._id)

    def __repr__(self) -> str:
        if self._name is None:
            return f"sharedict.Dict.from_id({_hex_id(self._id)!r})" if self._id else "sharedict.Dict.ephemeral()"
        return f"sharedict.{self._name_call('Dict.from_name')}"

    def _name_call(self, function: str, extra: str = "") -> str:
        """Return a call of ``function`` with this dict's name and environment, for messages and repr."""
        arguments = repr(self._name)
        if self._environment_name not in ("", DEFAULT_ENVIRONMENT):
            arguments += f", environment_name={self._environment_name!r}"
        return f"{function}({arguments}{extra})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Dict):
            return NotImplemented
        return self.object_id == other.object_id

    def __hash__(self) -> int:
        return hash(("sharedict.Dict", self.object_id))

    def __bool__(self) -> bool:
        # A handle is always true, as in Modal; ``len()`` would cost a request.
        return True

    def __reduce__(self) -> tuple[Any, ...]:
        # The pickled form is the key of ``d[d]``: it must be the same bytes from every
        # handle on the dict, so a ``from_id`` handle looks up its name first.
        if not self._environment_name:
            self._look_up_now()
        return _restore_dict, (self.object_id, self._name, self._environment_name)

    def _describe(self) -> str:
        """Return the words that name this dict in messages, such as ``dict 'jobs'``.

        The result is kept in ``_label`` and made again when the handle learns its name
        or id, because every call passes the label to the codec.
        """
        if self._name is not None and self._environment_name not in ("", DEFAULT_ENVIRONMENT):
            return f"dict {self._name!r} in environment {self._environment_name!r}"
        if self._name is not None:
            return f"dict {self._name!r}"
        if self._id is None:
            return "ephemeral dict"
        if not self._environment_name:
            return f"dict {_hex_id(self._id)}"  # a from_id handle before its first use
        return f"ephemeral dict {_hex_id(self._id)}"

    def _look_up_now(self) -> None:
        """Look the dict up with a blocking call, or ask the operation that is encoding to do it."""
        if encoding_in_operation.get():
            raise LookupNeeded(self)
        self.hydrate()

    def _encode(self, encode: Callable[..., _Encoded], *args: Any) -> Generator[Request, Any, _Encoded]:
        """Run a codec function on a call's keys and values; look up the handles inside them first."""
        for arg in args:
            if type(arg) not in _PLAIN_TYPES:
                break
        else:
            # No handle can hide in a plain scalar, so the context variable, which costs
            # about a sixth of a small call, is not needed. A loop, because all() over a
            # generator expression costs a tenth of a gathered get.
            return encode(*args)
        while True:
            token = encoding_in_operation.set(True)
            try:
                return encode(*args)
            except LookupNeeded as needed:
                handle = needed.handle
            finally:
                encoding_in_operation.reset(token)
            if handle._socket_path() == self._socket_path():
                yield from handle._hydrated()
            elif _get_running_loop() is None:
                # This operation's requests go to this dict's daemon, and the handle's
                # dict lives on another one, so it is looked up with its own client.
                handle.hydrate()
            else:
                # Looking it up here would block the event loop.
                raise InvalidError(
                    f"{handle._label} lives on the daemon on {handle._socket_path()}, not on this dict's daemon, "
                    "so it must be looked up before it is stored from async code: "
                    "`await handle.hydrate.aio()` first"
                )

    def _socket_path(self) -> str:
        """Return the socket of the daemon that this handle's calls go to."""
        return (self._client or Client.default()).settings.socket_path

    def _request(self, op: str, *args: Any, key: Any = _NO_KEY, write: bool = False) -> Generator[Request, Any, Any]:
        """Send ``op`` about this dict and return its result.

        The request contains the dict's id, then the match key of ``key`` when one is given,
        then ``args``; see ``_prepared`` and ``_reply_error``.
        """
        request = yield from self._prepared(op, *args, key=key, write=write)
        try:
            return (yield request)
        except _REPLY_ERRORS as exc:
            raise self._reply_error(exc) from None

    def _prepared(self, op: str, *args: Any, key: Any = _NO_KEY, write: bool = False) -> Generator[Request, Any, Request]:
        """Return the request of ``op``, after the lookups that it needs.

        The key is encoded first, so that a bad key sends nothing, and the dict is looked
        up next if this handle has not done it yet.
        """
        if key is not _NO_KEY:
            if type(key) in _PLAIN_TYPES:
                match_key, _ = encode_request_key(key, self._label)  # no handle can hide in a plain key
            else:
                match_key, _ = yield from self._encode(encode_request_key, key, self._label)
            args = (match_key, *args)

        object_id = self._id
        if object_id is None or not self._environment_name:
            object_id = yield from self._hydrated()
        return Request(op, object_id, *args, write=write)

    def _reply_error(self, error: Exception) -> Exception:
        """Return the error to raise for an error reply about this dict.

        A ``NotFoundError`` becomes one that reports the dict as deleted since its lookup.
        A ``ConnectionLostError``, ``DaemonUnavailableError`` or ``RequestSizeError`` from
        the transport gets the dict's label in front of its message.
        """
        if isinstance(error, NotFoundError):
            return NotFoundError(self._deleted_message())
        return type(error)(f"{self._label}: {error}")

    def _key_request(self, op: str, key: Any) -> Request | None:
        """Return the read ``op`` of ``key``, or None when it needs a lookup first.

        No lookup is needed once the handle has looked its dict up, for a key of a plain
        type, in which no handle can hide. The reads of a single key, which a gather
        makes by the thousand, call this before ``_prepared``: delegating to a generator,
        even one that never yields, costs every call a generator object and an extra
        frame at each step.
        """
        object_id = self._id
        if object_id is None or not self._environment_name or type(key) not in _PLAIN_TYPES:
            return None
        match_key, _ = encode_request_key(key, self._label)
        return Request(op, object_id, match_key)

    def _deleted_message(self) -> str:
        if self._name is None:
            return (
                f"dict {_hex_id(self._id)} not found: no dict has this id, or it was deleted; an ephemeral dict "
                "is deleted when its `with` block exits or when the process that created it exits"
            )
        return (
            f"dict {self._name!r} ({_hex_id(self._id)}) in environment {self._environment_name!r} was deleted; "
            "a handle never reaches a dict created later under the same name, so get a new handle with "
            f"{self._name_call('Dict.from_name')}"
        )

    def _apply_record(self, record: dict[str, Any]) -> None:
        self._id = record["id"]
        if self._name is None and record["name"] is not None:
            self._name = record["name"]
        self._environment_name = record["env"]
        created_at = datetime.datetime.fromtimestamp(record["created_at"], tz=datetime.timezone.utc).astimezone()
        self._info = DictInfo(name=record["name"], created_at=created_at, created_by=record["created_by"])
        self._label = self._describe()

    def _hydrated(self) -> Generator[Request, Any, bytes]:
        """Look the dict up on first use (or create it) and return its id."""
        if self._id is not None and self._environment_name:
            return self._id
        if self._id is not None:
            # A handle made by ``from_id`` learns its name and environment on first use.
            try:
                record = yield Request(protocol.DICT_BY_ID, self._id)
            except NotFoundError:
                raise NotFoundError(self._deleted_message()) from None
            self._apply_record(record)
            return self._id
        try:
            record = yield Request(protocol.DICT_OPEN, self._environment_name, self._name)
        except NotFoundError:
            if not self._create_if_missing:
                raise NotFoundError(
                    f"dict {self._name!r} not found in environment {self._environment_name!r}; create it with "
                    f"{self._name_call('Dict.from_name', ', create_if_missing=True')} or "
                    f"{self._name_call('Dict.objects.create')}"
                ) from None
            # Marked as no write, so that a lost reply sends it again. With exist_ok, a
            # second create finds the dict that the first one made and changes nothing.
            record, _ = yield Request(protocol.DICT_CREATE, self._environment_name, self._name, True)
        self._apply_record(record)
        return self._id

    # Management.

    @operation
    def hydrate(self, client: Client | None = None) -> Generator[Request, Any, Dict]:
        """Look the dict up now (or create it); raises ``NotFoundError`` if it is missing.

        A ``client`` given here serves every later call of this handle.
        """
        if client is not None:
            self._client = client
        yield from self._hydrated()
        return self

    @operation
    def info(self) -> Generator[Request, Any, DictInfo]:
        """Return the dict's name, creation time (an aware datetime) and creating OS user."""
        if self._id is None or not self._environment_name:
            yield from self._hydrated()  # the lookup brings the facts along
            return self._info
        # Asked again on every later call, so that a dict deleted since raises NotFoundError.
        self._apply_record((yield from self._request(protocol.DICT_BY_ID)))
        return self._info

    @operation
    def clear(self) -> Generator[Request, Any, None]:
        """Remove every entry, atomically."""
        yield from self._request(protocol.CLEAR, write=True)

    # Reads.

    @operation
    def get(self, key: Any, default: Any = None) -> Generator[Request, Any, Any]:
        """Return the value of ``key``, or ``default`` when the key is missing."""
        request = self._key_request(protocol.GET, key) or (yield from self._prepared(protocol.GET, key=key))
        try:
            found, data = yield request
        except _REPLY_ERRORS as exc:
            raise self._reply_error(exc) from None
        if not found:
            return default
        return decode_value(data, key, self._label)

    @operation
    def __getitem__(self, key: Any) -> Generator[Request, Any, Any]:
        """Return the value of ``key``; raises ``KeyError`` when the key is missing."""
        request = self._key_request(protocol.GET, key) or (yield from self._prepared(protocol.GET, key=key))
        try:
            found, data = yield request
        except _REPLY_ERRORS as exc:
            raise self._reply_error(exc) from None
        if not found:
            raise KeyError(key)
        return decode_value(data, key, self._label)

    @operation
    def contains(self, key: Any) -> Generator[Request, Any, bool]:
        """Return whether ``key`` is present."""
        request = self._key_request(protocol.CONTAINS, key) or (yield from self._prepared(protocol.CONTAINS, key=key))
        try:
            return (yield request)
        except _REPLY_ERRORS as exc:
            raise self._reply_error(exc) from None

    __contains__ = contains

    @operation
    def len(self) -> Generator[Request, Any, int]:
        """Return the exact number of entries, without scanning the dict."""
        return (yield from self._request(protocol.LEN))

    __len__ = len

    # Writes. Each returns once it is durable.

    @operation
    def put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> Generator[Request, Any, bool]:
        """Store ``value`` under ``key``.

        With ``skip_if_exists=True`` this is an atomic insert-if-absent: it returns True
        when this call inserted the key, and False, storing nothing, when the key was
        present. Otherwise it returns True.
        """
        match_key, stored_key = yield from self._encode(encode_request_key, key, self._label)
        data = yield from self._encode(encode_request_value, key, value, self._label)
        return (yield from self._request(protocol.PUT, match_key, stored_key, data, bool(skip_if_exists), write=True))

    @operation
    def __setitem__(self, key: Any, value: Any) -> Generator[Request, Any, None]:
        """Store ``value`` under ``key``."""
        match_key, stored_key = yield from self._encode(encode_request_key, key, self._label)
        data = yield from self._encode(encode_request_value, key, value, self._label)
        yield from self._request(protocol.PUT, match_key, stored_key, data, False, write=True)

    @operation
    def update(self, other: Any = None, /, **kwargs: Any) -> Generator[Request, Any, None]:
        """Store many entries in one atomic write: all of them or none.

        ``other`` is a mapping or an iterable of (key, value) pairs, as for
        ``dict.update``; keyword arguments come after it and win on equal keys.
        """
        items: list[tuple[Any, Any]] = []
        if other is not None:
            if type(other) is dict:
                items.extend(other.items())  # the same pairs as below, read faster
            elif hasattr(other, "keys"):
                items.extend((key, other[key]) for key in other.keys())
            else:
                for position, pair in enumerate(other):
                    try:
                        key, value = pair
                    except (TypeError, ValueError):
                        raise TypeError(
                            f"update() element {position} is {pair!r}, not a (key, value) pair; "
                            "pass a mapping or an iterable of pairs"
                        ) from None
                    items.append((key, value))
        items.extend(kwargs.items())
        entries = yield from self._encode(encode_update, items, self._label)
        yield from self._request(protocol.UPDATE, entries, write=True)

    @operation
    def pop(self, key: Any, default: Any = _MISSING) -> Generator[Request, Any, Any]:
        """Remove ``key`` and return its value in one step.

        A missing key returns ``default`` when one is given, and raises ``KeyError``
        otherwise. A value that cannot be unpickled here raises ``DeserializationError``
        after the entry was removed.
        """
        found, data = yield from self._request(protocol.POP, key=key, write=True)
        if not found:
            if default is _MISSING:
                raise KeyError(key)
            return default
        try:
            return decode_value(data, key, self._label)
        except DeserializationError as exc:
            raise DeserializationError(f"{exc}; pop() has removed the entry") from exc.__cause__

    @operation
    def __delitem__(self, key: Any) -> Generator[Request, Any, None]:
        """Remove ``key``; raises ``KeyError`` when the key is missing."""
        found, _ = yield from self._request(protocol.POP, key=key, write=True)
        if not found:
            raise KeyError(key)

    # Iteration: pages of entries in insertion order, so memory stays bounded. The next
    # page is requested before the caller gets the items of this one, so the daemon reads
    # it meanwhile. At most two pages are held at a time.

    def _scan(self, decode_page: Callable[[list[list[Any]], str], Iterator[Any]], values: bool) -> OperationBody:
        # Keys always come along: a value that fails to unpickle is named by its key.
        page = yield from self._request(protocol.SCAN, 0, PAGE_SIZE, True, values)
        object_id = self._id
        while True:
            entries, done = page
            if done or not entries:
                yield Items(decode_page(entries, self._label))
                return
            next_page = Request(protocol.SCAN, object_id, entries[-1][0], PAGE_SIZE, True, values)
            try:
                page = yield Items(decode_page(entries, self._label), prefetch=next_page)
            except NotFoundError:
                raise NotFoundError(self._deleted_message()) from None

    @iteration
    def keys(self) -> Generator[Any, Any, None]:
        """Yield the keys in insertion order; reading keys does not count as activity."""
        yield from self._scan(decode_keys, values=False)

    @iteration
    def values(self) -> Generator[Any, Any, None]:
        """Yield the values in insertion order."""
        yield from self._scan(decode_values, values=True)

    @iteration
    def items(self) -> Generator[Any, Any, None]:
        """Yield (key, value) pairs in insertion order."""
        yield from self._scan(decode_items, values=True)

    __iter__ = keys

    def __reversed__(self) -> Iterator[Any]:
        # Without this method, reversed() would fall back to the sequence protocol and
        # read d[len(d) - 1] down to d[0]: values of int keys, or a KeyError.
        raise TypeError(
            "a Dict cannot be iterated in reverse; use `reversed(list(d.keys()))`, which reads every key first"
        )


def _restore_dict(object_id: str, name: str | None, environment_name: str) -> Dict:
    return Dict._handle(name=name, environment_name=environment_name, object_id=_parse_id(object_id))


_ASYNC_WITH_EPHEMERAL = "async with Dict.ephemeral() as d"


class EphemeralDict:
    """The context manager of ``Dict.ephemeral()``, for ``with`` and ``async with``."""

    def __init__(self, client: Client | None, environment_name: str) -> None:
        self._client = check_client(client)
        self._environment_name = environment_name
        self._dict: Dict | None = None

    @operation
    def _create(self) -> Generator[Request, Any, Dict]:
        # Marked as no write, so that a lost reply sends it again. A dict that the lost
        # request made belongs to this process, and the daemon deletes it when the process exits.
        record = yield Request(protocol.DICT_EPHEMERAL, self._environment_name)
        handle = Dict._handle(name=None, environment_name=self._environment_name, client=self._client)
        handle._apply_record(record)
        self._dict = handle
        return handle

    @operation
    def _delete(self) -> Generator[Request, Any, None]:
        if self._dict is not None:
            try:
                yield Request(protocol.DICT_DELETE, self._dict._id, write=True)
            except NotFoundError:
                pass

    def __enter__(self) -> Dict:
        _warn_if_in_event_loop("EphemeralDict._create", _ASYNC_WITH_EPHEMERAL, "`with Dict.ephemeral()`")
        return self._create()

    def __exit__(self, *exc_info: Any) -> None:
        _warn_if_in_event_loop("EphemeralDict._delete", _ASYNC_WITH_EPHEMERAL, "`with Dict.ephemeral()`")
        self._delete()

    async def __aenter__(self) -> Dict:
        return await self._create.aio()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._delete.aio()
