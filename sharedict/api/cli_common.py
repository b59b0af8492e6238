"""Pieces that the ``sharedict`` data commands share: errors, arguments, dict lookup and scans.

Data commands are clients like any other: they use ``Client.default()``, so they start a
daemon in the background when none accepts connections, unless ``SHAREDICT_AUTOSTART=0``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from sharedict.api import protocol
from sharedict.api.codec import DEFAULT_ENVIRONMENT, check_environment, check_name
from sharedict.api.dict import Dict
from sharedict.api.errors import InvalidError, NotFoundError
from sharedict.api.transport import Client, Request

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

SCAN_PAGE_SIZE = 1000
# Widest table printed to a pipe or file, in characters.
UNLIMITED_WIDTH = 10_000


class CommandError(click.ClickException):
    """A failure that the user can fix: shown as one line on stderr, with exit status 1."""

    exit_code = 1


class _NameType(click.ParamType):
    """A dict or environment name, checked before anything is sent."""

    def __init__(self, name: str, check: Callable[[str], str]) -> None:
        self.name = name
        self._check = check

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return self._check(value)
        except InvalidError as exc:
            self.fail(str(exc), param, ctx)


DICT_NAME = _NameType("dict name", check_name)
ENVIRONMENT_NAME = _NameType("environment name", check_environment)

env_option = click.option(
    "-e",
    "--env",
    "environment_name",
    type=ENVIRONMENT_NAME,
    default=DEFAULT_ENVIRONMENT,
    metavar="NAME",
    help="Environment: a separate namespace of dict names.",
    show_default=True,
)


def env_flag(environment_name: str) -> str:
    """Return the ``-e`` flag to repeat in a suggested command, or nothing for the default environment."""
    return "" if environment_name == DEFAULT_ENVIRONMENT else f" -e {environment_name}"


def not_found_error(name: str, environment_name: str, *, suggest_create: bool) -> CommandError:
    flag = env_flag(environment_name)
    if not suggest_create:
        return CommandError(
            f"dict {name!r} not found in environment {environment_name!r}; see the existing dicts with "
            f"`sharedict list{flag}`"
        )
    return CommandError(
        f"dict {name!r} not found in environment {environment_name!r}; create it with "
        f"`sharedict create {name}{flag}`, or see the existing dicts with `sharedict list{flag}`"
    )


def open_dict(name: str, environment_name: str, *, suggest_create: bool = False) -> Dict:
    """Return a handle on an existing dict, raising ``CommandError`` when it is missing.

    ``suggest_create`` adds `sharedict create` to the error, for ``put``, which needs an
    existing dict. The other commands suggest only `sharedict list`, because there a
    missing dict is more likely a mistyped name.
    """
    handle = Dict.from_name(name, environment_name=environment_name)
    try:
        handle.hydrate()
    except NotFoundError:
        raise not_found_error(name, environment_name, suggest_create=suggest_create) from None
    return handle


def object_id_bytes(handle: Dict) -> bytes:
    """Return the dict id as the 8 bytes that the wire protocol carries."""
    return bytes.fromhex(handle.object_id.removeprefix("di-"))


def scan_entries(handle: Dict, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
    """Yield (stored key, value) bytes of a dict's entries in insertion order, page by page.

    Reading raw bytes, instead of ``Dict.items()``, lets the caller decide what an entry
    it cannot unpickle becomes, and lets ``export`` copy entries without unpickling them.
    ``limit`` stops after that many entries. Values count as activity, as in ``items()``.
    """
    client = Client.default()
    object_id = object_id_bytes(handle)
    after_seq = 0
    remaining = limit
    while remaining is None or remaining > 0:
        page_size = SCAN_PAGE_SIZE if remaining is None else min(SCAN_PAGE_SIZE, remaining)
        entries, done = client.call(Request(protocol.SCAN, object_id, after_seq, page_size, True, True))
        for _, stored_key, value in entries:
            yield stored_key, value
        if remaining is not None:
            remaining -= len(entries)
        if done or not entries:
            return
        after_seq = entries[-1][0]


def print_rich(console: Console, renderable: RenderableType) -> None:
    """Print a rich table without the spaces that pad its last column out to the right.

    Output to a pipe or file has no width of its own, so there the table gets the width
    it needs instead of rich's default of 80 columns.
    """
    if not console.is_terminal:
        unlimited = console.options.update_width(UNLIMITED_WIDTH)
        console.width = max(console.width, console.measure(renderable, options=unlimited).maximum)
    with console.capture() as capture:
        console.print(renderable)
    lines = capture.get().splitlines()
    console.file.write("".join(line.rstrip() + "\n" for line in lines))
    console.file.flush()


def confirm(question: str, *, yes: bool, action: str) -> None:
    """Ask ``question`` on the terminal unless ``yes``, and raise ``CommandError`` unless the user confirms.

    ``action`` names what the command is about to do, such as "clear dict 'jobs'". With
    no terminal on stdin there is nobody to ask, so the command stops with a hint to
    pass ``--yes``.
    """
    if yes:
        return
    if not sys.stdin.isatty():
        raise CommandError(
            f"cannot {action} without confirmation, and stdin is not a terminal; rerun with --yes (-y) to confirm"
        )
    if not click.confirm(question, default=False, err=True):
        raise CommandError(f"aborted: did not {action}")
