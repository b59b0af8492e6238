"""The ``sharedict`` commands that manage dicts and read and write their entries.

Each command is a thin shell over ``Dict`` and ``Dict.objects``. Keys given on the
command line are strings, so ``sharedict get jobs 42`` finds the entry stored from Python
under ``"42"``, not under ``42``.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import click
from rich import box
from rich.cells import cell_len, set_cell_size
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from sharedict.api.cli_common import (
    DICT_NAME,
    CommandError,
    confirm,
    env_flag,
    env_option,
    open_dict,
    print_rich,
    scan_entries,
)
from sharedict.api.cli_format import (
    KEY_CELL_WIDTH,
    cell_text,
    count_of,
    encodable,
    format_time,
    format_time_iso,
    json_line,
    load_stored_key,
    load_stored_value,
    to_json,
)
from sharedict.api.dict import Dict
from sharedict.api.errors import NotFoundError

DEFAULT_ITEMS = 20
# Rows of ``items`` that set the column widths and are then written at once; memory
# stays bounded however many entries ``--all`` shows.
TABLE_BATCH = 1000
# On a terminal the key column takes at most this many columns, or half the terminal's
# width when that is more. Into a pipe a key is cut only at KEY_CELL_WIDTH.
MAX_KEY_WIDTH = 40
KEY_WIDTH_HEADROOM = 4
COLUMN_GAP = "   "
_MISSING = object()


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@env_option
def list_command(as_json: bool, environment_name: str) -> None:
    """List the dicts of an environment, newest first."""
    rows = []
    for handle in Dict.objects.list(environment_name=environment_name):
        try:
            entries = handle.len()
        except NotFoundError:
            continue  # deleted since the listing
        rows.append((handle.info(), entries))

    if as_json:
        listing = [
            {
                "name": info.name,
                "entries": entries,
                "created_at": format_time_iso(info.created_at),
                "created_by": info.created_by,
            }
            for info, entries in rows
        ]
        click.echo(json.dumps(listing, indent=2))
        return

    if not rows:
        click.echo(
            f"no dicts in environment {environment_name!r}; create one with "
            f"`sharedict create NAME{env_flag(environment_name)}`",
            err=True,
        )
        return
    table = Table(
        "Name",
        Column("Entries", justify="right"),
        "Created at",
        "Created by",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    for info, entries in rows:
        table.add_row(Text(info.name or ""), f"{entries:,}", format_time(info.created_at), Text(info.created_by or ""))
    print_rich(Console(highlight=False), table)


@click.command("create")
@click.argument("name", type=DICT_NAME)
@env_option
def create_command(name: str, environment_name: str) -> None:
    """Create the dict NAME; does nothing if it exists."""
    Dict.objects.create(name, allow_existing=True, environment_name=environment_name)


@click.command("get")
@click.argument("name", type=DICT_NAME)
@click.argument("key")
@click.option("-r", "--repr", "use_repr", is_flag=True, help="Print repr() of the value instead of str().")
@click.option("--json", "as_json", is_flag=True, help="Print the value as JSON.")
@env_option
def get_command(name: str, key: str, use_repr: bool, as_json: bool, environment_name: str) -> None:
    """Print the value of the string KEY in the dict NAME.

    A missing key is an error (exit status 1). The whole value is printed, unlike in
    `items`.
    """
    handle = open_dict(name, environment_name)
    value = handle.get(key, _MISSING)
    if value is _MISSING:
        raise CommandError(
            f"key {key!r} not found in dict {name!r}; see its keys with "
            f"`sharedict items {name}{env_flag(environment_name)}`"
        )

    if as_json:
        click.echo(json_line(to_json(value, use_repr)))
    elif use_repr:
        click.echo(repr(value))
    else:
        click.echo(encodable(str(value)))


@click.command("put")
@click.argument("name", type=DICT_NAME)
@click.argument("key")
@click.argument("value")
@click.option("--json-value", is_flag=True, help="Parse VALUE as JSON, so that 42 stores an int and [1, 2] a list.")
@env_option
def put_command(name: str, key: str, value: str, json_value: bool, environment_name: str) -> None:
    """Store VALUE under the string KEY in the dict NAME.

    VALUE is stored as a string unless --json-value is given. The dict must exist.
    """
    stored: Any = value
    if json_value:
        try:
            stored = json.loads(value)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(
                f"{value!r} is not valid JSON ({exc}); quote a JSON string as '\"text\"', "
                "or leave out --json-value to store the text as it is",
                param_hint="VALUE",
            ) from None

    handle = open_dict(name, environment_name, suggest_create=True)
    handle[key] = stored


ENTRY_COUNT_HINT = "N must be a positive whole number of entries, such as 20; pass --all to show every entry"


class _EntryCount(click.ParamType):
    """The N of ``items``: a positive whole number of entries."""

    name = "N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value  # the default
        text = value.strip()
        if not (text.isascii() and text.isdigit() and int(text) > 0):
            self.fail(f"{value!r} is invalid; {ENTRY_COUNT_HINT}", param, ctx)
        return int(text)


class _ItemsCommand(click.Command):
    """The ``items`` command, which reports a negative N as an invalid N, not as an unknown option."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        given = list(args)  # the parser consumes ``args``
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            negative = next((arg for arg in given if re.fullmatch(r"-\d[\d.]*", arg)), None)
            if negative is None or not negative.startswith(exc.option_name):
                raise
            raise click.BadParameter(f"{negative!r} is invalid; {ENTRY_COUNT_HINT}", ctx, param_hint="'[N]'") from None


