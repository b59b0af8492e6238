"""The blocking Dict API against a real daemon: handles, management, iteration, threads, fork."""

from __future__ import annotations

import asyncio
import datetime
import os
import pickle
import pwd
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from typing import Any
from unittest import mock

import cloudpickle
import pytest

import sharedict
from helpers import wait_for_child
from sharedict import (
    AlreadyExistsError,
    Client,
    DaemonUnavailableError,
    Dict,
    DictInfo,
    InvalidError,
    NotFoundError,
    SerializationError,
)
from sharedict.api import protocol
from sharedict.api.config import Settings
from sharedict.api.dict import PAGE_SIZE
from sharedict.api.transport import Request

WAIT_TIMEOUT = 30.0


@pytest.fixture
def daemon(module_daemon):
    """One daemon for the module: every test works on dicts and environments of its own."""
    return module_daemon


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def fresh_dict() -> Dict:
    return Dict.from_name(unique("api"), create_if_missing=True).hydrate()


def wait_until(condition, description: str) -> None:
    """Poll ``condition`` until it returns true; fail after ``WAIT_TIMEOUT`` seconds."""
    deadline = time.monotonic() + WAIT_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT_TIMEOUT} s waiting until {description}")
        time.sleep(0.02)


def dict_exists(dict_id: str) -> bool:
    try:
        Dict.from_id(dict_id).len()
    except NotFoundError:
        return False
    return True


# from_name, create_if_missing and names.


def test_from_name_is_lazy(daemon):
    name = unique("lazy")
    d = Dict.from_name(name)
    assert d.name == name
    with pytest.raises(NotFoundError):
        d["key"]


def test_missing_dict_message_names_fix(daemon):
    name = unique("lazy")
    with pytest.raises(NotFoundError) as caught:
        Dict.from_name(name).get("key")
    message = str(caught.value)
    assert repr(name) in message
    assert "create_if_missing=True" in message


def test_from_name_creates_nothing_when_missing(daemon):
    name = unique("lazy")
    with pytest.raises(NotFoundError):
        Dict.from_name(name).len()
    with pytest.raises(NotFoundError):
        Dict.from_name(name).hydrate()


def test_create_if_missing_creates_on_first_use(daemon):
    name = unique("created")
    Dict.from_name(name, create_if_missing=True)["key"] = "value"
    assert Dict.from_name(name)["key"] == "value"


def test_create_if_missing_keeps_existing_entries(daemon):
    name = unique("created")
    Dict.from_name(name, create_if_missing=True)["key"] = "value"
    assert Dict.from_name(name, create_if_missing=True)["key"] == "value"


@pytest.mark.parametrize("name", ["has space", "a/b", "x" * 65, "", "naïve", "tab\t", "new\nline", "a:b"])
def test_invalid_name_raises_at_from_name(daemon, name):
    with pytest.raises(InvalidError, match="invalid dict name"):
        Dict.from_name(name)


@pytest.mark.parametrize("name", ["a", "x" * 64, "with-dash_under.dot", "0123", "..", "-"])
def test_valid_names(daemon, name):
    environment = unique("names")
    d = Dict.from_name(name, environment_name=environment, create_if_missing=True)
    d["key"] = "value"
    assert d.info().name == name


def test_non_string_name_raises(daemon):
    with pytest.raises(InvalidError):
        Dict.from_name(42)  # type: ignore[arg-type]


def test_invalid_environment_name_raises(daemon):
    with pytest.raises(InvalidError, match="environment name"):
        Dict.from_name("fine", environment_name="not fine")


@pytest.mark.parametrize("call", ["create", "delete"])
def test_invalid_name_raises_in_objects(daemon, call):
    with pytest.raises(InvalidError):
        getattr(Dict.objects, call)("has space")


def test_environments_are_separate(daemon):
    name = unique("shared-name")
    first = Dict.from_name(name, environment_name=unique("env"), create_if_missing=True)
    second = Dict.from_name(name, environment_name=unique("env"), create_if_missing=True)
    first["key"] = "first"
    second["key"] = "second"
    assert first["key"] == "first"
    assert second["key"] == "second"
    assert first != second


def test_default_environment_is_main(daemon):
    name = unique("main")
    Dict.from_name(name, create_if_missing=True)["key"] = "value"
    assert Dict.from_name(name, environment_name="main")["key"] == "value"


def test_environment_not_seen_from_other(daemon):
    environment = unique("env")
    name = unique("only-here")
    Dict.objects.create(name, environment_name=environment)
    with pytest.raises(NotFoundError):
        Dict.from_name(name).len()


# from_id.


def test_from_id_reaches_same_dict(daemon):
    d = fresh_dict()
    d["key"] = "value"
    same = Dict.from_id(d.object_id)
    assert same["key"] == "value"
    assert same == d


def test_from_id_learns_name(daemon):
    d = fresh_dict()
    same = Dict.from_id(d.object_id)
    assert same.info().name == d.name


def test_from_id_of_ephemeral_dict(daemon):
    with Dict.ephemeral() as d:
        d["key"] = "value"
        assert Dict.from_id(d.object_id)["key"] == "value"


def test_from_id_message_names_dict(daemon):
    d = fresh_dict()
    with pytest.raises(SerializationError) as caught:
        Dict.from_id(d.object_id)["key"] = threading.Lock()
    assert f"dict {d.object_id}" in str(caught.value)
    assert "ephemeral" not in str(caught.value)


