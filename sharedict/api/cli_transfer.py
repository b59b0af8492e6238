"""``sharedict export`` and ``sharedict import``: a backup of one dict that restores exactly.

An export file contains the bytes the daemon stores. It therefore restores keys and
values of any type, also of types that cannot be imported where the CLI runs, and it
restores insertion order. Neither command unpickles anything.

The file is a stream of msgpack objects:

1. a header map: ``{"format": "sharedict-export", "version": 1, "dict": NAME,
   "environment": ENV, "exported_at": ISO 8601 time, "sharedict_version": VERSION}``;
2. one array per entry, in insertion order: ``[match key, stored key or nil, value]``,
   all binary, exactly as a client sends them in an ``update`` request;
3. a trailer map ``{"entries": COUNT}``. A file without it was cut short.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import click
import msgpack
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from sharedict import __version__
from sharedict.api import protocol
from sharedict.api.cli_common import (
    DICT_NAME,
    CommandError,
    env_flag,
    env_option,
    object_id_bytes,
    open_dict,
    scan_entries,
)
from sharedict.api.cli_format import count_of, format_bytes
from sharedict.api.dict import Dict
from sharedict.api.serialization import checked_match_key, match_key_of
from sharedict.api.transport import Client, Request

FORMAT_NAME = "sharedict-export"
FORMAT_VERSION = 1

# An import sends entries in update requests of at most this many entries and bytes,
# far below the protocol's limits, so that each request stays a short write.
BATCH_ENTRIES = 1000
BATCH_BYTES = 16 * protocol.MiB

_UNPACK_ERRORS = (msgpack.UnpackException, ValueError, TypeError)


def _progress() -> Progress:
    """Return a progress display on stderr, which stays silent when stderr is not a terminal."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def _write_keys(stored_key: bytes) -> tuple[bytes, bytes | None]:
    """Return the match key and the stored key to export for a key as a scan returns it.

    A scan returns the stored key of an entry when it has one, and its match key
    otherwise. The match key is recomputed from the bytes, without unpickling.
    """
    match_key = match_key_of(stored_key)
    return match_key, None if match_key == stored_key else stored_key


@click.command("export")
@click.argument("name", type=DICT_NAME)
@click.argument("file", type=click.Path(dir_okay=False, writable=True))
@env_option
def export_command(name: str, file: str, environment_name: str) -> None:
    """Back up every entry of the dict NAME to FILE, for `sharedict import`.

    FILE is replaced only when the export is complete, and is readable by its owner
    only. Entries written while the export runs may or may not be in it.
    """
    handle = open_dict(name, environment_name)
    total = handle.len()
    path = os.path.abspath(file)

    # The handler is set before the partial file exists, so that a SIGTERM at any moment
    # after that runs the cleanup below.
    with _terminated_as_error(f"the export to {file!r} was stopped"):
        try:
            temporary = tempfile.NamedTemporaryFile(
                "wb", dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".partial", delete=False
            )
        except OSError as exc:
            raise CommandError(
                f"cannot write export file {file!r}: {exc.strerror}; check that its directory exists and is writable"
            ) from None

        try:
            with temporary, _progress() as progress:
                task = progress.add_task(f"exporting dict {name}", total=total)
                count = _write_export(temporary, handle, name, environment_name, lambda: progress.advance(task))
                progress.update(task, total=count, completed=count)
                temporary.flush()
                os.fsync(temporary.fileno())
            os.replace(temporary.name, path)
        except OSError as exc:
            raise CommandError(
                f"cannot write export file {file!r}: {exc.strerror or exc}; the file was left as it was"
            ) from None
        finally:
            # After a successful replace there is nothing left to remove.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary.name)

    click.echo(
        f"exported {count_of(count, 'entry', 'entries')} of dict {name!r} to {file} "
        f"({format_bytes(os.path.getsize(path))})",
        err=True,
    )


@contextlib.contextmanager
def _terminated_as_error(action: str) -> Iterator[None]:
    """Turn SIGTERM into a ``CommandError`` inside the block, so that cleanup code runs.

    Python ends a process at SIGTERM without running ``finally`` blocks, which would leave
    the partial export file behind.
    """

    def stop(signum: int, frame: Any) -> None:
        raise CommandError(f"{action} by SIGTERM; the file was left as it was")

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set a signal handler
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_export(
    out: BinaryIO, handle: Dict, name: str, environment_name: str, advance: Callable[[], Any]
) -> int:
    packer = msgpack.Packer(use_bin_type=True)
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "dict": name,
        "environment": environment_name,
        "exported_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "sharedict_version": __version__,
    }
    out.write(packer.pack(header))

    count = 0
    for stored_key, value in scan_entries(handle):
        match_key, exact_key = _write_keys(stored_key)
        out.write(packer.pack([match_key, exact_key, value]))
        count += 1
        advance()

    out.write(packer.pack({"entries": count}))
    return count


