"""Keys match like Python dict keys, in every process, whatever their size or type."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import textwrap
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharedict import Dict
from sharedict.api.codec import encode_update
from sharedict.api.serialization import checked_match_key, dump_value, encode_key

MISSING = object()
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    label: str


@pytest.fixture
def daemon(module_daemon):
    """One daemon for the module: every test works on a dict of its own."""
    return module_daemon


def fresh_dict() -> Dict:
    return Dict.from_name(f"keys-{uuid.uuid4().hex[:12]}", create_if_missing=True)


def distinct_copy(text: str) -> str:
    """Return a string equal to ``text`` that is another object."""
    copy = "".join(list(text))
    assert copy is not text
    return copy


def run_python(code: str, env: dict[str, str]) -> str:
    """Run ``code`` in a fresh interpreter and return its standard output."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# Keys equal under == are one entry.


def test_int_float_bool_are_one_key(daemon):
    d = fresh_dict()
    d[1] = "int"
    d[1.0] = "float"
    d[True] = "bool"
    assert d.len() == 1
    assert d[1] == "bool"


def test_zero_and_negative_zero_are_one_key(daemon):
    d = fresh_dict()
    d[0] = "int"
    d[-0.0] = "negative float"
    assert d.len() == 1
    assert d[0.0] == "negative float"
    assert d[False] == "negative float"


def test_first_key_object_is_kept(daemon):
    d = fresh_dict()
    d.put(1.0, "first")
    d.put(1, "second")
    [key] = list(d.keys())
    assert type(key) is float
    assert d[1] == "second"


def test_negative_zero_key_object_is_kept(daemon):
    d = fresh_dict()
    d[-0.0] = "value"
    d[0] = "other"
    [key] = list(d.keys())
    assert math.copysign(1.0, key) == -1.0


def test_bool_key_object_is_kept(daemon):
    d = fresh_dict()
    d[True] = "value"
    d.put(1, "other", skip_if_exists=True)
    [key] = list(d.keys())
    assert key is True


def test_tuple_of_equal_numbers_matches(daemon):
    d = fresh_dict()
    d[(1, 2.0, "a")] = "value"
    assert d[(1.0, True + 1, "a")] == "value"


def test_tuple_with_repeated_string_object_matches(daemon):
    d = fresh_dict()
    shared = distinct_copy("repeated-string")
    d[(shared, shared)] = "value"
    assert d[(distinct_copy(shared), distinct_copy(shared))] == "value"


def test_frozenset_matches_regardless_of_build_order(daemon):
    d = fresh_dict()
    names = [f"member-{i}" for i in range(50)]
    d[frozenset(names)] = "value"
    assert d[frozenset(reversed(names))] == "value"


def test_frozenset_matches_across_hash_seeds(daemon, child_env):
    name = f"keys-{uuid.uuid4().hex[:12]}"
    code = f"""
        from sharedict import Dict
        d = Dict.from_name({name!r}, create_if_missing=True)
        key = frozenset(f"member-{{i}}" for i in range(50))
        print(",".join(key))
        if d.get(key) is None:
            d[key] = "written under seed 1"
        else:
            print(d[key])
    """
    writer = run_python(code, {**child_env, "PYTHONHASHSEED": "1"}).splitlines()
    reader = run_python(code, {**child_env, "PYTHONHASHSEED": "2"}).splitlines()
    # The test only proves something when the two seeds order the set differently.
    assert writer[0] != reader[0]
    assert reader[1:] == ["written under seed 1"]


def test_frozenset_of_objects_matches_across_hash_seeds(daemon, child_env):
    name = f"keys-{uuid.uuid4().hex[:12]}"
    code = f"""
        from sharedict import Dict
        from test_keys import Point
        d = Dict.from_name({name!r}, create_if_missing=True)
        key = frozenset(Point(i, f"label-{{i}}") for i in range(50))
        print(",".join(point.label for point in key))
        if d.get(key) is None:
            d[key] = "written under seed 1"
        else:
            print(d[key])
    """
    # The child imports Point from this file, so that its key pickles by reference.
    env = {**child_env, "PYTHONPATH": TESTS_DIR}
    writer = run_python(code, {**env, "PYTHONHASHSEED": "1"}).splitlines()
    reader = run_python(code, {**env, "PYTHONHASHSEED": "2"}).splitlines()
    assert writer[0] != reader[0]
    assert reader[1:] == ["written under seed 1"]