def test_from_id_message_after_lookup(daemon):
    d = fresh_dict()
    same = Dict.from_id(d.object_id)
    same.len()  # the lookup teaches the handle its name
    with pytest.raises(SerializationError) as caught:
        same["key"] = threading.Lock()
    assert f"dict {d.name!r}" in str(caught.value)


class RecordingClient(Client):
    """A client that records the operation of every request it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def call(self, request: Request) -> Any:
        self.ops.append(request.op)
        return super().call(request)


def test_first_calls_look_up_once(daemon):
    name = fresh_dict().name
    client = RecordingClient()
    d = Dict.from_name(name, client=client)
    assert d.info().name == name
    assert d.get("missing") is None
    d["key"] = "value"
    assert d.info().name == name
    assert client.ops == [protocol.DICT_OPEN, protocol.GET, protocol.PUT, protocol.DICT_BY_ID]


def test_info_of_deleted_dict_raises(daemon):
    d = fresh_dict()
    assert d.info().name == d.name
    Dict.objects.delete(d.name)
    with pytest.raises(NotFoundError, match="was deleted"):
        d.info()


def test_not_found_fix_names_environment(daemon):
    environment = unique("env")
    with pytest.raises(NotFoundError) as caught:
        Dict.from_name("absent", environment_name=environment).len()
    message = str(caught.value)
    assert f"Dict.from_name('absent', environment_name={environment!r}, create_if_missing=True)" in message
    assert f"Dict.objects.create('absent', environment_name={environment!r})" in message


def test_message_names_environment(daemon):
    environment = unique("env")
    d = Dict.from_name("labelled", environment_name=environment, create_if_missing=True)
    with pytest.raises(SerializationError) as caught:
        d["key"] = threading.Lock()
    assert f"dict 'labelled' in environment {environment!r}" in str(caught.value)


def test_from_id_looks_up_by_id(daemon):
    d = fresh_dict()
    client = RecordingClient()
    same = Dict.from_id(d.object_id, client=client)
    assert "key" not in same
    assert same.info().name == d.name
    assert client.ops == [protocol.DICT_BY_ID, protocol.CONTAINS, protocol.DICT_BY_ID]


@pytest.mark.parametrize("dict_id", ["", "di-", "di-xyz", "abc-0123456789abcdef", "di-0123456789abcdeg"])
def test_from_id_invalid_raises(daemon, dict_id):
    with pytest.raises(InvalidError, match="invalid dict id"):
        Dict.from_id(dict_id)


def test_from_id_unknown_raises_on_use(daemon):
    d = Dict.from_id("di-0000000000000000")
    with pytest.raises(NotFoundError, match="not found: no dict has this id, or it was deleted"):
        d.len()


def test_unknown_id_request_message(daemon):
    # The daemon's own message, which clients of the raw protocol see.
    with pytest.raises(NotFoundError, match="not found: no dict has this id, or it was deleted"):
        Client.default().call(Request(protocol.DICT_BY_ID, bytes(8)))


# Ephemeral dicts.


def test_ephemeral_works_inside_with(daemon):
    with Dict.ephemeral() as d:
        d["key"] = "value"
        assert d["key"] == "value"
        assert d.info().name is None


def test_ephemeral_deleted_after_with(daemon):
    with Dict.ephemeral() as d:
        d["key"] = "value"
        dict_id = d.object_id
    assert not dict_exists(dict_id)
    with pytest.raises(NotFoundError):
        d["key"]


def test_ephemeral_deleted_after_exception(daemon):
    with pytest.raises(ValueError):
        with Dict.ephemeral() as d:
            dict_id = d.object_id
            raise ValueError("leave the block")
    assert not dict_exists(dict_id)


def test_ephemeral_not_listed(daemon):
    environment = unique("env")
    with Dict.ephemeral(environment_name=environment) as d:
        d["key"] = "value"
        assert Dict.objects.list(environment_name=environment) == []


def test_ephemeral_with_async_with(daemon):
    async def scenario() -> str:
        async with Dict.ephemeral() as d:
            await d.put.aio("key", "value")
            assert await d.get.aio("key") == "value"
            return d.object_id

    dict_id = asyncio.run(scenario())
    assert not dict_exists(dict_id)


def test_ephemeral_deleted_when_creator_dies(daemon, child_env):
    code = textwrap.dedent(
        """
        import sys, time
        from sharedict import Dict
        with Dict.ephemeral() as d:
            d["key"] = "value"
            print(d.object_id, flush=True)
            time.sleep(600)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        dict_id = child.stdout.readline().strip()
        assert dict_id.startswith("di-"), child.stderr.read()
        assert Dict.from_id(dict_id)["key"] == "value"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        child.stderr.close()
    wait_until(lambda: not dict_exists(dict_id), f"the daemon deleted {dict_id}")


def test_ephemeral_survives_another_process_exit(daemon, child_env):
    with Dict.ephemeral() as d:
        d["key"] = "value"
        result = subprocess.run(
            [sys.executable, "-c", f"from sharedict import Dict; print(Dict.from_id({d.object_id!r})['key'])"],
            env=child_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.stdout.strip() == "value", result.stderr
        assert d["key"] == "value"


def run_ephemeral_child(child_env: dict[str, str], between: str) -> subprocess.CompletedProcess[str]:
    """Run a child that fills an ephemeral dict, runs ``between``, then prints the entry.

    A wrong deletion would come from the writer after the connection closed, or from the
    peer watcher, which runs once a second, so the child gives both time to happen.
    """
    code = textwrap.dedent(
        """
        import time
        from sharedict import Client, Dict, NotFoundError
        with Dict.ephemeral() as d:
            d["key"] = "value"
        {between}
            time.sleep(2.5)
            print(d.get("key"))
        """
    ).format(between=textwrap.indent(textwrap.dedent(between), "    "))
    return subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=60)


