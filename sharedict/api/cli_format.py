"""How the ``sharedict`` command shows keys, values, sizes and times.

The CLI reads entries that any program stored, so no single entry may stop a listing. A key
or value whose class cannot be imported here becomes an ``Unreadable`` placeholder that
names the missing class. JSON output turns whatever JSON cannot encode into a readable
string.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import pickle
import unicodedata
from typing import Any

from sharedict.api.serialization import TAG_PICKLE, decode_key

CELL_WIDTH = 80
"""Characters of a value shown in a table cell, before ``...``."""

KEY_CELL_WIDTH = 200
"""Characters of a key shown in a table cell, before ``...``.

Longer than a value's, because keys often share a long start, such as a directory, and
differ at the end. A terminal shows a long key's start and end around its middle.
"""

_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Control characters, lone surrogates, and the Unicode line and paragraph separators.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


class Unreadable:
    """A placeholder for a stored key or value that cannot be unpickled in this process."""

    def __init__(self, part: str, reason: str) -> None:
        self.text = f"<unreadable {part}: {reason}>"

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


class _MissingClass(Exception):
    """A pickle refers to a class or function that cannot be imported here."""


class _ReportingUnpickler(pickle.Unpickler):
    """An unpickler whose failed imports name the module and the class they needed."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except ModuleNotFoundError as exc:
            missing = exc.name or module
            raise _MissingClass(f"{module}.{name} (module {missing!r} not found)") from exc
        except AttributeError as exc:
            raise _MissingClass(f"{module}.{name} (module {module!r} has no attribute {name!r})") from exc


def _reason(exc: Exception) -> str:
    if isinstance(exc, _MissingClass):
        return str(exc)
    if isinstance(exc, ModuleNotFoundError):
        return f"module {exc.name!r} not found"
    return one_line(f"{type(exc).__name__}: {exc}")


def _unpickle(data: bytes, part: str) -> Any:
    try:
        return _ReportingUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # unpickling runs arbitrary code, which may raise anything
        return Unreadable(part, _reason(exc))


def load_stored_key(data: bytes) -> Any:
    """Rebuild a key from the bytes a scan returns, or an ``Unreadable`` placeholder."""
    if data[:1] == TAG_PICKLE:
        return _unpickle(data[1:], "key")
    try:
        return decode_key(data)
    except Exception as exc:  # a tuple key may hold a pickled item, or the key may be damaged
        return Unreadable("key", _reason(exc))


def load_stored_value(data: bytes) -> Any:
    """Unpickle a stored value, or return an ``Unreadable`` placeholder."""
    return _unpickle(data, "value")


def _escape(char: str) -> str:
    if char in _CONTROL_ESCAPES:
        return _CONTROL_ESCAPES[char]
    if unicodedata.category(char) in _ESCAPED_CATEGORIES:
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


def one_line(text: str, limit: int = CELL_WIDTH) -> str:
    """Cut ``text`` to one line of at most ``limit`` characters plus ``...``.

    Line breaks and other control characters are shown as escapes such as ``\\n``, so a
    stored value can neither break a table row nor send escape codes to the terminal.
    """
    head = text[: limit + 1]
    if head.isprintable():
        escaped = head
    else:
        escaped = "".join(_escape(char) for char in head)
    if len(escaped) > limit or len(text) > limit:
        return escaped[:limit] + "..."
    return escaped


def cell_text(obj: Any, use_repr: bool, limit: int = CELL_WIDTH) -> str:
    """Return the one-line text of a key or value in a table: ``str()``, or ``repr()`` with ``use_repr``."""
    return one_line(_text(obj, use_repr), limit)


def _text(obj: Any, use_repr: bool) -> str:
    try:
        return repr(obj) if use_repr else str(obj)
    except Exception as exc:  # a broken __str__ of a stored object must not stop the listing
        function = "repr" if use_repr else "str"
        return f"<{type(obj).__name__} object: {function}() raised {type(exc).__name__}>"


def to_json(obj: Any, use_repr: bool = False) -> Any:
    """Convert ``obj`` to what ``json.dumps`` encodes as valid JSON.

    JSON types stay as they are. Tuples, sets and frozensets become lists, and mapping
    keys become strings. NaN, the infinities, bytes and any other object become a
    string: ``str()`` of the object, or ``repr()`` with ``use_repr``.
    """
    return _to_json(obj, use_repr, set())


def _to_json(obj: Any, use_repr: bool, active: set[int]) -> Any:
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if not isinstance(obj, (list, tuple, set, frozenset, dict)):
        return _fallback_text(obj, use_repr)

    # A container that contains itself would recurse forever.
    if id(obj) in active:
        return "<recursive reference>"
    active.add(id(obj))
    try:
        if isinstance(obj, dict):
            return {
                key if isinstance(key, str) else _fallback_text(key, use_repr): _to_json(value, use_repr, active)
                for key, value in obj.items()
            }
        items = [_to_json(item, use_repr, active) for item in obj]
        if isinstance(obj, (set, frozenset)):
            # Set order depends on the hash seed; sorting keeps the output stable.
            items.sort(key=lambda item: json.dumps(item, sort_keys=True))
        return items
    finally:
        active.discard(id(obj))


def _fallback_text(obj: Any, use_repr: bool) -> str:
    # str() of bytes returns their repr() but warns under `python -b`, so bytes use repr().
    return _text(obj, use_repr=True) if isinstance(obj, bytes) else _text(obj, use_repr)


def encodable(text: str) -> str:
    """Return ``text`` with any lone surrogate, which no UTF-8 output can carry, as an escape."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def json_line(obj: Any) -> str:
    """Encode ``obj`` (already passed through ``to_json``) as one line of JSON.

    Non-ASCII text stays readable; a string with a lone surrogate, which no UTF-8 output
    can carry, makes the line fall back to ``\\u`` escapes.
    """
    line = json.dumps(obj, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(obj, ensure_ascii=True)
    return line


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def format_duration(seconds: float) -> str:
    """Format a duration with its two largest units, such as ``3 d 4 h`` or ``12 s``."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def format_time(moment: datetime.datetime) -> str:
    """Format a time as local time to the minute, with the zone, for tables."""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M %Z")


def format_time_iso(moment: datetime.datetime) -> str:
    """Format a time as local ISO 8601 time with its UTC offset, for JSON."""
    return moment.astimezone().isoformat(timespec="seconds")


def format_timestamp(timestamp: float) -> str:
    """Format a Unix time as local time to the second, with the zone, for status output."""
    return datetime.datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def count_of(number: int, singular: str, plural: str) -> str:
    """Format a count with its noun, as in ``1 entry`` and ``1,234 entries``."""
    return f"{number:,} {singular if number == 1 else plural}"