def test_nested_containers_match(daemon):
    d = fresh_dict()
    key = (1, ("a", frozenset({2.0, (3, b"x")})), frozenset({frozenset({None, "b"})}))
    equal_key = (1.0, ("a", frozenset({(3.0, b"x"), 2})), frozenset({frozenset({"b", None})}))
    d[key] = "value"
    assert d[equal_key] == "value"
    assert list(d.keys()) == [key]


def test_nested_key_types_round_trip(daemon):
    d = fresh_dict()
    key = (1.5, (True, None), frozenset({b"raw", "text"}), ())
    d[key] = "value"
    [stored] = list(d.keys())
    assert stored == key
    assert type(stored[1][0]) is bool


# Keys of any size.


def test_key_of_100_kib(daemon):
    d = fresh_dict()
    key = "k" * (100 << 10)
    d[key] = "value"
    assert d[key] == "value"
    assert list(d.keys()) == [key]


def test_long_keys_differing_at_end(daemon):
    d = fresh_dict()
    prefix = "p" * 2000
    keys = [prefix + suffix for suffix in "abcdef"]
    for index, key in enumerate(keys):
        d[key] = index
    assert [d[key] for key in keys] == list(range(len(keys)))
    assert list(d.keys()) == keys


def test_long_bytes_and_tuple_keys(daemon):
    d = fresh_dict()
    long_bytes = b"\x00" * 600
    long_tuple = tuple(range(300))
    d[long_bytes] = "bytes"
    d[long_tuple] = "tuple"
    assert d[long_bytes] == "bytes"
    assert d[tuple(float(i) for i in range(300))] == "tuple"
    assert d.len() == 2


def test_long_key_pop_and_delete(daemon):
    d = fresh_dict()
    key = "x" * 1000
    d[key] = "value"
    assert d.pop(key) == "value"
    d[key] = "again"
    del d[key]
    assert key not in d


def test_empty_string_key(daemon):
    d = fresh_dict()
    d[""] = "empty"
    assert d[""] == "empty"
    assert list(d.keys()) == [""]


def test_empty_tuple_and_bytes_keys(daemon):
    d = fresh_dict()
    d[()] = "tuple"
    d[b""] = "bytes"
    d[frozenset()] = "frozenset"
    assert d.len() == 3
    assert d[()] == "tuple"


def test_bytes_and_str_are_different_keys(daemon):
    d = fresh_dict()
    d["key"] = "str"
    d[b"key"] = "bytes"
    assert d["key"] == "str"
    assert d[b"key"] == "bytes"


def test_str_and_int_are_different_keys(daemon):
    d = fresh_dict()
    d["1"] = "str"
    d[1] = "int"
    assert d.len() == 2


def test_surrogate_string_key(daemon):
    d = fresh_dict()
    key = "broken \udc80 surrogate"
    d[key] = "value"
    assert d[key] == "value"
    assert list(d.keys()) == [key]


def test_nan_key(daemon):
    d = fresh_dict()
    d[math.nan] = "first"
    d[float("nan")] = "second"
    assert d.len() == 1
    [key] = list(d.keys())
    assert math.isnan(key)
    assert d[float("nan")] == "second"


def test_large_int_key(daemon):
    d = fresh_dict()
    d[10**100] = "big"
    d[-(2**64)] = "negative"
    assert d[10**100] == "big"
    assert 1e100 not in d  # 1e100 is not exactly 10**100, so not equal to it
    assert d[-(2**64)] == "negative"
    assert set(d.keys()) == {10**100, -(2**64)}


def test_float_keys_equal_to_ints(daemon):
    d = fresh_dict()
    d[2**53] = "int"
    assert d[float(2**53)] == "int"
    assert d.get(2**53 + 1) is None