def test_ephemeral_survives_error_reply(daemon, child_env):
    # The error reply must not close the process's only connection, on which the daemon
    # would delete its ephemeral dicts.
    result = run_ephemeral_child(
        child_env,
        """
        try:
            Dict.from_name("no-such-dict").get("key")
        except NotFoundError:
            pass
        """,
    )
    assert result.stdout.strip() == "value", result.stderr


def test_ephemeral_survives_closed_connections(daemon, child_env):
    result = run_ephemeral_child(child_env, "Client.default().close()\n")
    assert result.stdout.strip() == "value", result.stderr


# Dict.objects.


def test_objects_create_then_use(daemon):
    name = unique("objects")
    assert Dict.objects.create(name) is None
    Dict.from_name(name)["key"] = "value"
    assert Dict.from_name(name).len() == 1


def test_objects_create_existing_raises(daemon):
    name = unique("objects")
    Dict.objects.create(name)
    with pytest.raises(AlreadyExistsError, match="allow_existing=True"):
        Dict.objects.create(name)


def test_objects_create_allow_existing_keeps_entries(daemon):
    name = unique("objects")
    Dict.objects.create(name)
    Dict.from_name(name)["key"] = "value"
    Dict.objects.create(name, allow_existing=True)
    assert Dict.from_name(name)["key"] == "value"


