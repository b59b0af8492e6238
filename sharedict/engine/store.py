"""Named dicts and their entries in one LMDB environment.

``layout.py`` describes the sub-databases and their records. In short: a dict's entries
live under its *data id*, an entry is found by its *key ref* and ordered by its
*sequence number*, and a last-access index orders entries by time for expiry.

Every method that takes a ``txn`` runs inside it and commits nothing. Write transactions
belong to the writer thread (see ``writer.py``); readers use ``Store.reader()``.
"""


from __future__ import annotations

import logging
import mmap
import os
import secrets
import time
from collections.abc import Callable

import lmdb

from sharedict.engine.errors import DictExists, DictNotFound, EngineError, EntryNotFound, StorageFull
from sharedict.engine.expiry import ExpiryPolicy
from sharedict.engine.gate import ResizeGate
from sharedict.engine.layout import (
    FORMAT_VERSION,
    HASHED,
    INLINE,
    INLINE_KEY_LIMIT,
    MAX_SEQ,
    STATS,
    U64,
    DictRecord,
    Entry,
    Touch,
    key_ref,
    last_with_prefix,
    name_key,
    pack_order,
    successor,
    unpack_order,
)

logger = logging.getLogger(__name__)

INITIAL_MAP_SIZE = 1 << 30
# The map grows when a write could bring it past this share of its size.
GROW_THRESHOLD = 0.75
# After a failed attempt to grow the map, writes try again ahead of time only after this
# many seconds, so that a map that cannot grow does not log a warning per commit.
GROW_RETRY_SECONDS = 60.0
# Unpacked dict records are kept for this many dicts; every request needs its dict's.
RECORD_CACHE_SIZE = 4096