@click.command("items", cls=_ItemsCommand)
@click.argument("name", type=DICT_NAME)
@click.argument("count", metavar="[N]", type=_EntryCount(), default=DEFAULT_ITEMS, required=False)
@click.option("-a", "--all", "show_all", is_flag=True, help="Show every entry, not only the first N.")
@click.option("-r", "--repr", "use_repr", is_flag=True, help="Show repr() of keys and values instead of str().")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of {key, value} objects.")
@env_option
def items_command(
    name: str, count: int, show_all: bool, use_repr: bool, as_json: bool, environment_name: str
) -> None:
    """Show the first N entries (default 20) of the dict NAME, in insertion order.

    Entries are read page by page, so any dict can be shown. In the table each key and
    value is cut to one line of 80 characters. A value whose class cannot be imported
    here is shown as a placeholder naming that class. With --json, what JSON cannot
    encode is shown as a string.
    """
    handle = open_dict(name, environment_name)
    limit = None if show_all else count

    # One entry read past the limit shows whether the output must be marked as cut.
    raw_entries = scan_entries(handle, None if limit is None else limit + 1)
    entries = ((load_stored_key(key), load_stored_value(value)) for key, value in raw_entries)
    if as_json:
        shown_count, cut = _print_items_json(entries, limit, use_repr)
    else:
        shown_count, cut = _print_items_table(entries, limit, use_repr)

    if cut:
        total = count_of(handle.len(), "entry", "entries")
        click.echo(
            f"showed the first {count_of(shown_count, 'entry', 'entries')} of {total} in dict {name!r}; "
            "pass --all to show every entry",
            err=True,
        )
    elif shown_count == 0 and not as_json:
        click.echo(f"dict {name!r} has no entries", err=True)


def _limited(entries: Iterable[Any], limit: int | None) -> Iterator[Any]:
    """Yield up to ``limit`` entries, then ``_MISSING`` once if more were there."""
    for position, entry in enumerate(entries):
        if limit is not None and position == limit:
            yield _MISSING
            return
        yield entry


def _print_items_json(entries: Iterable[tuple[Any, Any]], limit: int | None, use_repr: bool) -> tuple[int, bool]:
    # Written element by element, so that the array streams like the table does.
    out = sys.stdout
    out.write("[")
    shown_count = 0
    cut = False
    for entry in _limited(entries, limit):
        if entry is _MISSING:
            cut = True
            break
        key, value = entry
        separator = "\n  " if shown_count == 0 else ",\n  "
        out.write(separator + json_line({"key": to_json(key, use_repr), "value": to_json(value, use_repr)}))
        shown_count += 1
    out.write("\n]\n" if shown_count else "]\n")
    out.flush()
    return shown_count, cut


def _print_items_table(entries: Iterable[tuple[Any, Any]], limit: int | None, use_repr: bool) -> tuple[int, bool]:
    shown_count = 0
    cut = False
    batch: list[tuple[str, str]] = []
    table: _ItemsTable | None = None
    line_width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
    for entry in _limited(entries, limit):
        if entry is _MISSING:
            cut = True
            batch.append(("...", "..."))
            break
        key, value = entry
        batch.append((cell_text(key, use_repr, KEY_CELL_WIDTH), cell_text(value, use_repr)))
        shown_count += 1
        if len(batch) == TABLE_BATCH:
            table = table or _ItemsTable(batch, more_may_follow=True, line_width=line_width)
            table.write_rows(batch)
            batch = []
    if batch:
        table = table or _ItemsTable(batch, more_may_follow=False, line_width=line_width)
        table.write_rows(batch)
    sys.stdout.flush()
    return shown_count, cut