def test_objects_create_race_has_one_winner(daemon):
    name = unique("contested")
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def create() -> None:
        barrier.wait()
        try:
            Dict.objects.create(name)
            outcomes.append("created")
        except AlreadyExistsError:
            outcomes.append("exists")

    threads = [threading.Thread(target=create) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(outcomes) == ["created"] + ["exists"] * 5


def test_objects_list_newest_first(daemon):
    environment = unique("env")
    names = [unique("listed") for _ in range(4)]
    for name in names:
        Dict.objects.create(name, environment_name=environment)
    listed = Dict.objects.list(environment_name=environment)
    assert [d.name for d in listed] == list(reversed(names))


def test_objects_list_returns_live_handles(daemon):
    environment = unique("env")
    name = unique("listed")
    Dict.objects.create(name, environment_name=environment)
    [handle] = Dict.objects.list(environment_name=environment)
    handle["key"] = "value"
    assert Dict.from_name(name, environment_name=environment)["key"] == "value"
    assert isinstance(handle.info(), DictInfo)


def test_objects_list_max_objects(daemon):
    environment = unique("env")
    names = [unique("listed") for _ in range(5)]
    for name in names:
        Dict.objects.create(name, environment_name=environment)
    listed = Dict.objects.list(max_objects=2, environment_name=environment)
    assert [d.name for d in listed] == [names[4], names[3]]
    assert Dict.objects.list(max_objects=0, environment_name=environment) == []


@pytest.mark.parametrize("max_objects", [-1, 1.5, True, "2"])
def test_objects_list_bad_max_objects_raises(daemon, max_objects):
    with pytest.raises(InvalidError, match=rf"max_objects={max_objects!r} is not a count; pass None or an int"):
        Dict.objects.list(max_objects=max_objects)


def test_objects_list_created_before(daemon):
    environment = unique("env")
    names = [unique("listed") for _ in range(3)]
    for name in names:
        Dict.objects.create(name, environment_name=environment)
    cutoff = Dict.from_name(names[2], environment_name=environment).info().created_at
    listed = Dict.objects.list(created_before=cutoff, environment_name=environment)
    assert [d.name for d in listed] == [names[1], names[0]]


def test_objects_list_pages_by_created_before(daemon):
    environment = unique("env")
    names = [unique("listed") for _ in range(5)]
    for name in names:
        Dict.objects.create(name, environment_name=environment)

    listed: list[str | None] = []
    page = Dict.objects.list(max_objects=2, environment_name=environment)
    while page:
        listed.extend(d.name for d in page)
        cutoff = page[-1].info().created_at
        page = Dict.objects.list(max_objects=2, created_before=cutoff, environment_name=environment)

    assert listed == list(reversed(names))


def test_objects_list_created_before_iso_string(daemon):
    environment = unique("env")
    name = unique("listed")
    Dict.objects.create(name, environment_name=environment)
    later = (datetime.datetime.now() + datetime.timedelta(hours=1)).isoformat()
    earlier = (datetime.datetime.now() - datetime.timedelta(hours=1)).isoformat()
    assert [d.name for d in Dict.objects.list(created_before=later, environment_name=environment)] == [name]
    assert Dict.objects.list(created_before=earlier, environment_name=environment) == []


def test_objects_list_invalid_created_before(daemon):
    with pytest.raises(InvalidError, match="ISO 8601"):
        Dict.objects.list(created_before="yesterday")


def test_objects_delete(daemon):
    name = unique("deleted")
    Dict.from_name(name, create_if_missing=True)["key"] = "value"
    Dict.objects.delete(name)
    with pytest.raises(NotFoundError):
        Dict.from_name(name).len()


def test_objects_delete_missing_raises(daemon):
    with pytest.raises(NotFoundError, match="allow_missing=True"):
        Dict.objects.delete(unique("never-created"))


def test_objects_delete_allow_missing(daemon):
    assert Dict.objects.delete(unique("never-created"), allow_missing=True) is None


def test_objects_delete_in_other_environment(daemon):
    name = unique("deleted")
    environment = unique("env")
    in_main = Dict.from_name(name, create_if_missing=True)
    in_main["key"] = "value"
    Dict.objects.create(name, environment_name=environment)
    Dict.objects.delete(name, environment_name=environment)
    assert in_main["key"] == "value"


def test_objects_aio_forms(daemon):
    environment = unique("env")
    name = unique("async")

    async def scenario() -> list[str | None]:
        await Dict.objects.create.aio(name, environment_name=environment)
        listed = await Dict.objects.list.aio(environment_name=environment)
        await Dict.objects.delete.aio(name, environment_name=environment)
        return [d.name for d in listed]

    assert asyncio.run(scenario()) == [name]
    assert Dict.objects.list(environment_name=environment) == []


# Stale handles.


def test_stale_handle_raises_after_delete(daemon):
    d = fresh_dict()
    d["key"] = "value"
    Dict.objects.delete(d.name)
    with pytest.raises(NotFoundError):
        d["key"]
    with pytest.raises(NotFoundError):
        d["key"] = "value"
    with pytest.raises(NotFoundError):
        list(d.items())


def test_stale_handle_message_names_fix(daemon):
    d = fresh_dict()
    Dict.objects.delete(d.name)
    with pytest.raises(NotFoundError) as caught:
        d.len()
    message = str(caught.value)
    assert repr(d.name) in message
    assert "Dict.from_name" in message


def test_stale_handle_after_recreate(daemon):
    d = fresh_dict()
    d["key"] = "old"
    Dict.objects.delete(d.name)
    renewed = Dict.from_name(d.name, create_if_missing=True)
    renewed["key"] = "new"
    with pytest.raises(NotFoundError):
        d["key"]
    with pytest.raises(NotFoundError):
        d.put("other", "value")
    assert renewed["key"] == "new"
    assert renewed.len() == 1


# Exceptions.


@pytest.mark.parametrize("name", [name for name in sharedict.__all__ if name.endswith(("Error", "Warning"))])
def test_exception_named_by_public_module(name):
    exception_class = getattr(sharedict, name)
    assert exception_class.__module__ == "sharedict"
    assert pickle.loads(pickle.dumps(exception_class)) is exception_class


# info, hydrate, repr and identity.


def test_info(daemon):
    before = datetime.datetime.now(datetime.timezone.utc)
    d = fresh_dict()
    info = d.info()
    after = datetime.datetime.now(datetime.timezone.utc)
    assert info.name == d.name
    assert info.created_at.tzinfo is not None
    assert before - datetime.timedelta(seconds=5) <= info.created_at <= after + datetime.timedelta(seconds=5)
    assert info.created_by == pwd.getpwuid(os.getuid()).pw_name


def test_info_aio(daemon):
    d = fresh_dict()
    assert asyncio.run(d.info.aio()).name == d.name


def test_hydrate_returns_handle(daemon):
    d = Dict.from_name(unique("hydrated"), create_if_missing=True)
    assert d.hydrate() is d
    assert d.object_id.startswith("di-")
    assert len(d.object_id) == 19


def test_hydrate_client_serves_later_calls(daemon, monkeypatch):
    unreachable = Settings(socket_path="/nonexistent/sharedict.sock", data_dir="/nonexistent", autostart=False)
    monkeypatch.setattr(Client, "_default", Client(unreachable))
    d = Dict.from_name(unique("hydrated"), create_if_missing=True)
    d.hydrate(client=daemon.client())
    d["key"] = "value"
    assert d["key"] == "value"


def test_hydrate_positional_client_used(daemon, monkeypatch):
    unreachable = Settings(socket_path="/nonexistent/sharedict.sock", data_dir="/nonexistent", autostart=False)
    monkeypatch.setattr(Client, "_default", Client(unreachable))
    d = Dict.from_name(unique("hydrated"), create_if_missing=True)
    assert d.hydrate(daemon.client()) is d
    assert asyncio.run(d.len.aio()) == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda: Dict.from_name("kv", client="oops"),
        lambda: Dict.from_id("di-0123456789abcdef", client="oops"),
        lambda: Dict.ephemeral(client="oops"),
        lambda: Dict.objects.list(client="oops"),
    ],
    ids=["from_name", "from_id", "ephemeral", "objects-list"],
)
def test_bad_client_raises(daemon, call):
    with pytest.raises(TypeError, match=r"client='oops' is not a sharedict Client"):
        call()


def test_hydrate_with_bad_client_leaves_handle_working(daemon):
    d = Dict.from_name(unique("hydrated"), create_if_missing=True)
    with pytest.raises(TypeError, match=r"client='oops' is not a sharedict Client"):
        d.hydrate("oops")
    d["key"] = "value"
    assert d["key"] == "value"


def test_operation_called_through_class(daemon):
    d = fresh_dict()
    Dict.put(d, "key", "value")
    assert Dict.get(d, "key") == "value"
    assert Dict.get(d, "missing", "default") == "default"


