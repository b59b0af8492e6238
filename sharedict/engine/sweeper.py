"""The background sweeper: removes expired entries and the entries of cleared dicts.

Expired entries are invisible from the moment they expire; the sweeper only reclaims
their space. It works in bounded batches, each a write of its own through the group
commit writer, so requests keep flowing between batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import lmdb

from sharedict.engine.store import _U64, _STATS, Store, _unpack_order
from sharedict.engine.writer import GroupCommitWriter

logger = logging.getLogger(__name__)

SWEEP_BATCH = 1000


def sweep_expired(store: Store, txn: lmdb.Transaction, limit: int) -> int:
    """Remove up to ``limit`` expired entries; return how many were removed."""
    if store.expire_after <= 0:
        return 0
    cutoff_ms = store.now_ms() - int(store.expire_after * 1000)
    removed = 0

    for data_id, _ in list(txn.cursor(db=store._stats)):
        cutoff = data_id + _U64.pack(max(0, cutoff_ms + 1))
        expired = []
        with txn.cursor(db=store._access) as cursor:
            if cursor.set_range(data_id):
                for access_key in cursor.iternext(values=False):
                    if access_key >= cutoff or not access_key.startswith(data_id):
                        break
                    expired.append(access_key)
                    if removed + len(expired) >= limit:
                        break

        for access_key in expired:
            seq_bytes = access_key[16:24]
            order_key = data_id + seq_bytes
            _, ref, _ = _unpack_order(txn.get(order_key, db=store._order))
            txn.delete(data_id + ref, db=store._index)
            txn.delete(order_key, db=store._order)
            txn.delete(access_key, db=store._access)
        if expired:
            count, next_seq = _STATS.unpack(txn.get(data_id, db=store._stats))
            txn.put(data_id, _STATS.pack(count - len(expired), next_seq), db=store._stats)
            removed += len(expired)
        if removed >= limit:
            break
    return removed


def sweep_garbage(store: Store, txn: lmdb.Transaction, limit: int) -> int:
    """Remove up to ``limit`` records of cleared or deleted dicts; return how many."""
    removed = 0
    for data_id in list(txn.cursor(db=store._garbage).iternext(values=False)):
        for db in (store._index, store._order, store._access):
            with txn.cursor(db=db) as cursor:
                while removed < limit and cursor.set_range(data_id) and cursor.key().startswith(data_id):
                    cursor.delete()
                    removed += 1
        if removed >= limit:
            break
        txn.delete(data_id, db=store._garbage)
    return removed


class Sweeper:
    """Runs sweeps every ``interval`` seconds on a thread of its own.

    Args:
        store: the store to sweep.
        writer: the writer that applies each batch.
        interval: seconds between sweeps.
        on_idle: called once per sweep, for housekeeping such as reaping the ephemeral
            dicts of processes that are gone.
    """

    def __init__(
        self,
        store: Store,
        writer: GroupCommitWriter,
        interval: float,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.writer = writer
        self.interval = interval
        self.on_idle = on_idle
        self.last_sweep_at: float | None = None
        self.swept_entries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sharedict-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def sweep_once(self) -> int:
        """Sweep until nothing is left to remove; return the number of expired entries removed."""
        expired_total = 0
        while not self._stop.is_set():
            expired = self.writer.call(lambda txn: sweep_expired(self.store, txn, SWEEP_BATCH))
            garbage = self.writer.call(lambda txn: sweep_garbage(self.store, txn, SWEEP_BATCH))
            expired_total += expired
            if expired < SWEEP_BATCH and garbage < SWEEP_BATCH:
                break
        self.swept_entries += expired_total
        self.last_sweep_at = time.time()
        if expired_total:
            logger.info("sweep removed %d expired entries", expired_total)
        return expired_total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep_once()
                if self.on_idle is not None:
                    self.on_idle()
            except Exception:
                logger.exception("sweep failed; retrying after %s s", self.interval)
