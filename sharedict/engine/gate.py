"""A gate that lets read transactions run together and a map resize run alone."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class ResizeGate:
    """Lets read transactions run together, and the map resize run alone.

    LMDB allows ``mdb_env_set_mapsize`` only while the process has no transaction open.
    Every read passes this gate twice, so entering and leaving take the bare lock and
    wake no thread unless a resize waits.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._readers = 0
        self._resizing = False

    def enter_shared(self) -> None:
        """Admit one reader; it waits while a resize runs. Pair with ``leave_shared``."""
        with self._lock:
            while self._resizing:
                self._cond.wait()
            self._readers += 1

    def leave_shared(self) -> None:
        with self._lock:
            self._readers -= 1
            if self._resizing and self._readers == 0:
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._lock:
            self._resizing = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._lock:
                self._resizing = False
                self._cond.notify_all()