def test_patched_method_reaches_used_handle(daemon):
    d = fresh_dict()
    d.get("key")
    with mock.patch.object(Dict, "get", return_value="patched"):
        assert d.get("key") == "patched"


def test_hydrate_aio(daemon):
    d = Dict.from_name(unique("hydrated"), create_if_missing=True)
    assert asyncio.run(d.hydrate.aio()) is d


def test_repr(daemon):
    assert repr(Dict.from_name("kv")) == "sharedict.Dict.from_name('kv')"
    assert repr(Dict.from_name("kv", environment_name="dev")) == "sharedict.Dict.from_name('kv', environment_name='dev')"


def test_repr_of_from_id(daemon):
    d = fresh_dict()
    assert repr(Dict.from_id(d.object_id)) == f"sharedict.Dict.from_id({d.object_id!r})"


def test_handles_equal_and_hash(daemon):
    d = fresh_dict()
    same = Dict.from_name(d.name)
    by_id = Dict.from_id(d.object_id)
    assert d == same
    assert d == by_id
    assert hash(d) == hash(same) == hash(by_id)
    assert len({d, same, by_id}) == 1


def test_handles_of_different_dicts_differ(daemon):
    first = fresh_dict()
    second = fresh_dict()
    assert first != second
    assert first != first.name


def test_handle_is_true_when_empty(daemon):
    assert fresh_dict()


def test_dict_constructor_raises(daemon):
    with pytest.raises(RuntimeError, match="from_name"):
        Dict()


# Handles as values and keys.


def test_pickled_handle_in_same_process(daemon):
    d = fresh_dict()
    d["key"] = "value"
    assert pickle.loads(pickle.dumps(d))["key"] == "value"
    assert cloudpickle.loads(cloudpickle.dumps(d)) == d


