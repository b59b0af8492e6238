"""A Dict behaves like a Python ``dict``: a hypothesis state machine against a plain model.

The machine runs every Dict operation against both the daemon and a ``dict``, and
compares results, raised errors and the order of ``keys()``, ``values()`` and
``items()``. Keys come from a bundle seeded with keys that are equal across types
(``1``, ``1.0``, ``True``; ``0``, ``0.0``, ``-0.0``, ``False``), so entries collide as they
do in a ``dict``. There the first key object stored is the one ``keys()`` returns. One
rule kills the daemon with SIGKILL and restarts it: every write that returned must
survive. The same machine runs a second time through the ``.aio`` forms.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from sharedict import Dict

MISSING = object()


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    label: str


# Groups of keys that a dict treats as one, and keys of every encoded type.
SEED_KEYS = [
    1,
    1.0,
    True,
    0,
    0.0,
    -0.0,
    False,
    2,
    2.5,
    -1,
    10**30,
    "a",
    "b",
    "",
    b"a",
    None,
    (1, "a"),
    (1.0, "a"),
    (True, "a"),
    frozenset({1, "a"}),
    frozenset({1.0, "a"}),
    ("a", ("b", 2.0)),
    ("a", ("b", 2)),
    Point(1, "a"),
]

# NaN is left out: a dict matches a NaN key only by identity, which no store can keep.
plain_keys = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-3, max_value=3)
    | st.floats(allow_nan=False)
    | st.text(max_size=3)
    | st.binary(max_size=3),
    lambda children: st.tuples(children, children) | st.frozensets(children, max_size=3),
    max_leaves=4,
)

values = st.none() | st.integers() | st.text(max_size=5) | st.lists(st.integers(), max_size=3)

# kwargs of update() are strings; "a" and "b" collide with seed keys.
keyword_keys = st.sampled_from(["a", "b", "kw"])

SETTINGS = settings(max_examples=15, stateful_step_count=30)


def exact(key: Any) -> Any:
    """Return a form of ``key`` that distinguishes 1, 1.0, True and -0.0, also inside containers."""
    kind = type(key)
    if kind is tuple:
        return ("tuple", tuple(exact(item) for item in key))
    if kind is frozenset:
        return ("frozenset", tuple(sorted((exact(item) for item in key), key=repr)))
    if kind is float:
        return ("float", repr(key))  # repr keeps -0.0 apart from 0.0
    return (kind.__name__, key)


class DictMachine(RuleBasedStateMachine):
    """Drives the blocking API; ``AsyncDictMachine`` overrides the drivers below."""

    keys = Bundle("keys")

    def __init__(self, daemon: Any) -> None:
        super().__init__()
        self.daemon = daemon
        self.name = f"model-{uuid.uuid4().hex[:12]}"
        self.d = Dict.from_name(self.name, create_if_missing=True)
        self.model: dict[Any, Any] = {}
        self.restarted = False

    def teardown(self) -> None:
        Dict.objects.delete(self.name, allow_missing=True)

    # Drivers: how a call reaches the Dict.

    def run(self, operation: Any, *args: Any, **kwargs: Any) -> Any:
        return operation(*args, **kwargs)

    def collect(self, iteration: Any) -> list[Any]:
        return list(iteration())

    def set_item(self, key: Any, value: Any) -> None:
        self.d[key] = value

    def get_item(self, key: Any) -> Any:
        return self.d[key]

    def del_item(self, key: Any) -> None:
        del self.d[key]

    def has(self, key: Any) -> bool:
        return key in self.d

    def length(self) -> int:
        return len(self.d)

    def iterate(self) -> list[Any]:
        return list(self.d)

    # Keys.

    @initialize(target=keys)
    def seed_keys(self) -> Any:
        return multiple(*SEED_KEYS)

    @rule(target=keys, key=plain_keys)
    def add_key(self, key: Any) -> Any:
        return key

    # Writes.

    @rule(key=keys, value=values)
    def put(self, key: Any, value: Any) -> None:
        assert self.run(self.d.put, key, value) is True
        self.model[key] = value

    @rule(key=keys, value=values)
    def put_skip_if_exists(self, key: Any, value: Any) -> None:
        inserted = self.run(self.d.put, key, value, skip_if_exists=True)
        assert inserted is (key not in self.model)
        if inserted:
            self.model[key] = value

    @rule(key=keys, value=values)
    def setitem(self, key: Any, value: Any) -> None:
        self.set_item(key, value)
        self.model[key] = value

    @rule(entries=st.dictionaries(keys, values, max_size=4))
    def update_from_mapping(self, entries: dict[Any, Any]) -> None:
        self.run(self.d.update, entries)
        self.model.update(entries)

    @rule(pairs=st.lists(st.tuples(keys, values), max_size=4))
    def update_from_pairs(self, pairs: list[tuple[Any, Any]]) -> None:
        self.run(self.d.update, pairs)
        self.model.update(pairs)

    @rule(entries=st.dictionaries(keys, values, max_size=2), keywords=st.dictionaries(keyword_keys, values))
    def update_with_kwargs(self, entries: dict[Any, Any], keywords: dict[str, Any]) -> None:
        self.run(self.d.update, entries, **keywords)
        self.model.update(entries, **keywords)

    @rule(key=keys)
    def delitem(self, key: Any) -> None:
        if key in self.model:
            self.del_item(key)
            del self.model[key]
        else:
            with pytest.raises(KeyError):
                self.del_item(key)

    @rule(key=keys)
    def pop(self, key: Any) -> None:
        if key in self.model:
            assert self.run(self.d.pop, key) == self.model.pop(key)
        else:
            with pytest.raises(KeyError):
                self.run(self.d.pop, key)

    @rule(key=keys)
    def pop_with_default(self, key: Any) -> None:
        expected = self.model.pop(key, MISSING)
        popped = self.run(self.d.pop, key, MISSING)
        if expected is MISSING:
            assert popped is MISSING
        else:
            assert popped == expected

    @rule()
    def clear(self) -> None:
        self.run(self.d.clear)
        self.model.clear()

    # Reads.

    @rule(key=keys)
    def get(self, key: Any) -> None:
        assert self.run(self.d.get, key) == self.model.get(key)

    @rule(key=keys)
    def get_with_default(self, key: Any) -> None:
        value = self.run(self.d.get, key, MISSING)
        if key in self.model:
            assert value == self.model[key]
        else:
            assert value is MISSING

    @rule(key=keys)
    def getitem(self, key: Any) -> None:
        if key in self.model:
            assert self.get_item(key) == self.model[key]
        else:
            with pytest.raises(KeyError):
                self.get_item(key)

    @rule(key=keys)
    def contains(self, key: Any) -> None:
        assert self.has(key) is (key in self.model)
        assert self.run(self.d.contains, key) is (key in self.model)

    @rule()
    def len_matches(self) -> None:
        assert self.run(self.d.len) == len(self.model)
        assert self.length() == len(self.model)

    @rule()
    def values_in_order(self) -> None:
        assert self.collect(self.d.values) == list(self.model.values())

    @rule()
    def items_in_order(self) -> None:
        items = self.collect(self.d.items)
        assert [exact(key) for key, _ in items] == [exact(key) for key in self.model]
        assert [value for _, value in items] == list(self.model.values())

    @rule()
    def iter_in_order(self) -> None:
        assert [exact(key) for key in self.iterate()] == [exact(key) for key in self.model]

    # A crash.

    @precondition(lambda self: not self.restarted)
    @rule()
    def crash_and_restart(self) -> None:
        # One restart per example: starting a daemon costs far more than a rule.
        self.daemon.restart(crash=True)
        self.restarted = True

    @invariant()
    def keys_in_order(self) -> None:
        assert [exact(key) for key in self.collect(self.d.keys)] == [exact(key) for key in self.model]


class AsyncDictMachine(DictMachine):
    """The same rules through ``await d.op.aio(...)`` and ``async for ... in d.op.aio()``."""

    def __init__(self, daemon: Any) -> None:
        super().__init__(daemon)
        self.loop = asyncio.new_event_loop()

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def run(self, operation: Any, *args: Any, **kwargs: Any) -> Any:
        return self.loop.run_until_complete(operation.aio(*args, **kwargs))

    def collect(self, iteration: Any) -> list[Any]:
        async def drain() -> list[Any]:
            return [item async for item in iteration.aio()]

        return self.loop.run_until_complete(drain())

    def set_item(self, key: Any, value: Any) -> None:
        self.run(self.d.__setitem__, key, value)

    def get_item(self, key: Any) -> Any:
        return self.run(self.d.__getitem__, key)

    def del_item(self, key: Any) -> None:
        self.run(self.d.__delitem__, key)

    def has(self, key: Any) -> bool:
        return self.run(self.d.__contains__, key)

    def length(self) -> int:
        return self.run(self.d.__len__)

    def iterate(self) -> list[Any]:
        return self.collect(self.d.__iter__)


@pytest.fixture
def daemon(module_daemon):
    """One daemon for the module: every example works on a dict of its own."""
    return module_daemon


def test_blocking_dict_matches_model(daemon):
    run_state_machine_as_test(lambda: DictMachine(daemon), settings=SETTINGS)


def test_async_dict_matches_model(daemon):
    run_state_machine_as_test(lambda: AsyncDictMachine(daemon), settings=SETTINGS)