@pytest.mark.parametrize(
    ("key", "value"),
    [("plain", "text"), ("", b""), ("caf\u00e9 \u2603", 1.5), ("\ud800", None), ("k", True), ("big", 10**30)],
)
def test_update_encodes_as_put_does(key, value):
    # update() builds the bytes of str keys and plain values itself, to save two calls per entry.
    entries = encode_update([(key, value)], "dict 'd'")

    assert entries == [(encode_key(key)[0], None, dump_value(value))]
    assert encode_key(key)[1] is None


# None as a value versus a missing key.


def test_none_value_through_get(daemon):
    d = fresh_dict()
    d["present"] = None
    assert d.get("present", MISSING) is None
    assert d.get("absent", MISSING) is MISSING


def test_none_value_through_getitem(daemon):
    d = fresh_dict()
    d["present"] = None
    assert d["present"] is None
    with pytest.raises(KeyError):
        d["absent"]


def test_none_value_through_contains(daemon):
    d = fresh_dict()
    d["present"] = None
    assert "present" in d
    assert "absent" not in d


def test_none_value_through_pop(daemon):
    d = fresh_dict()
    d["present"] = None
    assert d.pop("present", MISSING) is None
    assert d.pop("absent", MISSING) is MISSING
    with pytest.raises(KeyError):
        d.pop("absent")


def test_none_key(daemon):
    d = fresh_dict()
    d[None] = "none"
    assert d[None] == "none"
    assert list(d.keys()) == [None]


# Keys that are not hashable, or of other types.


@pytest.mark.parametrize("key", [["a", "list"], {"a": "dict"}, {"a", "set"}, ("tuple", ["holding a list"])])
def test_unhashable_key_raises(daemon, key):
    d = fresh_dict()
    with pytest.raises(TypeError, match="unhashable") as caught:
        d[key] = "value"
    assert "tuple" in str(caught.value)
    assert "frozenset" in str(caught.value)


def test_unhashable_item_named(daemon):
    d = fresh_dict()
    with pytest.raises(TypeError) as caught:
        d[("tuple", ["holding a list"])] = "value"
    assert "('tuple', ['holding a list'])" in str(caught.value)
    assert "unhashable type: 'list'" in str(caught.value)


def test_unhashable_key_raises_on_read(daemon):
    d = fresh_dict()
    with pytest.raises(TypeError, match="unhashable"):
        d.get(["a", "list"])


def test_dataclass_key_round_trips(daemon):
    d = fresh_dict()
    d[Point(1, "a")] = "value"
    assert d[Point(1, "a")] == "value"
    assert list(d.keys()) == [Point(1, "a")]


def test_dataclass_key_with_repeated_string_matches(daemon):
    d = fresh_dict()
    shared = distinct_copy("shared-label")
    d[(Point(1, shared), shared)] = "value"
    assert d[(Point(1, distinct_copy(shared)), distinct_copy(shared))] == "value"
    assert list(d.keys()) == [(Point(1, shared), shared)]


def test_other_hashable_key_types(daemon):
    d = fresh_dict()
    keys = [complex(1, 2), range(3), Point, len, uuid.UUID(int=7)]
    for index, key in enumerate(keys):
        d[key] = index
    assert [d[key] for key in keys] == list(range(len(keys)))
    assert list(d.keys()) == keys


def test_key_read_by_other_process(daemon, child_env):
    d = fresh_dict()
    d[(1.0, "a", frozenset({b"x"}))] = "value"
    output = run_python(
        f"""
        from sharedict import Dict
        d = Dict.from_name({d.name!r})
        print(d[(1, "a", frozenset({{b"x"}}))])
        print(repr(list(d.keys())))
        """,
        child_env,
    )
    assert output.splitlines() == ["value", "[(1.0, 'a', frozenset({b'x'}))]"]


# The check of imported keys accepts every key that the codec writes.

import_keys = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text()
    | st.binary()
    | st.just(range(3)),
    lambda children: st.tuples(children, children) | st.lists(children).map(tuple) | st.frozensets(children),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(import_keys)
def test_checked_match_key_accepts_codec_keys(key):
    match_key, stored_key = encode_key(key)
    assert checked_match_key(stored_key if stored_key is not None else match_key) == match_key
    assert checked_match_key(match_key) == match_key