def test_pickled_handle_in_other_process(daemon, child_env):
    d = fresh_dict()
    d["key"] = "from parent"
    code = textwrap.dedent(
        """
        import pickle, sys
        d = pickle.loads(sys.stdin.buffer.read())
        print(d["key"])
        d["reply"] = "from child"
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(d), env=child_env, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == "from parent"
    assert d["reply"] == "from child"


def test_pickled_ephemeral_handle_in_other_process(daemon, child_env):
    with Dict.ephemeral() as d:
        code = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())['key'] = 'from child'"
        result = subprocess.run(
            [sys.executable, "-c", code], input=pickle.dumps(d), env=child_env, capture_output=True, timeout=60
        )
        assert result.returncode == 0, result.stderr.decode()
        assert d["key"] == "from child"


def test_handle_as_key_and_value(daemon):
    d = fresh_dict()
    d[d] = d
    assert d[d] == d
    assert list(d.keys()) == [d]
    [(key, value)] = list(d.items())
    value["other"] = 1
    assert d.len() == 2
    assert key == d


def test_handle_from_id_as_key(daemon):
    d = fresh_dict()
    d[d] = "value"
    assert d[Dict.from_id(d.object_id)] == "value"
    assert d[Dict.from_name(d.name)] == "value"


def test_aio_handle_as_key_never_blocks(daemon, monkeypatch):
    d = fresh_dict()
    other = Dict.from_name(unique("not-looked-up"), create_if_missing=True)
    by_id = Dict.from_id(d.object_id)

    def blocking_call(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an .aio call made a blocking request")

    async def scenario() -> list[Any]:
        await d.put.aio(other, by_id)
        await d.update.aio({("pair", by_id): other})
        return [await d.get.aio(other), await d.get.aio(("pair", d))]

    monkeypatch.setattr(Client, "call", blocking_call)
    fetched = asyncio.run(scenario())
    monkeypatch.undo()
    assert fetched == [d, other]
    assert other.len() == 0


def test_nested_handle_uses_own_daemon(daemon, other_daemon):
    name = unique("on-both")
    on_this_daemon = Dict.from_name(name, create_if_missing=True).hydrate()
    on_other_daemon = Dict.from_name(name, create_if_missing=True, client=other_daemon.client())
    fresh_dict()["ref"] = on_other_daemon  # stored through this daemon, looked up on its own
    on_other_daemon["where"] = "other daemon"
    assert on_other_daemon.object_id != on_this_daemon.object_id
    assert "where" not in on_this_daemon


def test_nested_handle_of_other_daemon_in_aio(daemon, other_daemon):
    name = unique("not-looked-up")
    on_other_daemon = Dict.from_name(name, create_if_missing=True, client=other_daemon.client())
    d = fresh_dict()

    async def store() -> None:
        await d.put.aio("ref", on_other_daemon)

    with pytest.raises(InvalidError, match=r"await handle.hydrate.aio\(\)"):
        asyncio.run(store())
    assert "ref" not in d

    async def store_after_lookup() -> None:
        await on_other_daemon.hydrate.aio()
        await d.put.aio("ref", on_other_daemon)

    asyncio.run(store_after_lookup())
    assert d["ref"].object_id == on_other_daemon.object_id


def test_handle_in_container_value(daemon):
    d = fresh_dict()
    other = fresh_dict()
    other["key"] = "value"
    d["nested"] = {"handle": other, "items": [other]}
    fetched = d["nested"]
    assert fetched["handle"]["key"] == "value"
    assert fetched["items"][0] == other


# Values are copies.


def test_fetched_value_is_a_copy(daemon):
    d = fresh_dict()
    d["list"] = [1, 2]
    fetched = d["list"]
    fetched.append(3)
    assert d["list"] == [1, 2]


def test_stored_value_is_a_copy(daemon):
    d = fresh_dict()
    value = {"count": 1}
    d["value"] = value
    value["count"] = 2
    assert d["value"] == {"count": 1}


def test_put_back_changes_value(daemon):
    d = fresh_dict()
    d["list"] = [1]
    fetched = d["list"]
    fetched.append(2)
    d["list"] = fetched
    assert d["list"] == [1, 2]


def test_lambda_value_round_trips(daemon):
    d = fresh_dict()
    d["function"] = lambda x: x * 2
    assert d["function"](21) == 42


# Updates of many entries.


def test_update_with_repeated_keys_keeps_first_positions(daemon):
    d = fresh_dict()
    long_key = "long-" * 200  # beyond the length at which the engine indexes a key's digest
    d.update({"a": 1, "b": 2})
    d.update([("c", 3), ("a", 10), (long_key, 5), ("c", 30), ("d", 4), ("b", 20), (long_key, 50)])

    assert list(d.items()) == [("a", 10), ("b", 20), ("c", 30), (long_key, 50), ("d", 4)]
    assert d.len() == 5


def test_update_keywords_self_and_client_are_keys(daemon):
    d = fresh_dict()
    d.update(client="server-1", self=1, other=2, kwargs=3)
    asyncio.run(d.update.aio(client="server-2", self=4))
    d.put("client", "server-3", skip_if_exists=True)

    assert dict(d.items()) == {"client": "server-2", "self": 4, "other": 2, "kwargs": 3}


def test_update_of_many_entries_keeps_order(daemon):
    d = fresh_dict()
    d.update((i, "first") for i in range(0, 2 * PAGE_SIZE, 2))
    d.update((i, "second") for i in range(2 * PAGE_SIZE))

    assert list(d.keys()) == list(range(0, 2 * PAGE_SIZE, 2)) + list(range(1, 2 * PAGE_SIZE, 2))
    assert set(d.values()) == {"second"}
    assert d.len() == 2 * PAGE_SIZE


# Iteration.


def test_iteration_over_pages(daemon):
    d = fresh_dict()
    count = 2500
    d.update((f"key-{i}", i) for i in range(count))
    assert list(d.keys()) == [f"key-{i}" for i in range(count)]
    assert list(d.values()) == list(range(count))
    assert list(d.items()) == [(f"key-{i}", i) for i in range(count)]
    assert list(d) == [f"key-{i}" for i in range(count)]


def test_iteration_reads_one_page_ahead(daemon):
    d = fresh_dict()
    count = 2 * PAGE_SIZE + 200
    d.update((i, "original") for i in range(count))
    items = d.items()
    first = [next(items) for _ in range(10)]

    # The first page has been read and the second requested, but not the third, so the
    # iteration returns these writes to its entries: a changed value, and deleted entries.
    d.update((i, "changed") for i in range(2 * PAGE_SIZE, count))
    for i in range(count - 20, count):
        del d[i]
    rest = list(items)

    assert first == [(i, "original") for i in range(10)]
    assert rest[: 2 * PAGE_SIZE - 10] == [(i, "original") for i in range(10, 2 * PAGE_SIZE)]
    assert rest[2 * PAGE_SIZE - 10 :] == [(i, "changed") for i in range(2 * PAGE_SIZE, count - 20)]


def test_iteration_of_large_values(daemon):
    d = fresh_dict()
    megabyte = 1 << 20
    d.update((i, bytes([i]) * megabyte) for i in range(12))
    sizes = [(key, len(value), value[:1]) for key, value in d.items()]
    assert sizes == [(i, megabyte, bytes([i])) for i in range(12)]


def test_iteration_of_empty_dict(daemon):
    d = fresh_dict()
    assert list(d.items()) == []


def test_reversed_raises_type_error(daemon):
    d = fresh_dict()
    d.update({0: "zero", 1: "one"})
    with pytest.raises(TypeError, match=r"use `reversed\(list\(d\.keys\(\)\)\)`"):
        reversed(d)
    assert list(reversed(list(d.keys()))) == [1, 0]


def test_iteration_stopped_early(daemon):
    d = fresh_dict()
    d.update((i, i) for i in range(1500))
    for key in d.keys():
        if key == 3:
            break
    assert d.len() == 1500


def test_iteration_stopped_early_keeps_connection(daemon):
    # Leaving the loop drops the reply of the page read ahead and keeps its connection
    # open: closing the process's last connection would delete its ephemeral dicts.
    client = daemon.client()
    with Dict.ephemeral(client=client) as d:
        d.update((i, i) for i in range(3 * PAGE_SIZE))
        for key in d.keys():
            if key == 3:
                break
        idle = list(client._idle)
        assert len(idle) == 1
        assert not idle[0].closed
        assert d.len() == 3 * PAGE_SIZE


def test_iteration_of_dict_deleted_meanwhile_raises(daemon):
    d = fresh_dict()
    d.update((i, i) for i in range(3 * PAGE_SIZE))
    keys = d.keys()
    assert next(keys) == 0
    Dict.objects.delete(d.name)
    with pytest.raises(NotFoundError, match="was deleted"):
        list(keys)


def test_async_iteration_of_dict_deleted_meanwhile_raises(daemon):
    d = fresh_dict()
    d.update((i, i) for i in range(3 * PAGE_SIZE))

    async def scenario() -> list[Any]:
        keys = []
        async for key in d.keys.aio():
            if not keys:
                await Dict.objects.delete.aio(d.name)
            keys.append(key)
        return keys

    with pytest.raises(NotFoundError, match="was deleted"):
        asyncio.run(scenario())


def test_iteration_while_writing_yields_untouched_once(daemon):
    d = fresh_dict()
    d.update((f"stable-{i}", i) for i in range(PAGE_SIZE))
    d.update((f"churn-{i}", i) for i in range(PAGE_SIZE))
    stable = {f"stable-{i}" for i in range(PAGE_SIZE)}

    seen: list[str] = []
    for position, key in enumerate(d.keys()):
        seen.append(key)
        # Interleave deletes, re-inserts and inserts with the pages being read.
        if position % 25 == 0 and position < 2 * PAGE_SIZE:
            d.pop(f"churn-{position // 2}", None)
            d.update({f"churn-{(position * 7) % PAGE_SIZE}": "back", f"new-{position}": position})

    stable_seen = [key for key in seen if key in stable]
    assert sorted(stable_seen) == sorted(stable)
    assert len(stable_seen) == len(set(stable_seen))


def test_iteration_while_threads_write(daemon):
    d = fresh_dict()
    d.update((f"stable-{i}", i) for i in range(3000))
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn(worker: int) -> None:
        other = Dict.from_name(d.name)
        index = 0
        try:
            while not stop.is_set():
                other[f"churn-{worker}-{index}"] = index
                if index % 3 == 0:
                    other.pop(f"churn-{worker}-{index // 2}", None)
                index += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(worker,)) for worker in range(3)]
    for thread in threads:
        thread.start()
    try:
        rounds = [[key for key in d.keys() if key.startswith("stable-")] for _ in range(3)]
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    assert errors == []
    for stable_seen in rounds:
        assert stable_seen == [f"stable-{i}" for i in range(3000)]


def test_iteration_across_clear(daemon):
    d = fresh_dict()
    d.update((i, i) for i in range(1500))
    keys = d.keys()
    assert next(keys) == 0
    d.clear()
    rest = list(keys)
    assert rest == list(range(1, len(rest) + 1))


# Daemon restarts.


def test_entries_survive_crash_restart(daemon):
    d = fresh_dict()
    d.update((i, i) for i in range(100))
    d["key"] = "value"
    daemon.restart(crash=True)
    assert d["key"] == "value"
    assert d.len() == 101


def test_async_handle_reconnects_after_restart(daemon):
    d = fresh_dict()

    async def scenario() -> list[Any]:
        await d.put.aio("before", 1)
        daemon.restart(crash=True)
        await d.put.aio("after", 2)
        return [item async for item in d.items.aio()]

    assert asyncio.run(scenario()) == [("before", 1), ("after", 2)]


# Threads and fork.


def test_threads_share_one_handle(daemon):
    d = fresh_dict()
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(100):
                d[(worker, i)] = [worker, i]
                assert d[(worker, i)] == [worker, i]
                assert d.get((worker, i - 1), "missing") == ([worker, i - 1] if i else "missing")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert d.len() == 8 * 100


def test_threads_with_event_loops_share_one_handle(daemon):
    d = fresh_dict()
    errors: list[BaseException] = []

    async def work(worker: int) -> None:
        await asyncio.gather(*(d.put.aio((worker, i), i) for i in range(50)))
        values = await asyncio.gather(*(d.get.aio((worker, i)) for i in range(50)))
        assert values == list(range(50))

    def run(worker: int) -> None:
        try:
            asyncio.run(work(worker))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert d.len() == 4 * 50


def test_threads_race_on_skip_if_exists(daemon):
    d = fresh_dict()
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def insert(worker: int) -> None:
        barrier.wait()
        results.append(d.put("contested", worker, skip_if_exists=True))

    threads = [threading.Thread(target=insert, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(results) == [False] * 7 + [True]


def test_threads_race_on_pop(daemon):
    d = fresh_dict()
    d["contested"] = "value"
    results: list[object] = []
    barrier = threading.Barrier(8)

    def pop() -> None:
        barrier.wait()
        results.append(d.pop("contested", None))

    threads = [threading.Thread(target=pop) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results.count("value") == 1
    assert results.count(None) == 7


def run_forked(child_body) -> int:
    """Run ``child_body`` in a forked child and return its exit code."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            child_body()
            status = 0
        finally:
            os._exit(status)
    return wait_for_child(pid, WAIT_TIMEOUT)


@pytest.mark.parametrize("explicit_client", [False, True])
def test_fork_after_use(daemon, explicit_client):
    client = daemon.client() if explicit_client else None
    d = Dict.from_name(unique("forked"), create_if_missing=True, client=client)
    d["parent"] = "before fork"

    def child() -> None:
        for i in range(100):
            d[f"child-{i}"] = i
            if d[f"child-{i}"] != i:
                raise AssertionError(f"child read a wrong value for child-{i}")

    # The parent keeps using its connections while the child uses its own.
    stop = threading.Event()
    parent_errors: list[BaseException] = []

    def parent_load() -> None:
        i = 0
        try:
            while not stop.is_set():
                d[f"parent-{i % 50}"] = i
                assert d[f"parent-{i % 50}"] == i
                i += 1
        except BaseException as exc:
            parent_errors.append(exc)

    exit_code = run_forked(child)
    loader = threading.Thread(target=parent_load)
    loader.start()
    second_exit_code = run_forked(child)
    stop.set()
    loader.join()

    assert exit_code == 0
    assert second_exit_code == 0
    assert parent_errors == []
    assert d["parent"] == "before fork"
    assert d["child-99"] == 99


def test_fork_after_async_use(daemon):
    d = fresh_dict()

    async def write(key: str) -> None:
        await d.put.aio(key, key)
        assert await d.get.aio(key) == key

    # The parent's loop and its connection stay open across the fork.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(write("parent-before"))
        exit_code = run_forked(lambda: asyncio.run(write("child")))
        loop.run_until_complete(write("parent-after"))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    assert exit_code == 0
    assert list(d.keys()) == ["parent-before", "child", "parent-after"]


def test_fork_child_ephemeral_deleted_on_exit(daemon):
    read_end, write_end = os.pipe()

    def child() -> None:
        os.close(read_end)
        with Dict.ephemeral() as d:
            d["key"] = "value"
            os.write(write_end, d.object_id.encode())
            # Leave without the block's delete, as a crash would.
            os._exit(0)

    pid = os.fork()
    if pid == 0:
        try:
            child()
        finally:
            os._exit(1)
    os.close(write_end)
    dict_id = os.read(read_end, 100).decode()
    os.close(read_end)
    wait_for_child(pid, WAIT_TIMEOUT)

    assert dict_id.startswith("di-")
    wait_until(lambda: not dict_exists(dict_id), f"the daemon deleted {dict_id}")


# Settings from the environment.


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "soon"])
def test_invalid_sweep_interval_environment_rejected(value):
    with pytest.raises(InvalidError) as caught:
        Settings.from_environ({"SHAREDICT_SWEEP_INTERVAL": value})
    assert f"SHAREDICT_SWEEP_INTERVAL={value!r}" in str(caught.value)
    assert "set it to a positive number of seconds, such as 60" in str(caught.value)


