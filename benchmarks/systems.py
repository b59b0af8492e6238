"""The systems under test, each behind the same small dict interface.

A *variant* is one system in one configuration, such as Redis with ``appendfsync
always``. Each variant declares whether a write is durable when the call returns;
``python -m benchmarks --check-durability`` checks every declaration with strace.

Every store maps one named dict of the benchmark onto the system's closest equivalent:

| system     | a named dict is                                 | get / set                | update                      | items                 |
| ---------- | ----------------------------------------------- | ------------------------ | --------------------------- | --------------------- |
| sharedict  | a ``Dict``                                      | ``d.get(k)``, ``d[k] = v`` | ``d.update(m)``           | ``d.items()``         |
| diskcache  | a ``diskcache.Index`` in a directory            | ``i[k]``, ``i[k] = v``   | ``i.update(m)`` in ``transact()`` | ``i.items()``  |
| sqlitedict | a table of a ``SqliteDict(autocommit=True)``    | ``d[k]``, ``d[k] = v``   | ``d.update(m)``             | ``d.items()``         |
| redis      | a hash, through redis-py                        | HGET, HSET               | one HSET of the mapping     | HSCAN, 1,000 a page   |
| lmdb       | an environment, through py-lmdb                 | one txn per call         | one write txn               | a cursor in one txn   |

Stores that are not Python-aware (Redis and LMDB) take str values as UTF-8 bytes and
return bytes; the others return the stored object.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

SYSTEMS = ("sharedict", "diskcache", "sqlitedict", "redis", "lmdb")

# LMDB reserves this much address space; the file grows only as data arrives.
LMDB_MAP_SIZE = 16 << 30
REDIS_SCAN_PAGE = 1000


@dataclass(frozen=True)
class Variant:
    """One system in one configuration.

    ``durable`` states whether a write is on disk when the call returns: fsynced by the
    system before it acknowledges the write.
    """

    name: str
    system: str
    durable: bool
    description: str
    # Left out of the hash, so that variants can be dict keys; the names are unique.
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)


SHAREDICT = Variant("sharedict", "sharedict", True, "daemon, group commit with fsync before each reply")
DISKCACHE = Variant("diskcache", "diskcache", False, "Index, default settings: SQLite WAL, synchronous=NORMAL")
DISKCACHE_FULL = Variant(
    "diskcache full",
    "diskcache",
    True,
    "Index with sqlite_synchronous=2: SQLite WAL, synchronous=FULL",
    {"sqlite_synchronous": 2},
)
SQLITEDICT = Variant(
    "sqlitedict",
    "sqlitedict",
    False,
    "autocommit=True, which commits each write; sqlitedict sets PRAGMA synchronous=OFF",
)
REDIS_ALWAYS = Variant("redis always", "redis", True, "AOF with appendfsync always", {"appendfsync": "always"})
REDIS_EVERYSEC = Variant(
    "redis everysec", "redis", False, "AOF with appendfsync everysec", {"appendfsync": "everysec"}
)
LMDB = Variant("lmdb", "lmdb", True, "py-lmdb, sync=True (the default), one txn per call")

VARIANTS = (SHAREDICT, DISKCACHE, DISKCACHE_FULL, SQLITEDICT, REDIS_ALWAYS, REDIS_EVERYSEC, LMDB)


@dataclass(frozen=True)
class StoreSpec:
    """The location of a variant's named dict; picklable, so that worker processes open it too.

    ``address`` is the server's socket path for sharedict and Redis, and a directory for
    the embedded stores.
    """

    variant: Variant
    address: str
    name: str

    def open(self) -> Store:
        opener = _OPENERS[self.variant.system]
        return opener(self)


class Store:
    """A named dict of one system."""

    def set(self, key: str, value: Any) -> None:
        raise NotImplementedError

    def get(self, key: str) -> Any:
        raise NotImplementedError

    def update(self, entries: Mapping[str, Any]) -> None:
        """Store all entries in one call, atomically where the system can."""
        raise NotImplementedError

    def items(self) -> Iterator[tuple[Any, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SharedictStore(Store):
    def __init__(self, spec: StoreSpec) -> None:
        from sharedict import Client, Dict
        from sharedict.api.config import Settings

        # The data directory only matters for auto-start, which stays off: the suite
        # starts the daemon itself.
        settings = Settings(socket_path=spec.address, data_dir=os.path.dirname(spec.address), autostart=False)
        self.client = Client(settings)
        self.dict = Dict.from_name(spec.name, create_if_missing=True, client=self.client)
        self.dict.hydrate()

    def set(self, key: str, value: Any) -> None:
        self.dict[key] = value

    def get(self, key: str) -> Any:
        return self.dict.get(key)

    def update(self, entries: Mapping[str, Any]) -> None:
        self.dict.update(entries)

    def items(self) -> Iterator[tuple[Any, Any]]:
        return self.dict.items()

    def close(self) -> None:
        self.client.close()


class DiskcacheStore(Store):
    def __init__(self, spec: StoreSpec) -> None:
        import diskcache

        # Index creates its Cache with eviction_policy="none"; fromcache keeps that and
        # adds the variant's settings.
        self.cache = diskcache.Cache(
            os.path.join(spec.address, spec.name), eviction_policy="none", **spec.variant.options
        )
        self.index = diskcache.Index.fromcache(self.cache)

    def set(self, key: str, value: Any) -> None:
        self.index[key] = value

    def get(self, key: str) -> Any:
        return self.index[key]

    def update(self, entries: Mapping[str, Any]) -> None:
        with self.index.transact():
            self.index.update(entries)

    def items(self) -> Iterator[tuple[Any, Any]]:
        return iter(self.index.items())

    def close(self) -> None:
        self.cache.close()


class SqlitedictStore(Store):
    def __init__(self, spec: StoreSpec) -> None:
        from sqlitedict import SqliteDict

        os.makedirs(spec.address, exist_ok=True)
        self.dict = SqliteDict(os.path.join(spec.address, "sqlitedict.db"), tablename=spec.name, autocommit=True)

    def set(self, key: str, value: Any) -> None:
        self.dict[key] = value

    def get(self, key: str) -> Any:
        return self.dict[key]

    def update(self, entries: Mapping[str, Any]) -> None:
        self.dict.update(entries)

    def items(self) -> Iterator[tuple[Any, Any]]:
        return self.dict.items()

    def close(self) -> None:
        self.dict.close()


class RedisStore(Store):
    def __init__(self, spec: StoreSpec) -> None:
        import redis

        self.client = redis.Redis(unix_socket_path=spec.address)
        self.hash = spec.name

    def set(self, key: str, value: Any) -> None:
        self.client.hset(self.hash, key, value)

    def get(self, key: str) -> Any:
        return self.client.hget(self.hash, key)

    def update(self, entries: Mapping[str, Any]) -> None:
        self.client.hset(self.hash, mapping=entries)

    def items(self) -> Iterator[tuple[Any, Any]]:
        return self.client.hscan_iter(self.hash, count=REDIS_SCAN_PAGE)

    def close(self) -> None:
        self.client.close()


def _to_bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else value


class LmdbStore(Store):
    def __init__(self, spec: StoreSpec) -> None:
        import lmdb

        path = os.path.join(spec.address, spec.name)
        os.makedirs(path, exist_ok=True)
        self.env = lmdb.open(path, map_size=LMDB_MAP_SIZE, sync=True)

    def set(self, key: str, value: Any) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(key.encode(), _to_bytes(value))

    def get(self, key: str) -> Any:
        with self.env.begin() as txn:
            return txn.get(key.encode())

    def update(self, entries: Mapping[str, Any]) -> None:
        with self.env.begin(write=True) as txn:
            txn.cursor().putmulti((key.encode(), _to_bytes(value)) for key, value in entries.items())

    def items(self) -> Iterator[tuple[Any, Any]]:
        with self.env.begin() as txn:
            yield from txn.cursor()

    def close(self) -> None:
        self.env.close()


_OPENERS = {
    "sharedict": SharedictStore,
    "diskcache": DiskcacheStore,
    "sqlitedict": SqlitedictStore,
    "redis": RedisStore,
    "lmdb": LmdbStore,
}