class Store:
    """The LMDB environment of one data directory, with named dicts and their entries.

    Args:
        data_dir: directory of the environment; created if missing.
        expire_after: seconds without activity after which an entry expires; 0 disables
            expiry.
        clock: wall-clock time in seconds, injectable for tests.
        map_size: initial size of the memory map in bytes; it grows as needed.

    Raises:
        ValueError: if ``expire_after`` is negative, infinite or NaN.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        expire_after: float = 0.0,
        clock: Callable[[], float] = time.time,
        map_size: int = INITIAL_MAP_SIZE,
    ) -> None:
        self.data_dir = os.fspath(data_dir)
        self.expiry = ExpiryPolicy(expire_after, clock)
        self._clock = clock
        self._gate = ResizeGate()
        self._growth_failed_at: float | None = None
        # Object id -> (packed record, record). A hit still reads the packed record in
        # the request's transaction, so a dict cleared or deleted since is never missed.
        self._records: dict[bytes, tuple[bytes, DictRecord]] = {}

        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        self._open(map_size)
        self._check_format()

    def _open(self, map_size: int) -> None:
        self.env = lmdb.open(
            self.data_dir,
            map_size=map_size,
            max_dbs=16,
            max_readers=1024,
            sync=True,
            metasync=True,
            readahead=False,
            meminit=False,
            # New files are private to the user, whatever the directory's mode.
            mode=0o600,
        )
        self._names = self.env.open_db(b"names")
        self._dicts = self.env.open_db(b"dicts")
        self._stats = self.env.open_db(b"stats")
        self._index = self.env.open_db(b"index")
        self._order = self.env.open_db(b"order")
        self._access = self.env.open_db(b"access")
        self._garbage = self.env.open_db(b"garbage")
        self._meta = self.env.open_db(b"meta")
        self._page_size = self.env.stat()["psize"]

    def close(self) -> None:
        self.env.close()

    def _check_format(self) -> None:
        with self.env.begin(write=True) as txn:
            stored = txn.get(b"format", db=self._meta)
            if stored is None:
                txn.put(b"format", U64.pack(FORMAT_VERSION), db=self._meta)
            elif U64.unpack(stored)[0] != FORMAT_VERSION:
                raise EngineError(
                    f"data directory {self.data_dir} has format {U64.unpack(stored)[0]}, and this version of "
                    f"sharedict reads format {FORMAT_VERSION}; upgrade sharedict or use another data directory"
                )

    # Transactions and the map.

    def reader(self) -> ReadTransaction:
        """Open a short read transaction for a ``with`` block: one request, not a whole scan."""
        return ReadTransaction(self, self._gate)

    def begin_write(self) -> lmdb.Transaction:
        """Open the write transaction; only the writer thread may call this."""
        return self.env.begin(write=True)

    def ensure_room(self, incoming_bytes: int) -> None:
        """Grow the map ahead of time when ``incoming_bytes`` more could fill it.

        Call between write transactions, from the writer thread.
        """
        info = self.env.info()
        used = (info["last_pgno"] + 1) * self._page_size
        # Pages of a write are copied on write, and large values are written whole, so
        # a write may take about twice its size until older pages are reused.
        needed = used + 2 * incoming_bytes
        if needed <= info["map_size"] * GROW_THRESHOLD:
            return
        if self._growth_failed_at is not None and time.monotonic() - self._growth_failed_at < GROW_RETRY_SECONDS:
            return  # the write itself grows the map if it finds it full
        new_size = info["map_size"]
        while needed > new_size * GROW_THRESHOLD:
            new_size *= 2
        self.grow_map(new_size)

    def grow_map(self, new_size: int | None = None) -> None:
        """Set a larger map size while no transaction of this process is open.

        Raises ``StorageFull`` when the process lacks the address space for the larger
        map; the store keeps working at its old size.
        """
        old_size = self.env.info()["map_size"]
        new_size = new_size or old_size * 2
        try:
            _reserve_address_space(new_size - old_size)
        except OSError as exc:
            self._growth_failed_at = time.monotonic()
            raise StorageFull(
                f"cannot grow the map of {self.data_dir} from {old_size} to {new_size} bytes: the daemon's address "
                f"space is too small ({exc}); raise its limit (ulimit -v), or delete entries or dicts to make room"
            ) from exc

        with self._gate.exclusive():
            try:
                self.env.set_mapsize(new_size)
            except lmdb.Error as exc:
                # py-lmdb leaves the environment unusable after a failed remap, so open
                # it again at the size that worked.
                self.env.close()
                self._open(old_size)
                self._growth_failed_at = time.monotonic()
                raise StorageFull(f"cannot grow the map of {self.data_dir} to {new_size} bytes: {exc}") from exc
        self._growth_failed_at = None
        logger.warning("map grown from %d MiB to %d MiB", old_size >> 20, new_size >> 20)

    # Dicts.

    def create_dict(
        self,
        txn: lmdb.Transaction,
        environment_name: str,
        name: str | None,
        *,
        created_by: str,
        exist_ok: bool,
        owner_pid: int | None = None,
    ) -> tuple[DictRecord, bool]:
        """Create a dict, or with ``exist_ok`` return the one of this name.

        Returns the record and whether this call created it. A dict without a name is
        ephemeral and is deleted when ``owner_pid`` goes away.
        """
        if name is not None:
            names_key = name_key(environment_name, name)
            object_id = txn.get(names_key, db=self._names)
            if object_id is not None:
                if not exist_ok:
                    raise DictExists(f"dict {name!r} already exists in environment {environment_name!r}")
                return self._load_dict(txn, object_id), False

        object_id = self._new_id(txn, self._dicts)
        record = DictRecord(
            object_id=object_id,
            name=name,
            environment_name=environment_name,
            created_at=self._clock(),
            created_by=created_by,
            data_id=self._new_id(txn, self._stats),
            owner_pid=owner_pid,
        )
        txn.put(object_id, record.pack(), db=self._dicts)
        txn.put(record.data_id, STATS.pack(0, 1), db=self._stats)
        if name is not None:
            txn.put(names_key, object_id, db=self._names)
        return record, True

    def lookup_dict(self, txn: lmdb.Transaction, environment_name: str, name: str) -> DictRecord:
        object_id = txn.get(name_key(environment_name, name), db=self._names)
        if object_id is None:
            raise DictNotFound(f"dict {name!r} not found in environment {environment_name!r}")
        return self._load_dict(txn, object_id)

    def dict_by_id(self, txn: lmdb.Transaction, object_id: bytes) -> DictRecord:
        return self._load_dict(txn, object_id)

    def list_dicts(self, txn: lmdb.Transaction, environment_name: str | None = None) -> list[DictRecord]:
        """Return the named dicts, newest first; all environments when none is given."""
        prefix = b"" if environment_name is None else environment_name.encode() + b"\x00"
        records = []
        with txn.cursor(db=self._names) as cursor:
            if cursor.set_range(prefix):
                for names_key, object_id in cursor:
                    if not names_key.startswith(prefix):
                        break
                    records.append(self._load_dict(txn, object_id))
        records.sort(key=lambda record: record.created_at, reverse=True)
        return records

    def ephemeral_dicts(self, txn: lmdb.Transaction) -> list[DictRecord]:
        records = []
        for object_id, raw in txn.cursor(db=self._dicts):
            record = DictRecord.unpack(object_id, raw)
            if record.owner_pid is not None:
                records.append(record)
        return records

    def delete_dict(self, txn: lmdb.Transaction, object_id: bytes) -> DictRecord:
        """Delete a dict; its entries go to the background sweeper."""
        record = self._load_dict(txn, object_id)
        txn.delete(object_id, db=self._dicts)
        if record.name is not None:
            txn.delete(name_key(record.environment_name, record.name), db=self._names)
        self._discard_data(txn, record.data_id)
        return record

    def count_dicts(self, txn: lmdb.Transaction) -> int:
        return txn.stat(self._dicts)["entries"]

    def count_entries(self, txn: lmdb.Transaction) -> int:
        """Return the entries of all dicts, counting expired ones that are not swept yet."""
        return sum(STATS.unpack(raw)[0] for raw in txn.cursor(db=self._stats).iternext(keys=False))

    def _load_dict(self, txn: lmdb.Transaction, object_id: bytes) -> DictRecord:
        raw = txn.get(object_id, db=self._dicts)
        if raw is None:
            raise DictNotFound(f"dict di-{object_id.hex()} not found: no dict has this id, or it was deleted")
        cached = self._records.get(object_id)
        if cached is not None and cached[0] == raw:
            return cached[1]
        record = DictRecord.unpack(object_id, raw)
        if len(self._records) >= RECORD_CACHE_SIZE:
            self._records.clear()
        self._records[object_id] = (raw, record)
        return record

    def _new_id(self, txn: lmdb.Transaction, db: object) -> bytes:
        # Random ids are never reused, so a handle kept across a delete and a re-create
        # of the same name can never reach the new dict.
        while True:
            new_id = secrets.token_bytes(8)
            if txn.get(new_id, db=db) is None and txn.get(new_id, db=self._garbage) is None:
                return new_id

    def _discard_data(self, txn: lmdb.Transaction, data_id: bytes) -> None:
        txn.delete(data_id, db=self._stats)
        txn.put(data_id, b"", db=self._garbage)

    # Entries: reads.

    def get(self, txn: lmdb.Transaction, object_id: bytes, match_key: bytes) -> tuple[bytes, Touch | None]:
        """Return the value of a key, and the access to record for it, if one is due.

        Raises ``EntryNotFound`` when the key is missing or its entry has expired.
        """
        record = self._load_dict(txn, object_id)
        now_ms = self.expiry.now_ms()
        found = self._find(txn, record.data_id, match_key, now_ms)
        if found is None:
            raise EntryNotFound
        seq, value, access_ms = found
        return value, self._due_touch(record.data_id, match_key, seq, access_ms, now_ms)

    def contains(self, txn: lmdb.Transaction, object_id: bytes, match_key: bytes) -> tuple[bool, Touch | None]:
        """Return whether the key is present, and the access to record for it, if one is due."""
        record = self._load_dict(txn, object_id)
        now_ms = self.expiry.now_ms()
        found = self._find(txn, record.data_id, match_key, now_ms)
        if found is None:
            return False, None
        seq, _, access_ms = found
        return True, self._due_touch(record.data_id, match_key, seq, access_ms, now_ms)

    def length(self, txn: lmdb.Transaction, object_id: bytes) -> int:
        """Return the exact number of live entries.

        The count of all entries is kept with the dict. Entries that have expired but are
        not swept yet are subtracted by a range read of the last-access index, which costs
        at most twice the smaller of the expired and the live entries.
        """
        record = self._load_dict(txn, object_id)
        count, _ = STATS.unpack(txn.get(record.data_id, db=self._stats))
        if not self.expiry.enabled:
            return count
        return self._count_live(txn, record.data_id, count, self.expiry.cutoff_ms(self.expiry.now_ms()))

    def scan(
        self,
        txn: lmdb.Transaction,
        object_id: bytes,
        after_seq: int,
        *,
        limit: int,
        max_bytes: int,
        keys: bool,
        values: bool,
    ) -> tuple[list[Entry], list[Touch], bool]:
        """Read the next page of entries in insertion order, after ``after_seq``.

        Returns the entries, the accesses to record (values count as activity, keys
        alone do not), and whether the end of the dict was reached.
        """
        record = self._load_dict(txn, object_id)
        data_id = record.data_id
        now_ms = self.expiry.now_ms()
        entries: list[Entry] = []
        touched: list[Touch] = []
        size = 0
        if after_seq >= MAX_SEQ:
            return entries, touched, True  # no sequence number comes after the largest one

        # Both tests of the expiry policy, set up once per page.
        cutoff_ms = self.expiry.cutoff_ms(now_ms)
        is_recording_due = self.expiry.is_recording_due
        with txn.cursor(db=self._order) as cursor, txn.cursor(db=self._index) as index:
            if not cursor.set_range(data_id + U64.pack(after_seq + 1)):
                return entries, touched, True
            for order_key, order_value in cursor:
                if not order_key.startswith(data_id):
                    return entries, touched, True
                if len(entries) >= limit or size >= max_bytes:
                    return entries, touched, False

                access_ms, ref, stored_key = unpack_order(order_value)
                if access_ms < cutoff_ms:
                    continue  # expired, as ExpiryPolicy.is_expired() defines it
                seq = U64.unpack_from(order_key, 8)[0]

                value = None
                if values:
                    # A cursor get costs less than a transaction get with its db argument.
                    value = index.get(data_id + ref)[8:]
                    size += len(value)
                    if is_recording_due(access_ms, now_ms):
                        touched.append(Touch(data_id + ref, seq, now_ms))
                if keys:
                    size += len(stored_key)
                else:
                    stored_key = None
                entries.append(Entry(seq, stored_key, value))
        return entries, touched, True

    # Entries: writes. Each runs in the writer's transaction.

    def put(
        self,
        txn: lmdb.Transaction,
        object_id: bytes,
        match_key: bytes,
        stored_key: bytes | None,
        value: bytes,
        *,
        skip_if_exists: bool = False,
    ) -> bool:
        """Insert or overwrite an entry; return False if ``skip_if_exists`` found the key."""
        record = self._load_dict(txn, object_id)
        return self._put(txn, record.data_id, match_key, stored_key, value, skip_if_exists, self.expiry.now_ms())

    def update(
        self,
        txn: lmdb.Transaction,
        object_id: bytes,
        entries: list[tuple[bytes, bytes | None, bytes]],
    ) -> None:
        """Insert or overwrite many entries; the caller's transaction makes it all or nothing.

        New keys take consecutive sequence numbers, so their order and access records go
        through cursors that stay on the dict's last pages, and the dict's stats are read
        and written once, not once per entry. A key that is present goes through ``_put``,
        as the key of a single put does.
        """
        record = self._load_dict(txn, object_id)
        data_id = record.data_id
        now_ms = self.expiry.now_ms()
        access_prefix = data_id + U64.pack(now_ms)
        count, next_seq = STATS.unpack(txn.get(data_id, db=self._stats))
        saved_seq = next_seq

        with (
            txn.cursor(db=self._index) as index,
            txn.cursor(db=self._order) as order,
            txn.cursor(db=self._access) as access,
        ):
            # Bound once, because this loop runs once per entry of an update of up to
            # 10,000 entries.
            put_index, put_order, put_access, pack_seq = index.put, order.put, access.put, U64.pack
            for match_key, stored_key, value in entries:
                hashed = len(match_key) > INLINE_KEY_LIMIT
                ref = key_ref(match_key) if hashed else INLINE + match_key
                seq_bytes = pack_seq(next_seq)
                # Most keys of an update are new, so the insertion itself finds out
                # whether the key is present. The flags (dupdata=False, overwrite=False)
                # are positional because py-lmdb parses keyword arguments slowly.
                if not put_index(data_id + ref, seq_bytes + value, False, False):
                    # The key is present, or has expired but is not swept yet. _put reads
                    # the stats and may change them, so they are saved before and read after.
                    if next_seq != saved_seq:
                        txn.put(data_id, STATS.pack(count, next_seq), db=self._stats)
                    self._put(txn, data_id, match_key, stored_key, value, False, now_ms)
                    count, next_seq = STATS.unpack(txn.get(data_id, db=self._stats))
                    saved_seq = next_seq
                    continue

                if hashed and stored_key is None:
                    stored_key = match_key  # the digest in the ref cannot give the key back
                put_order(data_id + seq_bytes, pack_order(now_ms, ref, stored_key))
                put_access(access_prefix + seq_bytes, b"")
                count += 1
                next_seq += 1

        if next_seq != saved_seq:
            txn.put(data_id, STATS.pack(count, next_seq), db=self._stats)

    def pop(self, txn: lmdb.Transaction, object_id: bytes, match_key: bytes) -> bytes:
        """Remove an entry and return its value; ``EntryNotFound`` when missing."""
        record = self._load_dict(txn, object_id)
        found = self._find(txn, record.data_id, match_key, self.expiry.now_ms(), remove_expired=True)
        if found is None:
            raise EntryNotFound
        seq, value, access_ms = found
        self._remove(txn, record.data_id, key_ref(match_key), seq, access_ms)
        return value

    def clear(self, txn: lmdb.Transaction, object_id: bytes) -> None:
        """Remove every entry at once by giving the dict a fresh data id."""
        record = self._load_dict(txn, object_id)
        self._discard_data(txn, record.data_id)
        fresh = DictRecord(
            object_id=record.object_id,
            name=record.name,
            environment_name=record.environment_name,
            created_at=record.created_at,
            created_by=record.created_by,
            data_id=self._new_id(txn, self._stats),
            owner_pid=record.owner_pid,
        )
        txn.put(object_id, fresh.pack(), db=self._dicts)
        txn.put(fresh.data_id, STATS.pack(0, 1), db=self._stats)

    def touch(self, txn: lmdb.Transaction, touch: Touch) -> None:
        """Record the access of a read, unless its entry was removed or replaced since.

        The read saw the entry live at ``touch.read_ms``, so that time is recorded even if
        the entry expired while the touch waited for the writer: otherwise a read just
        before the deadline would not extend the entry's life. A write or a sweep that
        came first has removed the entry, and then nothing is recorded.
        """
        index_value = txn.get(touch.index_key, db=self._index)
        if index_value is None or U64.unpack_from(index_value)[0] != touch.seq:
            return
        data_id = touch.index_key[:8]
        access_ms, ref, stored_key = unpack_order(txn.get(data_id + U64.pack(touch.seq), db=self._order))

        # Reads that came before the first of their touches was applied each queued one;
        # only the first of them within a granularity is recorded.
        if not self.expiry.is_recording_due(access_ms, touch.read_ms):
            return
        self._set_access(txn, data_id, touch.seq, access_ms, ref, stored_key, touch.read_ms)

    # Entries: internals.

    def _find(
        self,
        txn: lmdb.Transaction,
        data_id: bytes,
        match_key: bytes,
        now_ms: int,
        remove_expired: bool = False,
    ) -> tuple[int, bytes, int] | None:
        """Return (seq, value, last access) of a live entry, or None.

        An expired entry found by a write is removed on the spot, so the write sees the
        key as absent.
        """
        ref = key_ref(match_key)
        index_value = txn.get(data_id + ref, db=self._index)
        if index_value is None:
            return None
        seq = U64.unpack_from(index_value)[0]
        access_ms = U64.unpack_from(txn.get(data_id + U64.pack(seq), db=self._order))[0]
        if self.expiry.is_expired(access_ms, now_ms):
            if remove_expired:
                self._remove(txn, data_id, ref, seq, access_ms)
            return None
        return seq, index_value[8:], access_ms

    def _put(
        self,
        txn: lmdb.Transaction,
        data_id: bytes,
        match_key: bytes,
        stored_key: bytes | None,
        value: bytes,
        skip_if_exists: bool,
        now_ms: int,
    ) -> bool:
        ref = key_ref(match_key)
        found = self._find(txn, data_id, match_key, now_ms, remove_expired=True)

        if found is not None:
            seq, _, access_ms = found
            if not skip_if_exists:
                # Overwriting keeps the position and the first key object, as a dict does.
                txn.put(data_id + ref, U64.pack(seq) + value, db=self._index)
            # Finding or overwriting the key is activity, recorded as a read's is: at
            # most once per granularity, so that an overwrite changes one record, not three.
            if self.expiry.is_recording_due(access_ms, now_ms):
                _, _, kept_key = unpack_order(txn.get(data_id + U64.pack(seq), db=self._order))
                self._set_access(txn, data_id, seq, access_ms, ref, kept_key, now_ms)
            return not skip_if_exists

        count, next_seq = STATS.unpack(txn.get(data_id, db=self._stats))
        seq = next_seq
        txn.put(data_id, STATS.pack(count + 1, next_seq + 1), db=self._stats)
        txn.put(data_id + ref, U64.pack(seq) + value, db=self._index)
        if stored_key is None and ref[:1] == HASHED:
            stored_key = match_key
        txn.put(data_id + U64.pack(seq), pack_order(now_ms, ref, stored_key), db=self._order)
        txn.put(data_id + U64.pack(now_ms) + U64.pack(seq), b"", db=self._access)
        return True

    def _remove(self, txn: lmdb.Transaction, data_id: bytes, ref: bytes, seq: int, access_ms: int) -> None:
        txn.delete(data_id + ref, db=self._index)
        txn.delete(data_id + U64.pack(seq), db=self._order)
        txn.delete(data_id + U64.pack(access_ms) + U64.pack(seq), db=self._access)
        count, next_seq = STATS.unpack(txn.get(data_id, db=self._stats))
        txn.put(data_id, STATS.pack(count - 1, next_seq), db=self._stats)

    def _set_access(
        self,
        txn: lmdb.Transaction,
        data_id: bytes,
        seq: int,
        old_access_ms: int,
        ref: bytes,
        stored_key: bytes | None,
        now_ms: int,
    ) -> None:
        # A wall clock that jumped backwards must not make the entry look older.
        new_access_ms = max(now_ms, old_access_ms)
        if new_access_ms == old_access_ms:
            return
        seq_bytes = U64.pack(seq)
        txn.delete(data_id + U64.pack(old_access_ms) + seq_bytes, db=self._access)
        txn.put(data_id + U64.pack(new_access_ms) + seq_bytes, b"", db=self._access)
        if ref[1:] == stored_key:
            stored_key = None
        txn.put(data_id + seq_bytes, pack_order(new_access_ms, ref, stored_key), db=self._order)

    def _due_touch(self, data_id: bytes, match_key: bytes, seq: int, access_ms: int, now_ms: int) -> Touch | None:
        if not self.expiry.is_recording_due(access_ms, now_ms):
            return None
        return Touch(data_id + key_ref(match_key), seq, now_ms)

    def _count_live(self, txn: lmdb.Transaction, data_id: bytes, count: int, cutoff_ms: int) -> int:
        """Count the entries of a dict whose last access is at or after ``cutoff_ms``.

        In the last-access index the expired entries of a dict come first and the live
        ones last. Two cursors walk in from both ends, one entry each per step. The walk
        stops when either group is done, because ``count`` gives the other group.
        """
        boundary = data_id + U64.pack(cutoff_ms)
        with txn.cursor(db=self._access) as oldest, txn.cursor(db=self._access) as newest:
            expired_left = oldest.set_range(data_id) and oldest.key() < boundary
            live_left = last_with_prefix(newest, data_id) and newest.key() >= boundary
            expired = live = 0
            while expired_left and live_left:
                expired += 1
                live += 1
                expired_left = oldest.next() and oldest.key() < boundary
                live_left = newest.prev() and newest.key() >= boundary
        return live if not live_left else count - expired

    # Sweeping. Each call is one bounded batch in the sweeper's write transaction.

    def remove_expired(self, txn: lmdb.Transaction, *, limit: int, start: bytes = b"") -> tuple[int, bytes | None]:
        """Remove up to ``limit`` expired entries, visiting dicts in data id order from ``start``.

        A batch also stops after visiting ``limit`` dicts, so that many dicts with nothing
        to remove cannot make it long. Returns the number of entries removed and the data
        id to resume from, or None once every dict has been visited.
        """
        if not self.expiry.enabled:
            return 0, None
        cutoff_ms = self.expiry.cutoff_ms(self.expiry.now_ms())
        removed = 0
        visited = 0
        position: bytes | None = start

        while position is not None and removed < limit and visited < limit:
            with txn.cursor(db=self._stats) as dicts:
                if not dicts.set_range(position):
                    return removed, None
                data_id = dicts.key()
            visited += 1

            # Deleting at the cursor leaves it on the next key, so the walk needs no seek.
            boundary = data_id + U64.pack(cutoff_ms)
            removed_here = 0
            with txn.cursor(db=self._access) as cursor:
                found = cursor.set_range(data_id)
                while found and removed < limit:
                    # Past the last key of the table, the cursor returns an empty key.
                    access_key = cursor.key()
                    if access_key >= boundary or not access_key.startswith(data_id):
                        break
                    order_key = data_id + access_key[16:24]
                    _, ref, _ = unpack_order(txn.pop(order_key, db=self._order))
                    txn.delete(data_id + ref, db=self._index)
                    found = cursor.delete()
                    removed += 1
                    removed_here += 1
            if removed_here:
                count, next_seq = STATS.unpack(txn.get(data_id, db=self._stats))
                txn.put(data_id, STATS.pack(count - removed_here, next_seq), db=self._stats)

            # A dict cut short by the limit is visited again by the next batch.
            position = data_id if removed == limit else successor(data_id)
        return removed, position

    def remove_garbage(self, txn: lmdb.Transaction, *, limit: int) -> int:
        """Remove up to ``limit`` records of the entries of cleared or deleted dicts; return how many."""
        removed = 0
        for data_id in list(txn.cursor(db=self._garbage).iternext(values=False)):
            for db in (self._index, self._order, self._access):
                with txn.cursor(db=db) as cursor:
                    while removed < limit and cursor.set_range(data_id) and cursor.key().startswith(data_id):
                        cursor.delete()
                        removed += 1
            if removed >= limit:
                break
            txn.delete(data_id, db=self._garbage)
        return removed

    # Counters.

    def next_counter(self, txn: lmdb.Transaction, name: bytes) -> int:
        """Increment and return a durable counter, such as the fencing token of a lock."""
        raw = txn.get(b"counter:" + name, db=self._meta)
        value = (U64.unpack(raw)[0] if raw else 0) + 1
        txn.put(b"counter:" + name, U64.pack(value), db=self._meta)
        return value


class ReadTransaction:
    """A read transaction that stays inside the resize gate while it is open."""

    __slots__ = ("_store", "_gate", "_txn")

    def __init__(self, store: Store, gate: ResizeGate) -> None:
        self._store = store
        self._gate = gate

    def __enter__(self) -> lmdb.Transaction:
        self._gate.enter_shared()
        try:
            # Read the environment only once inside the gate: a failed resize opens it anew.
            self._txn = self._store.env.begin()
        except BaseException:
            self._gate.leave_shared()
            raise
        return self._txn

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._txn.abort()
        finally:
            self._gate.leave_shared()


def _reserve_address_space(size: int) -> None:
    """Raise ``OSError`` unless ``size`` more bytes of address space can be mapped now.

    LMDB unmaps the old map before it maps the larger one, and when that fails the
    environment is lost. A reservation without access rights costs no memory, but the
    kernel refuses it under the same limits (``ulimit -v``) as the real map.
    """
    if size <= 0:
        return
    reservation = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=0)
    reservation.close()