@pytest.mark.parametrize("value", ["-1", "inf", "nan", "soon"])
def test_invalid_expire_after_environment_names_zero(value):
    with pytest.raises(InvalidError) as caught:
        Settings.from_environ({"SHAREDICT_EXPIRE_AFTER": value})
    assert f"SHAREDICT_EXPIRE_AFTER={value!r}" in str(caught.value)
    assert "or 0 to turn expiry off" in str(caught.value)


def test_zero_expire_after_environment_accepted():
    assert Settings.from_environ({"SHAREDICT_EXPIRE_AFTER": "0"}).expire_after == 0.0


def test_zero_sweep_interval_starts_no_daemon(tmp_path, monkeypatch):
    socket_dir = tmp_path / "run"
    monkeypatch.setenv("SHAREDICT_SOCKET", str(socket_dir / "sharedict.sock"))
    monkeypatch.setenv("SHAREDICT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SHAREDICT_AUTOSTART", "1")
    monkeypatch.setenv("SHAREDICT_SWEEP_INTERVAL", "0")
    monkeypatch.setattr(Client, "_default", None)
    with pytest.raises(InvalidError, match="SHAREDICT_SWEEP_INTERVAL='0' is invalid"):
        Dict.from_name("jobs").len()
    assert not socket_dir.exists()


