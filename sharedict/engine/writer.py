"""The writer thread: every write transaction of a store, with group commit.

Writes arrive from any number of threads as functions of a transaction. The writer takes
everything queued, applies it in one transaction and commits it with one fsync; writes
that arrive meanwhile wait for the next transaction and share its fsync. A write's
callback runs only after its transaction is durable, so a caller acknowledges nothing
that a crash could lose.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import lmdb

from sharedict.engine.errors import EngineError, StorageFull
from sharedict.engine.store import Store

logger = logging.getLogger(__name__)

WriteFunction = Callable[[lmdb.Transaction], Any]
Callback = Callable[[Any, BaseException | None], None]

# A batch stops growing at this many writes or bytes, so one fsync never waits on an
# unbounded transaction.
MAX_BATCH_WRITES = 20_000
MAX_BATCH_BYTES = 512 << 20

# Clients that write at the same time should share each fsync. Without a pause they split
# into groups that take turns: while one group's commit runs, the other group's writes
# queue up and form the next batch. So the writer waits briefly for the clients it has
# just acknowledged, if they write steadily (they had writes in at least GATHER_REPEATS
# of the last GATHER_HISTORY batches): at most GATHER_SHARE of the last commit's time,
# and at most MAX_GATHER_SECONDS. A single client, or one that writes now and then,
# never waits.
GATHER_HISTORY = 4
GATHER_REPEATS = 2
GATHER_SHARE = 0.5
MAX_GATHER_SECONDS = 0.0005

# A write that finds the store full first removes up to this many records of cleared or
# deleted dicts, in transactions of RECLAIM_BATCH records, so the writer pauses for a
# bounded time.
MAX_RECLAIM_RECORDS = 200_000
RECLAIM_BATCH = 2_000


class _Write:
    __slots__ = ("function", "callback", "size", "source")

    def __init__(self, function: WriteFunction, callback: Callback | None, size: int, source: object) -> None:
        self.function = function
        self.callback = callback
        self.size = size
        self.source = source


class GroupCommitWriter:
    """Owns the write transactions of a ``Store`` and commits queued writes together.

    Thread-safe: ``submit`` may be called from any thread. Callbacks run on the writer
    thread and must not block.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: deque[_Write] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sharedict-writer", daemon=True)
        self.commits = 0
        self.writes = 0
        # The sources of the writes of the last batches, and the last commit's time.
        self._batch_sources: deque[set[object]] = deque(maxlen=GATHER_HISTORY)
        self._commit_seconds = 0.0

    def start(self) -> None:
        self._thread.start()

    def submit(
        self, function: WriteFunction, callback: Callback | None = None, size: int = 0, source: object = None
    ) -> None:
        """Queue ``function(txn)``; ``callback(result, error)`` runs once it is durable.

        ``size`` is the number of bytes the write stores, used to grow the map in time.
        Without a callback the write is fire-and-forget, as for recording accesses.
        ``source`` names the client that waits for the write, such as its connection:
        a batch waits briefly for the clients that wrote in the last commits.
        """
        with self._cond:
            if self._stopping:
                raise EngineError("the store is shutting down; retry after it restarts")
            self._queue.append(_Write(function, callback, size, source))
            self._cond.notify()

    def call(self, function: WriteFunction, size: int = 0) -> Any:
        """Run ``function(txn)`` in the next commit and return its result once durable."""
        done = threading.Event()
        outcome: list[Any] = []

        def finish(result: Any, error: BaseException | None) -> None:
            outcome[:] = [result, error]
            done.set()

        self.submit(function, finish, size)
        done.wait()
        result, error = outcome
        if error is not None:
            raise error
        return result

    def stop(self) -> None:
        """Commit everything queued, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue and self._stopping:
                    return
                self._gather()
                batch = self._take_batch()
            started = time.monotonic()
            self._commit(batch)
            self._commit_seconds = time.monotonic() - started
            self._batch_sources.append({write.source for write in batch if write.source is not None})

    def _gather(self) -> None:
        """With the lock held, wait for the steady writers that the last commit acknowledged.

        Each submit wakes the wait. The wait ends once each of them has queued a write,
        after a share of the last commit's time, or when the writer stops.
        """
        if not self._batch_sources:
            return
        history = self._batch_sources
        missing = {
            source for source in history[-1] if sum(source in sources for sources in history) >= GATHER_REPEATS
        }
        missing.difference_update(write.source for write in self._queue)
        if not missing:
            return

        deadline = time.monotonic() + min(MAX_GATHER_SECONDS, GATHER_SHARE * self._commit_seconds)
        checked = len(self._queue)
        while missing and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)
            # Only this thread takes writes from the queue, so new ones are at its end.
            for position in range(checked, len(self._queue)):
                missing.discard(self._queue[position].source)
            checked = len(self._queue)

    def _take_batch(self) -> list[_Write]:
        batch = []
        size = 0
        while self._queue and len(batch) < MAX_BATCH_WRITES and size < MAX_BATCH_BYTES:
            write = self._queue.popleft()
            batch.append(write)
            size += write.size
        return batch

    def _commit(self, batch: list[_Write]) -> None:
        try:
            self.store.ensure_room(sum(write.size for write in batch))
        except (StorageFull, lmdb.Error) as exc:
            logger.warning("%s", exc)

        try:
            results = self._apply_together(batch)
            if results is None:
                # One write failed in a way that spoils the transaction: apply each
                # alone, so that only the faulty one fails.
                results = [self._apply_alone(write) for write in batch]
        except Exception as exc:
            # The writer thread must survive an error in any batch, or every later
            # write would wait for it forever.
            logger.exception("a batch of %d writes failed", len(batch))
            results = [(None, exc)] * len(batch)

        self.commits += 1
        self.writes += len(batch)
        for write, (result, error) in zip(batch, results):
            if write.callback is not None:
                try:
                    write.callback(result, error)
                except Exception:
                    logger.exception("write callback failed")

    def _apply_together(self, batch: list[_Write]) -> list[tuple[Any, BaseException | None]] | None:
        """Apply a batch in one transaction; None when it must be split."""
        for attempt in range(2):
            txn = self.store.begin_write()
            results: list[tuple[Any, BaseException | None]] = []
            try:
                for write in batch:
                    try:
                        results.append((write.function(txn), None))
                    except EngineError as exc:
                        # Engine errors are raised before a write changes anything.
                        results.append((None, exc))
                txn.commit()
                return results
            except lmdb.MapFullError:
                txn.abort()
                if attempt == 0:
                    self._grow()
                    continue
                return None
            except lmdb.Error as exc:
                # A full disk fails the commit; each write then gets its own error.
                txn.abort()
                if len(batch) > 1:
                    logger.warning("a batch of %d writes failed (%s); applying them one by one", len(batch), exc)
                return None
            except Exception:
                txn.abort()
                if len(batch) == 1:
                    return None
                logger.exception("a batch of %d writes failed; applying them one by one", len(batch))
                return None
        return None

    def _apply_alone(self, write: _Write) -> tuple[Any, BaseException | None]:
        retried = False
        while True:
            txn = self.store.begin_write()
            try:
                result = write.function(txn)
                txn.commit()
                return result, None
            except EngineError as exc:
                txn.abort()
                return None, exc
            except lmdb.Error as exc:
                # A full map, or a full disk, which LMDB reports as ENOSPC or, after a
                # short write, as EIO.
                txn.abort()
                if not retried and self._make_room(exc):
                    retried = True
                    continue
                error = _storage_full(self.store, write, exc)
                logger.error("%s", error)
                return None, error
            except Exception as exc:
                txn.abort()
                logger.exception("write failed")
                return None, exc

    def _make_room(self, exc: lmdb.Error) -> bool:
        """Try to make room for a write that failed with ``exc``; return whether a retry may succeed."""
        if isinstance(exc, lmdb.MapFullError) and self._grow():
            return True
        self._reclaim_garbage()
        return self._release_freed_pages()

    def _release_freed_pages(self) -> bool:
        """Commit one small transaction, so that the pages freed by the last commit become reusable.

        LMDB keeps the previous snapshot intact for crash recovery, so the pages that a
        transaction frees are reused only from the second transaction after it. Without
        this, a write right after a ``del`` or a ``clear()`` could still find the disk full.
        """
        txn = self.store.begin_write()
        try:
            self.store.next_counter(txn, b"space-reclaimed")
            txn.commit()
        except lmdb.Error as exc:
            txn.abort()
            logger.warning("the store is full, and even a small write failed: %s", exc)
            return False
        return True

    def _reclaim_garbage(self) -> int:
        """Remove records of cleared and deleted dicts now, instead of at the next sweep.

        LMDB reuses the pages they free, so after ``clear()`` a write that found the disk
        full can succeed at once. Returns the number of records removed.
        """
        removed = 0
        while removed < MAX_RECLAIM_RECORDS:
            txn = self.store.begin_write()
            try:
                batch = self.store.remove_garbage(txn, limit=RECLAIM_BATCH)
                txn.commit()
            except lmdb.Error as exc:
                txn.abort()
                logger.warning("removing records of cleared or deleted dicts failed: %s", exc)
                break
            removed += batch
            if batch < RECLAIM_BATCH:
                break
        if removed:
            logger.warning("the store is full: removed %d records of cleared or deleted dicts ahead of the sweep", removed)
        return removed

    def _grow(self) -> bool:
        try:
            self.store.grow_map()
            return True
        except StorageFull as exc:
            logger.warning("%s", exc)
            return False


def _storage_full(store: Store, write: _Write, exc: lmdb.Error) -> StorageFull:
    """Describe a write that LMDB could not store: the data directory, what is full, and the fix."""
    where = f"cannot store a write of {write.size} bytes in data directory {store.data_dir}"
    if isinstance(exc, lmdb.MapFullError):
        return StorageFull(
            f"{where}: its memory map of {store.env.info()['map_size']} bytes is full and could not grow "
            "(the daemon log has the reason). Delete entries or dicts to make room (sharedict reuses their space), "
            "or raise the daemon's address-space limit (ulimit -v), then retry"
        )
    try:
        free = f"{shutil.disk_usage(store.data_dir).free / (1 << 20):.1f} MiB free"
    except OSError as usage_error:
        free = f"unknown free space ({usage_error})"
    return StorageFull(
        f"{where}: LMDB failed to write ({exc}); its filesystem has {free}. Free space on that filesystem, "
        "or delete entries or dicts to make room (sharedict reuses their space), then retry"
    )
