"""Size limits, values that cannot be pickled, and values that cannot be unpickled here.

Every failing write must raise in the caller and store nothing.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

from sharedict import DeserializationError, Dict, RequestSizeError, SerializationError
from sharedict.api.protocol import MAX_OBJECT_SIZE, MAX_UPDATE_ENTRIES
from sharedict.api.serialization import dump_value


@pytest.fixture
def daemon(module_daemon):
    """One daemon for the module: every test works on a dict of its own."""
    return module_daemon


def fresh_dict() -> Dict:
    return Dict.from_name(f"limits-{uuid.uuid4().hex[:12]}", create_if_missing=True).hydrate()


def bytes_pickling_to(size: int) -> bytes:
    """Return a bytes value whose serialised form is exactly ``size`` bytes."""
    probe = 1 << 20
    overhead = len(dump_value(bytes(probe))) - probe
    value = bytes(size - overhead)
    assert len(dump_value(value)) == size
    return value


def run_python(code: str, env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# Size of one key or value.


def test_value_over_limit_raises(daemon):
    d = fresh_dict()
    value = bytes_pickling_to(MAX_OBJECT_SIZE + 1)
    with pytest.raises(RequestSizeError, match="100 MiB") as caught:
        d["big"] = value
    message = str(caught.value)
    # Both sizes in bytes: in MiB the value would round to the limit.
    expected = f"value of {MAX_OBJECT_SIZE + 1:,} bytes for key 'big' exceeds the 100 MiB ({MAX_OBJECT_SIZE:,} bytes)"
    assert expected in message
    assert d.name in message
    assert "files" in message  # the fix: keep large objects in files
    assert d.len() == 0


def test_value_over_limit_in_update_raises(daemon):
    d = fresh_dict()
    value = bytes_pickling_to(MAX_OBJECT_SIZE + 1)
    with pytest.raises(RequestSizeError):
        d.update({"small": 1, "big": value})
    assert d.len() == 0


def test_value_at_limit_round_trips(daemon):
    d = fresh_dict()
    value = bytes_pickling_to(MAX_OBJECT_SIZE)
    d["big"] = value
    fetched = d["big"]
    assert len(fetched) == len(value)
    assert fetched == value


def test_key_over_limit_raises(daemon):
    d = fresh_dict()
    key = "k" * (MAX_OBJECT_SIZE + 1)
    with pytest.raises(RequestSizeError, match="key") as caught:
        d[key] = "value"
    assert d.name in str(caught.value)
    assert d.len() == 0


# Size of an update.


def test_update_over_entry_limit_raises(daemon):
    d = fresh_dict()
    entries = {f"key-{i}": i for i in range(MAX_UPDATE_ENTRIES + 1)}
    with pytest.raises(RequestSizeError, match="split it") as caught:
        d.update(entries)
    assert f"{MAX_UPDATE_ENTRIES + 1}" in str(caught.value)
    assert d.len() == 0


def test_update_over_entry_limit_with_kwargs_raises(daemon):
    d = fresh_dict()
    entries = {f"key-{i}": i for i in range(MAX_UPDATE_ENTRIES)}
    with pytest.raises(RequestSizeError):
        d.update(entries, extra=1)
    assert d.len() == 0


def test_update_at_entry_limit_works(daemon):
    d = fresh_dict()
    d.update((f"key-{i}", i) for i in range(MAX_UPDATE_ENTRIES))
    assert d.len() == MAX_UPDATE_ENTRIES
    assert d[f"key-{MAX_UPDATE_ENTRIES - 1}"] == MAX_UPDATE_ENTRIES - 1


# Values and keys that cannot be pickled.


def test_unpicklable_value_raises(daemon):
    d = fresh_dict()
    with pytest.raises(SerializationError) as caught:
        d["lock"] = threading.Lock()
    message = str(caught.value)
    assert "'lock'" in message
    assert d.name in message
    assert "_thread.lock" in message
    assert d.len() == 0


def test_unpicklable_value_in_put_raises(daemon):
    d = fresh_dict()
    d["lock"] = "before"
    with pytest.raises(SerializationError):
        d.put("lock", threading.Lock())
    assert d["lock"] == "before"


def test_unpicklable_last_update_value_stores_nothing(daemon):
    d = fresh_dict()
    entries = [(f"key-{i}", i) for i in range(100)]
    entries.append(("lock", threading.Lock()))
    with pytest.raises(SerializationError, match="'lock'"):
        d.update(entries)
    assert d.len() == 0


def test_unpicklable_key_raises(daemon):
    d = fresh_dict()
    with pytest.raises(SerializationError) as caught:
        d[threading.Lock()] = "value"
    message = str(caught.value)
    assert "key" in message
    assert d.name in message
    assert d.len() == 0


def test_failing_reduce_raises(daemon):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("this object refuses to be pickled")

    d = fresh_dict()
    with pytest.raises(SerializationError, match="refuses to be pickled"):
        d["key"] = Unpicklable()
    assert d.len() == 0


# Values that cannot be unpickled in the reading process.


@pytest.fixture
def writer_only_module(tmp_path: Path) -> Path:
    """A directory with a module that only a child process given it can import."""
    module_dir = tmp_path / "writer_only"
    module_dir.mkdir()
    (module_dir / "writer_only_shapes.py").write_text(
        textwrap.dedent(
            """
            class Square:
                def __init__(self, side):
                    self.side = side

                def __hash__(self):
                    return hash(self.side)

                def __eq__(self, other):
                    return isinstance(other, Square) and other.side == self.side
            """
        )
    )
    return module_dir


def test_value_of_missing_module_raises(daemon, child_env, writer_only_module):
    d = fresh_dict()
    run_python(
        f"""
        from sharedict import Dict
        from writer_only_shapes import Square
        Dict.from_name({d.name!r})["square"] = Square(3)
        """,
        {**child_env, "PYTHONPATH": str(writer_only_module)},
    )
    with pytest.raises(DeserializationError) as caught:
        d["square"]
    message = str(caught.value)
    assert d.name in message
    assert "'square'" in message
    assert "writer_only_shapes" in message
    assert "install it" in message  # the fix


def test_value_of_missing_module_raises_in_iteration(daemon, child_env, writer_only_module):
    d = fresh_dict()
    d["plain"] = 1
    run_python(
        f"""
        from sharedict import Dict
        from writer_only_shapes import Square
        Dict.from_name({d.name!r})["square"] = Square(3)
        """,
        {**child_env, "PYTHONPATH": str(writer_only_module)},
    )
    assert list(d.keys()) == ["plain", "square"]
    with pytest.raises(DeserializationError, match="writer_only_shapes"):
        list(d.values())
    with pytest.raises(DeserializationError, match="'square'"):
        list(d.items())


def test_value_of_missing_module_raises_in_get_and_pop(daemon, child_env, writer_only_module):
    d = fresh_dict()
    run_python(
        f"""
        from sharedict import Dict
        from writer_only_shapes import Square
        Dict.from_name({d.name!r})["square"] = Square(3)
        """,
        {**child_env, "PYTHONPATH": str(writer_only_module)},
    )
    with pytest.raises(DeserializationError, match="writer_only_shapes"):
        d.get("square")
    assert "square" in d
    with pytest.raises(DeserializationError, match="writer_only_shapes") as caught:
        d.pop("square")
    assert "removed" in str(caught.value)
    assert "square" not in d


def test_key_of_missing_module_raises(daemon, child_env, writer_only_module):
    d = fresh_dict()
    run_python(
        f"""
        from sharedict import Dict
        from writer_only_shapes import Square
        Dict.from_name({d.name!r})[Square(3)] = "value"
        """,
        {**child_env, "PYTHONPATH": str(writer_only_module)},
    )
    assert d.len() == 1
    with pytest.raises(DeserializationError) as caught:
        list(d.keys())
    message = str(caught.value)
    assert d.name in message
    assert "key" in message
    assert "writer_only_shapes" in message


def test_values_readable_despite_key_of_missing_module(daemon, child_env, writer_only_module):
    d = fresh_dict()
    run_python(
        f"""
        from sharedict import Dict
        from writer_only_shapes import Square
        Dict.from_name({d.name!r})[Square(3)] = "value"
        """,
        {**child_env, "PYTHONPATH": str(writer_only_module)},
    )
    assert list(d.values()) == ["value"]