class _ExportReader:
    """Reads and checks an export file; ``entries()`` yields its entries as update rows."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.file = open(path, "rb")
        except OSError as exc:
            raise CommandError(f"cannot read export file {path!r}: {exc.strerror}; check its permissions") from None
        self.unpacker = msgpack.Unpacker(self.file, raw=False, max_buffer_size=protocol.MAX_FRAME_SIZE)
        try:
            self.header = self._read_header()
        except BaseException:
            self.file.close()
            raise

    def close(self) -> None:
        self.file.close()

    def _damaged(self, problem: str) -> CommandError:
        return CommandError(
            f"export file {self.path!r} is damaged: {problem}; export the dict again with `sharedict export`"
        )

    def _next(self) -> Any:
        """Return the next object of the file, or raise ``StopIteration`` at its end."""
        try:
            return next(self.unpacker)
        except StopIteration:
            raise
        except _UNPACK_ERRORS as exc:
            raise self._damaged(f"unreadable data at byte {self.unpacker.tell()} ({exc})") from None

    def _read_header(self) -> dict[str, Any]:
        try:
            header = self._next()
        except (StopIteration, CommandError):
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise CommandError(
                f"{self.path!r} is not a sharedict export file; make one with `sharedict export NAME FILE`"
            )
        version = header.get("version")
        if version != FORMAT_VERSION:
            raise CommandError(
                f"export file {self.path!r} has format version {version!r}, and this sharedict {__version__} "
                f"reads version {FORMAT_VERSION}; import it with the sharedict version that exported it"
            )
        return header

    def position(self) -> int:
        return self.unpacker.tell()

    def entries(self) -> Iterator[list[bytes | None]]:
        count = 0
        while True:
            try:
                item = self._next()
            except StopIteration:
                raise self._damaged(f"it ends after {count_of(count, 'entry', 'entries')} without its end marker")
            if isinstance(item, dict):
                self._check_trailer(item, count)
                return
            yield self._check_entry(item, count + 1)
            count += 1

    def _check_entry(self, item: Any, number: int) -> list[bytes | None]:
        valid = (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], bytes)
            and item[0] != b""
            and (item[1] is None or isinstance(item[1], bytes))
            and isinstance(item[2], bytes)
        )
        if not valid:
            raise self._damaged(f"entry {number} is not [key, stored key, value] bytes")

        # The daemon finds an entry by its match key, so one that does not belong to
        # its stored key would make the key unreachable, or reachable twice.
        match_key, stored_key, _ = item
        try:
            expected = checked_match_key(stored_key if stored_key is not None else match_key)
        except (struct.error, IndexError, ValueError) as exc:
            raise self._damaged(f"the key of entry {number} is not a key encoding ({exc})") from None
        if match_key != expected:
            raise self._damaged(f"the match key of entry {number} does not belong to its stored key")
        return item

    def _check_trailer(self, trailer: dict[str, Any], count: int) -> None:
        if trailer.get("entries") != count:
            raise self._damaged(f"its end marker records {trailer.get('entries')!r} entries, but the file contains {count}")
        try:
            self._next()
        except StopIteration:
            return
        raise self._damaged("there is data after its end marker")


def _batches(entries: Iterator[list[bytes | None]]) -> Iterator[list[list[bytes | None]]]:
    batch: list[list[bytes | None]] = []
    size = 0
    for entry in entries:
        entry_size = sum(len(part) for part in entry if part is not None)
        if batch and (len(batch) >= BATCH_ENTRIES or size + entry_size > BATCH_BYTES):
            yield batch
            batch = []
            size = 0
        batch.append(entry)
        size += entry_size
    if batch:
        yield batch


@click.command("import")
@click.argument("name", type=DICT_NAME)
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@env_option
def import_command(name: str, file: str, environment_name: str) -> None:
    """Restore the dict NAME from FILE, written by `sharedict export`.

    The dict is created if missing and must be empty. The whole file is checked before
    anything is written. Entries are written in batches of up to 1,000, so an import that
    fails halfway leaves the entries of the batches written so far.
    """
    with _progress() as progress:
        # First pass: check the whole file, so that a damaged one changes nothing.
        reader = _ExportReader(file)
        try:
            task = progress.add_task(f"checking {os.path.basename(file)}", total=os.path.getsize(file))
            count = 0
            for _ in reader.entries():
                count += 1
                if count % BATCH_ENTRIES == 0:
                    progress.update(task, completed=reader.position())
            progress.update(task, completed=reader.position())
        finally:
            reader.close()

        Dict.objects.create(name, allow_existing=True, environment_name=environment_name)
        handle = open_dict(name, environment_name)
        existing = handle.len()
        if existing:
            raise CommandError(
                f"dict {name!r} has {count_of(existing, 'entry', 'entries')}, and import restores only into an "
                f"empty dict; clear it with `sharedict clear {name}{env_flag(environment_name)}`, or import "
                "under a new name"
            )

        client = Client.default()
        object_id = object_id_bytes(handle)
        task = progress.add_task(f"importing into dict {name}", total=count)
        reader = _ExportReader(file)
        try:
            for batch in _batches(reader.entries()):
                client.call(Request(protocol.UPDATE, object_id, batch, write=True))
                progress.advance(task, len(batch))
        finally:
            reader.close()

    click.echo(f"imported {count_of(count, 'entry', 'entries')} into dict {name!r} from {file}", err=True)
