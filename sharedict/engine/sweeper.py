"""The background sweeper: removes expired entries and the entries of cleared dicts.

Expired entries are invisible from the moment they expire, so the sweeper only reclaims
their space. It works in bounded batches, each a write of its own through the group
commit writer, and rests after each batch as long as the batch took. It so takes at most
about half of the writer's time and of one CPU, and requests keep flowing while it works.
``benchmarks/bench_sweep.py`` measures the latency of reads during a sweep.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

from sharedict.engine.store import Store
from sharedict.engine.writer import GroupCommitWriter

logger = logging.getLogger(__name__)

SWEEP_BATCH = 500
# The rest after a batch, as a multiple of the time the batch took.
PAUSE_RATIO = 1.0


class Sweeper:
    """Runs a sweep every ``interval`` seconds on a thread of its own.

    ``last_sweep_at`` (wall-clock seconds, None before the first sweep) and
    ``swept_entries`` (expired entries removed since start, counted per batch) may be read
    from any thread.

    Args:
        store: the store to sweep.
        writer: the writer that applies each batch.
        interval: seconds between the end of one sweep and the start of the next.
        on_idle: called after each sweep, for housekeeping such as reaping the ephemeral
            dicts of processes that are gone.
        batch_size: the maximum number of entries or dicts that one batch removes or visits.
        pause_ratio: the rest after each batch, as a multiple of the time the batch took.
    """

    def __init__(
        self,
        store: Store,
        writer: GroupCommitWriter,
        interval: float,
        on_idle: Callable[[], None] | None = None,
        batch_size: int = SWEEP_BATCH,
        pause_ratio: float = PAUSE_RATIO,
    ) -> None:
        self.store = store
        self.writer = writer
        self.interval = interval
        self.on_idle = on_idle
        self.batch_size = batch_size
        self.pause_ratio = pause_ratio
        self.last_sweep_at: float | None = None
        self.swept_entries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sharedict-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the batch in progress, and wait for the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def sweep_once(self) -> int:
        """Sweep until nothing is left to remove, or until stopped; return the expired entries removed."""
        started = time.monotonic()

        expired = 0
        position: bytes | None = b""
        while position is not None and not self._stop.is_set():
            batch_started = time.monotonic()
            batch = functools.partial(self.store.remove_expired, limit=self.batch_size, start=position)
            removed, position = self.writer.call(batch)
            expired += removed
            self.swept_entries += removed
            if position is not None:
                self._rest_after(batch_started)

        garbage = 0
        while not self._stop.is_set():
            batch_started = time.monotonic()
            removed = self.writer.call(functools.partial(self.store.remove_garbage, limit=self.batch_size))
            garbage += removed
            if removed < self.batch_size:
                break
            self._rest_after(batch_started)

        self.last_sweep_at = time.time()
        level = logging.INFO if expired or garbage else logging.DEBUG
        logger.log(
            level,
            "sweep removed %d expired entries and %d records of cleared or deleted dicts in %.3f s",
            expired,
            garbage,
            time.monotonic() - started,
        )
        return expired

    def _rest_after(self, batch_started: float) -> None:
        # The batch's time includes its wait in the writer's queue, so the sweeper also
        # backs off when clients keep the writer busy.
        self._stop.wait(self.pause_ratio * (time.monotonic() - batch_started))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep_once()
                if self.on_idle is not None:
                    self.on_idle()
            except Exception:
                logger.exception("sweep failed; retrying in %s s", self.interval)
