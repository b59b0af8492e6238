"""Workloads for the growth and long-reader tests: writers, readers and checked values.

Every value carries a SHA-256 digest of its payload, so a reader that saw a torn value,
or parts of two versions, finds out by itself. The workloads run in threads of the test
process against a daemon of the test's own, and collect every error a client met.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import lmdb

from helpers import launch_daemon, serve_command
from sharedict import Dict
from sharedict.api.config import Settings
from sharedict.api.transport import Client

DIGEST_SIZE = 32

# Starts the daemon with a smaller initial map than the default, so that a test of a
# few hundred MiB makes it grow several times. The map size is the first argument.
_SMALL_MAP_LAUNCHER = """
import functools, sys
from sharedict.daemon import server
from sharedict.engine import Store
server.Store = functools.partial(Store, map_size=int(sys.argv.pop(1)))
from sharedict.api.cli import main
sys.exit(main(sys.argv[1:]))
"""


def checked_value(size: int) -> bytes:
    """Return ``size`` bytes: a random payload followed by its SHA-256 digest."""
    payload = os.urandom(size - DIGEST_SIZE)
    return payload + hashlib.sha256(payload).digest()


def is_intact(value: Any) -> bool:
    if not isinstance(value, bytes) or len(value) < DIGEST_SIZE:
        return False
    return hashlib.sha256(value[:-DIGEST_SIZE]).digest() == value[-DIGEST_SIZE:]


def start_daemon(
    socket_path: str,
    data_dir: str,
    log_path: str,
    map_size: int | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``sharedict serve``, with an initial map of ``map_size`` bytes when given."""
    command = serve_command(socket_path, data_dir, "--log-level", "DEBUG")
    if map_size is not None:
        command = [sys.executable, "-c", _SMALL_MAP_LAUNCHER, str(map_size), *command[3:]]
    return launch_daemon(command, socket_path, log_path, env=env)


def client_of(socket_path: str, data_dir: str) -> Client:
    return Client(Settings(socket_path=socket_path, data_dir=data_dir, autostart=False))


@dataclass
class Tally:
    """Counts shared by the threads of a workload; ``errors`` has one line per error, up to 20."""

    bytes_written: int = 0
    writes: int = 0
    values_read: int = 0
    torn_values: int = 0
    passes: int = 0
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, count in counts.items():
                setattr(self, name, getattr(self, name) + count)

    def error(self, source: str, exc: BaseException) -> None:
        with self._lock:
            if len(self.errors) < 20:
                self.errors.append(f"{source}: {type(exc).__name__}: {exc}")


class Threads:
    """Worker threads that run until their work is done or ``stop()`` is called."""

    def __init__(self) -> None:
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, name: str, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def stop(self, timeout: float = 60.0) -> bool:
        self.stop_event.set()
        return self.join(timeout)


# Growth: writers add new entries until they have written ``total_bytes``, while readers
# iterate the dict again and again.


def write_new_entries(handle: Dict, writer: int, quota: int, value_size: int, tally: Tally, stop: threading.Event) -> None:
    """Add entries of ``value_size`` bytes until ``quota`` bytes are written; every fourth call is an update()."""
    written = 0
    for number in itertools.count():
        if written >= quota or stop.is_set():
            return
        try:
            if number % 4 == 3:
                entries = {f"w{writer}-{number}-{part}": checked_value(value_size // 4) for part in range(4)}
                handle.update(entries)
            else:
                handle[f"w{writer}-{number}"] = checked_value(value_size)
        except Exception as exc:  # every error is a finding
            tally.error(f"writer {writer}", exc)
            return
        written += value_size
        tally.add(bytes_written=value_size, writes=1)


def read_everything(handle: Dict, reader: int, tally: Tally, stop: threading.Event, pause: float = 0.0) -> None:
    """Iterate the dict's items until stopped, checking every value; ``pause`` seconds per item."""
    while not stop.is_set():
        try:
            for _, value in handle.items():
                tally.add(values_read=1, torn_values=0 if is_intact(value) else 1)
                if pause:
                    time.sleep(pause)
                if stop.is_set():
                    return
        except Exception as exc:  # every error is a finding
            tally.error(f"reader {reader}", exc)
            return
        tally.add(passes=1)


# The LMDB environment seen from outside the daemon.


def map_size_of(data_dir: str) -> int:
    """Return the map size recorded in the environment; read it while no daemon grows the map."""
    env = lmdb.open(data_dir, readonly=True, max_dbs=16, create=False)
    try:
        return env.info()["map_size"]
    finally:
        env.close()


def data_file_size(data_dir: str) -> int:
    return os.path.getsize(os.path.join(data_dir, "data.mdb"))


class ReaderSlots:
    """Samples the reader table of a running daemon's environment, from a read-only handle of the test."""

    def __init__(self, data_dir: str) -> None:
        self._env = lmdb.open(data_dir, readonly=True, max_dbs=16, create=False)
        self.max_in_use = 0
        self.max_readers = self._env.max_readers()

    def sample(self) -> int:
        # One line per slot in use, under a header line; "(no active readers)" otherwise.
        lines = [line for line in self._env.readers().splitlines()[1:] if line.strip()]
        self.max_in_use = max(self.max_in_use, len(lines))
        return len(lines)

    def close(self) -> None:
        self._env.close()


# Churn: writers overwrite the existing entries again and again, and move some of them.


def fill(handle: Dict, keys: list[str], value_size: int, batch: int = 1000) -> None:
    for start in range(0, len(keys), batch):
        handle.update({key: checked_value(value_size) for key in keys[start : start + batch]})


def churn(handle: Dict, writer: int, keys: list[str], value_size: int, rounds: int, tally: Tally, stop: threading.Event) -> None:
    """Overwrite every key of ``keys`` ``rounds`` times, in updates of 100; every tenth batch pops and re-inserts its first key."""
    for round_number in range(rounds):
        for start in range(0, len(keys), 100):
            if stop.is_set():
                return
            batch = keys[start : start + 100]
            try:
                handle.update({key: checked_value(value_size) for key in batch})
                if (start // 100) % 10 == round_number % 10:
                    handle.pop(batch[0])
                    handle[batch[0]] = checked_value(value_size)
            except Exception as exc:  # every error is a finding
                tally.error(f"writer {writer}", exc)
                return
            tally.add(bytes_written=len(batch) * value_size, writes=1)