class _ItemsTable:
    """A table of (key, value) rows in the layout of the ``list`` table, written batch by batch.

    rich's ``Table`` measures every row before printing and took about 0.9 ms a row
    (rich 15, on a busy 2-vCPU machine), against about 1 µs for the padding done here:
    too slow for ``items --all`` on a large dict. Rows are padded and cropped with rich's
    cell-width functions, which line up wide characters too. The first batch of rows
    sets the column widths.

    ``line_width`` is the terminal's width, or None for a pipe, which takes rows of any
    length. On a terminal a row must not wrap, so a key wider than its column loses its
    middle, where keys that share a long prefix (such as a directory) differ least.
    """

    def __init__(self, first_batch: list[tuple[str, str]], *, more_may_follow: bool, line_width: int | None) -> None:
        longest_key = max(cell_len(key) for key, _ in first_batch)
        if more_may_follow:
            # Later keys tend to be a little longer, as "k999" is followed by "k1000".
            longest_key += KEY_WIDTH_HEADROOM
        self.key_width = max(longest_key, len("Key"))
        value_width = max([cell_len(value) for _, value in first_batch] + [len("Value")])

        self.line_width = line_width
        if line_width is not None:
            key_limit = max(MAX_KEY_WIDTH, (line_width - len(COLUMN_GAP)) // 2)
            self.key_width = min(self.key_width, key_limit)
            value_width = max(min(value_width, line_width - self.key_width - len(COLUMN_GAP)), len("Value"))

        rule = "\u2500" * (self.key_width + len(COLUMN_GAP) + value_width)
        sys.stdout.write(f"{self._line('Key', 'Value')}\n{rule}\n")

    def _line(self, key: str, value: str) -> str:
        key_size = cell_len(key)
        if key_size > self.key_width and self.line_width is not None:
            key = _cut_middle(key, self.key_width)
        elif key_size < self.key_width:
            key = set_cell_size(key, self.key_width)
        # Into a pipe, a key wider than the column stays whole and pushes its value right.
        line = key + COLUMN_GAP + value
        if self.line_width is not None and cell_len(line) > self.line_width:
            line = set_cell_size(line, self.line_width - 1) + "\u2026"
        return line

    def write_rows(self, rows: list[tuple[str, str]]) -> None:
        sys.stdout.write("".join(self._line(key, value) + "\n" for key, value in rows))


def _cut_middle(text: str, width: int) -> str:
    """Return ``text`` cut to ``width`` cells by replacing its middle with ``…``."""
    tail_width = (width - 1) // 2
    head = set_cell_size(text, width - 1 - tail_width)
    # Cropping the reversed text keeps the last cells; reversing again restores their order.
    tail = set_cell_size(text[::-1], tail_width)[::-1]
    return head + "\u2026" + tail


@click.command("clear")
@click.argument("name", type=DICT_NAME)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@env_option
def clear_command(name: str, yes: bool, environment_name: str) -> None:
    """Remove every entry of the dict NAME, after confirmation."""
    handle = open_dict(name, environment_name)
    entries = handle.len()
    confirm(
        f"Delete all {count_of(entries, 'entry', 'entries')} of dict {name!r} in environment "
        f"{environment_name!r}? This cannot be undone.",
        yes=yes,
        action=f"clear dict {name!r}",
    )
    handle.clear()


@click.command("delete")
@click.argument("name", type=DICT_NAME)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--allow-missing", is_flag=True, help="Succeed when the dict does not exist.")
@env_option
def delete_command(name: str, yes: bool, allow_missing: bool, environment_name: str) -> None:
    """Delete the dict NAME and all its entries, after confirmation."""
    missing_error = CommandError(
        f"dict {name!r} not found in environment {environment_name!r}; pass --allow-missing to accept a "
        f"missing dict, or see the existing dicts with `sharedict list{env_flag(environment_name)}`"
    )
    handle = Dict.from_name(name, environment_name=environment_name)
    try:
        handle.hydrate()
    except NotFoundError:
        if allow_missing:
            return
        raise missing_error from None

    entries = handle.len()
    confirm(
        f"Delete dict {name!r} in environment {environment_name!r} and its "
        f"{count_of(entries, 'entry', 'entries')}? This cannot be undone.",
        yes=yes,
        action=f"delete dict {name!r}",
    )
    try:
        Dict.objects.delete(name, environment_name=environment_name)
    except NotFoundError:
        if not allow_missing:
            raise missing_error from None