@pytest.mark.parametrize(
    ("value", "autostart"),
    [
        ("", True),
        ("1", True),
        ("TRUE", True),
        ("Yes", True),
        ("on", True),
        ("0", False),
        ("false", False),
        (" NO ", False),
        ("Off", False),
    ],
)
def test_autostart_environment_values(value, autostart):
    assert Settings.from_environ({"SHAREDICT_AUTOSTART": value}).autostart is autostart


@pytest.mark.parametrize("value", ["maybe", "2", "y"])
def test_invalid_autostart_lists_values(value):
    with pytest.raises(InvalidError) as caught:
        Settings.from_environ({"SHAREDICT_AUTOSTART": value})
    assert f"SHAREDICT_AUTOSTART={value!r} is invalid" in str(caught.value)
    assert "1, true, yes or on" in str(caught.value)
    assert "0, false, no or off" in str(caught.value)


def test_autostart_off_message_names_value(tmp_path, monkeypatch):
    monkeypatch.setenv("SHAREDICT_SOCKET", str(tmp_path / "absent.sock"))
    monkeypatch.setenv("SHAREDICT_AUTOSTART", "no")
    monkeypatch.setattr(Client, "_default", None)
    with pytest.raises(DaemonUnavailableError) as caught:
        Dict.from_name("jobs").len()
    assert "set SHAREDICT_AUTOSTART=1 (it is 'no')" in str(caught.value)
    assert "unset" not in str(caught.value)


def test_autostart_off_in_code_message(tmp_path, monkeypatch):
    monkeypatch.delenv("SHAREDICT_AUTOSTART")
    client = Client(Settings(socket_path=str(tmp_path / "absent.sock"), data_dir=str(tmp_path), autostart=False))
    with pytest.raises(DaemonUnavailableError) as caught:
        Dict.from_name("jobs", client=client).len()
    assert "Settings(autostart=True)" in str(caught.value)
    assert "SHAREDICT_AUTOSTART" not in str(caught.value)
