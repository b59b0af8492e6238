"""The ``sharedict`` command, run in-process through ``main()`` and as a child process.

Most tests share one daemon and use dicts of their own under unique names. Tests that
start or stop a daemon, or need none, run on sockets of their own.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from helpers import wait_until
from sharedict import Dict, Lock
from sharedict.api import cli, protocol
from sharedict.api.cli import main
from sharedict.api.cli_common import CommandError
from sharedict.api.cli_transfer import FORMAT_VERSION
from sharedict.api.serialization import encode_key, match_key_of
from sharedict.api.transport import Client, Request

Run = Callable[..., tuple[int, str, str]]

CHILD_TIMEOUT = 60

# A module that only child processes can import: values of its class cannot be
# unpickled in the test process, where the CLI runs.
FOREIGN_MODULE = "sd_foreign"
FOREIGN_SOURCE = textwrap.dedent(
    """
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Point:
        x: int
        y: int
    """
)


@pytest.fixture
def daemon(module_daemon):
    """One daemon for the module: each test uses dicts under names of its own."""
    return module_daemon


@pytest.fixture
def run(daemon, capsys: pytest.CaptureFixture[str]) -> Run:
    """Run ``main(args)`` against the module's daemon; return the exit status, stdout and stderr."""

    def run_main(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run_main


@pytest.fixture
def name() -> str:
    return "d" + uuid.uuid4().hex[:12]


@pytest.fixture
def env_name() -> str:
    return "e" + uuid.uuid4().hex[:12]


@pytest.fixture
def foreign_env(child_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The environment of a child process that can import the foreign module."""
    module_dir = tmp_path / "foreign"
    module_dir.mkdir()
    (module_dir / f"{FOREIGN_MODULE}.py").write_text(FOREIGN_SOURCE)
    return {**child_env, "PYTHONPATH": str(module_dir)}


def run_child(args: list[str], env: dict[str, str], **options) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sharedict", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        **options,
    )


def run_python(source: str, env: dict[str, str]) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def run_on_terminal(args: list[str], env: dict[str, str], answer: bytes) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI with a pseudo-terminal as stdin, typing ``answer`` into it."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "sharedict", *args],
            env=env,
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        os.close(terminal)
        terminal = -1
        # The terminal keeps typed input until the prompt reads it.
        os.write(controller, answer + b"\n")
        out, err = process.communicate(timeout=CHILD_TIMEOUT)
    finally:
        os.close(controller)
        if terminal != -1:
            os.close(terminal)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run_with_terminal_output(args: list[str], env: dict[str, str]) -> str:
    """Run the CLI with a pseudo-terminal as stdout, and return what it printed there."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "sharedict", *args], env=env, stdout=terminal, stderr=subprocess.PIPE
        )
        os.close(terminal)
        terminal = -1
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child has closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        process.wait(timeout=CHILD_TIMEOUT)
    finally:
        os.close(controller)
        if terminal != -1:
            os.close(terminal)
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""
    return b"".join(chunks).decode()


class BrokenStr:
    """A value whose ``str()`` raises, as a buggy class of a user's program may."""

    def __str__(self) -> str:
        raise RuntimeError("broken")


def filled(name: str, count: int, **options) -> Dict:
    handle = Dict.from_name(name, create_if_missing=True, **options)
    handle.update({f"k{i}": i for i in range(count)})
    return handle


def assert_one_line_error(err: str) -> None:
    assert err.startswith("Error: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err


# Management: list, create.


def test_create_makes_dict(run, name):
    code, out, err = run("create", name)
    assert code == 0
    assert out == ""
    assert Dict.from_name(name).len() == 0


def test_create_existing_keeps_entries(run, name):
    filled(name, 3)
    code, _, _ = run("create", name)
    assert code == 0
    assert Dict.from_name(name).len() == 3


def test_create_in_environment(run, name, env_name):
    assert run("create", name, "-e", env_name)[0] == 0
    assert Dict.from_name(name, environment_name=env_name).len() == 0
    with pytest.raises(Exception, match="not found"):
        Dict.from_name(name).len()


def test_list_json_fields(run, name, env_name):
    filled(name, 2, environment_name=env_name)
    code, out, _ = run("list", "--json", "--env", env_name)
    assert code == 0
    [listed] = json.loads(out)
    assert listed["name"] == name
    assert listed["entries"] == 2
    assert listed["created_by"]
    assert "T" in listed["created_at"]


def test_list_newest_first(run, env_name):
    for dict_name in ("older", "newer"):
        assert run("create", dict_name, "-e", env_name)[0] == 0
    code, out, _ = run("list", "--json", "-e", env_name)
    assert [listed["name"] for listed in json.loads(out)] == ["newer", "older"]


def test_list_table_columns(run, name, env_name):
    filled(name, 1234, environment_name=env_name)
    code, out, _ = run("list", "-e", env_name)
    assert code == 0
    header, _, row = out.splitlines()[:3]
    assert header.split() == ["Name", "Entries", "Created", "at", "Created", "by"]
    assert row.split()[:2] == [name, "1,234"]


def test_list_empty_environment(run, env_name):
    code, out, err = run("list", "-e", env_name)
    assert code == 0
    assert out == ""
    assert f"no dicts in environment {env_name!r}" in err


def test_list_json_empty_environment(run, env_name):
    code, out, _ = run("list", "--json", "-e", env_name)
    assert json.loads(out) == []


# get and put.


def test_put_then_get(run, name):
    run("create", name)
    assert run("put", name, "greeting", "hello world") == (0, "", "")
    assert run("get", name, "greeting") == (0, "hello world\n", "")


def test_put_stores_string(run, name):
    run("create", name)
    run("put", name, "n", "42")
    assert Dict.from_name(name)["n"] == "42"


def test_put_json_value_parses(run, name):
    run("create", name)
    code, _, _ = run("put", name, "config", '{"retries": 3, "hosts": ["a", "b"]}', "--json-value")
    assert code == 0
    assert Dict.from_name(name)["config"] == {"retries": 3, "hosts": ["a", "b"]}


def test_put_invalid_json_is_usage_error(run, name):
    run("create", name)
    code, _, err = run("put", name, "k", "{not json", "--json-value")
    assert code == 2
    assert "not valid JSON" in err
    assert Dict.from_name(name).len() == 0


def test_put_missing_dict_fails(run, name):
    code, _, err = run("put", name, "k", "v")
    assert code == 1
    assert_one_line_error(err)
    assert f"`sharedict create {name}`" in err


def test_get_finds_str_key_from_python(run, name):
    handle = Dict.from_name(name, create_if_missing=True)
    handle["42"] = "the string key"
    handle[42] = "the int key"
    assert run("get", name, "42") == (0, "the string key\n", "")


def test_get_missing_key_fails(run, name):
    Dict.from_name(name, create_if_missing=True)["present"] = 1
    code, out, err = run("get", name, "absent")
    assert code == 1
    assert out == ""
    assert_one_line_error(err)
    assert "key 'absent' not found" in err
    assert f"`sharedict items {name}`" in err


def test_get_missing_dict_fails(run, name):
    code, _, err = run("get", name, "k")
    assert code == 1
    assert_one_line_error(err)
    assert f"dict {name!r} not found" in err


@pytest.mark.parametrize("command", [["get", "k"], ["items"], ["clear", "--yes"]])
def test_missing_dict_suggests_list_not_create(run, name, command):
    code, _, err = run(command[0], name, *command[1:])
    assert code == 1
    assert "`sharedict list`" in err
    assert "sharedict create" not in err


def test_get_in_environment_suggests_env_flag(run, name, env_name):
    code, _, err = run("get", name, "k", "-e", env_name)
    assert code == 1
    assert f"`sharedict list -e {env_name}`" in err


def test_put_in_environment_suggests_create(run, name, env_name):
    code, _, err = run("put", name, "k", "v", "-e", env_name)
    assert code == 1
    assert f"`sharedict create {name} -e {env_name}`" in err


def test_get_repr_and_json(run, name):
    Dict.from_name(name, create_if_missing=True)["k"] = {"when": (1, 2), "ratio": float("nan")}
    assert run("get", name, "k", "--repr")[1] == "{'when': (1, 2), 'ratio': nan}\n"
    assert json.loads(run("get", name, "k", "--json")[1]) == {"when": [1, 2], "ratio": "nan"}


def test_get_lone_surrogate_escaped(run, name):
    Dict.from_name(name, create_if_missing=True)["k"] = "bad \udcff text"
    assert run("get", name, "k") == (0, "bad \\udcff text\n", "")


def test_get_unreadable_value_fails(run, name, foreign_env):
    run_python(
        f"""
        from sharedict import Dict
        from {FOREIGN_MODULE} import Point
        Dict.from_name({name!r}, create_if_missing=True)["p"] = Point(1, 2)
        """,
        foreign_env,
    )
    code, _, err = run("get", name, "p")
    assert code == 1
    assert_one_line_error(err)
    assert FOREIGN_MODULE in err


# items.


def test_items_insertion_order(run, name):
    handle = filled(name, 3)
    del handle["k0"]
    handle["k0"] = "back"
    code, out, _ = run("items", name)
    assert code == 0
    rows = [line.split(None, 1) for line in out.splitlines()[2:]]
    assert rows == [["k1", "1"], ["k2", "2"], ["k0", "back"]]


def test_items_default_shows_twenty(run, name):
    filled(name, 25)
    code, out, err = run("items", name)
    rows = out.splitlines()[2:]
    assert len(rows) == 21
    assert rows[-1].split() == ["...", "..."]
    assert "showed the first 20 entries of 25 entries" in err


def test_items_count_argument(run, name):
    filled(name, 10)
    _, out, _ = run("items", name, "3")
    assert [row.split()[0] for row in out.splitlines()[2:]] == ["k0", "k1", "k2", "..."]


def test_items_all(run, name):
    filled(name, 25)
    code, out, err = run("items", name, "--all")
    assert len(out.splitlines()[2:]) == 25
    assert err == ""


def test_items_exact_count_has_no_marker(run, name):
    filled(name, 3)
    _, out, err = run("items", name, "3")
    assert "..." not in out
    assert err == ""


def test_items_empty_dict(run, name):
    run("create", name)
    code, out, err = run("items", name)
    assert code == 0
    assert out == ""
    assert "has no entries" in err


def test_items_value_cut_to_one_line(run, name):
    handle = Dict.from_name(name, create_if_missing=True)
    handle["multi"] = "first\nsecond\tthird\x1b[31m"
    handle["long"] = "x" * 200
    _, out, _ = run("items", name)
    rows = out.splitlines()[2:]
    assert rows[0].split(None, 1)[1] == "first\\nsecond\\tthird\\x1b[31m"
    assert rows[1].split(None, 1)[1] == "x" * 80 + "..."


LONG_PREFIX = "/home/user/projects/" * 5


def test_items_long_keys_in_pipe(run, name):
    keys = [LONG_PREFIX + "alpha.py", LONG_PREFIX + "beta.py"]
    Dict.from_name(name, create_if_missing=True).update({key: 1 for key in keys})
    _, out, _ = run("items", name)
    rows = out.splitlines()[2:]
    assert rows[0].split()[0] == keys[0]
    assert rows[1].split()[0] == keys[1]


def test_items_late_long_key_in_pipe(run, name):
    handle = Dict.from_name(name, create_if_missing=True)
    handle.update({f"k{number}": number for number in range(1000)})
    handle[LONG_PREFIX + "late.txt"] = "late"
    _, out, _ = run("items", name, "--all")
    assert out.splitlines()[-1].split() == [LONG_PREFIX + "late.txt", "late"]


def test_items_long_keys_on_terminal(daemon, name, child_env):
    Dict.from_name(name, create_if_missing=True).update({LONG_PREFIX + "alpha.py": 1, LONG_PREFIX + "beta.py": 2})
    out = run_with_terminal_output(["items", name], {**child_env, "COLUMNS": "80"})
    rows = out.splitlines()[2:]
    assert rows[0].startswith("/home/user/")
    assert "\u2026" in rows[0]
    assert "alpha.py" in rows[0]
    assert "beta.py" in rows[1]
    assert all(len(row) <= 80 for row in rows)


def test_items_broken_str_shown(run, name):
    Dict.from_name(name, create_if_missing=True)["k"] = BrokenStr()
    code, out, _ = run("items", name)
    assert code == 0
    assert out.splitlines()[2].split(None, 1)[1] == "<BrokenStr object: str() raised RuntimeError>"


def test_items_line_separator_escaped(run, name):
    Dict.from_name(name, create_if_missing=True)["k"] = "one\u2028two"
    _, out, _ = run("items", name)
    assert out.splitlines()[2].split(None, 1)[1] == "one\\u2028two"


def test_items_repr(run, name):
    handle = Dict.from_name(name, create_if_missing=True)
    handle["s"] = "text"
    handle[1] = b"raw"
    _, out, _ = run("items", name, "--repr")
    rows = [line.split(None, 1) for line in out.splitlines()[2:]]
    assert rows == [["'s'", "'text'"], ["1", "b'raw'"]]


def test_items_json_valid_for_any_value(run, name):
    cycle: list = []
    cycle.append(cycle)
    handle = Dict.from_name(name, create_if_missing=True)
    handle.update(
        [
            ("nan", float("nan")),
            ("bytes", b"\x00\xff"),
            ("set", frozenset({2, 1})),
            ((1, "tuple"), {(1, 2): "tuple key"}),
            ("object", ValueError("boom")),
            ("cycle", cycle),
            ("text", "ünïcode"),
        ]
    )
    code, out, _ = run("items", name, "--json")
    assert code == 0
    entries = json.loads(out)
    assert entries == [
        {"key": "nan", "value": "nan"},
        {"key": "bytes", "value": "b'\\x00\\xff'"},
        {"key": "set", "value": [1, 2]},
        {"key": [1, "tuple"], "value": {"(1, 2)": "tuple key"}},
        {"key": "object", "value": "boom"},
        {"key": "cycle", "value": ["<recursive reference>"]},
        {"key": "text", "value": "ünïcode"},
    ]


def test_items_json_honours_count(run, name):
    filled(name, 30)
    _, out, err = run("items", name, "5", "--json")
    assert [entry["key"] for entry in json.loads(out)] == ["k0", "k1", "k2", "k3", "k4"]
    assert "pass --all" in err


def test_items_json_all(run, name):
    filled(name, 30)
    _, out, _ = run("items", name, "5", "--all", "--json")
    assert len(json.loads(out)) == 30


def test_items_json_empty(run, name):
    run("create", name)
    assert json.loads(run("items", name, "--json")[1]) == []


def test_items_json_repr(run, name):
    Dict.from_name(name, create_if_missing=True)["e"] = ValueError("boom")
    _, out, _ = run("items", name, "--json", "--repr")
    assert json.loads(out) == [{"key": "e", "value": "ValueError('boom')"}]


def test_items_unreadable_value_placeholder(run, name, foreign_env):
    run_python(
        f"""
        from sharedict import Dict
        from {FOREIGN_MODULE} import Point
        d = Dict.from_name({name!r}, create_if_missing=True)
        d["point"] = Point(1, 2)
        d[Point(3, 4)] = "point key"
        d["after"] = "readable"
        """,
        foreign_env,
    )
    code, out, _ = run("items", name)
    assert code == 0
    placeholder = f"<unreadable value: {FOREIGN_MODULE}.Point (module {FOREIGN_MODULE!r} not found)>"
    rows = out.splitlines()[2:]
    assert rows[0].split(None, 1) == ["point", placeholder]
    assert rows[1].startswith(f"<unreadable key: {FOREIGN_MODULE}.Point")
    assert rows[2].split(None, 1) == ["after", "readable"]


def test_items_unreadable_value_json(run, name, foreign_env):
    run_python(
        f"""
        from sharedict import Dict
        from {FOREIGN_MODULE} import Point
        Dict.from_name({name!r}, create_if_missing=True)["point"] = [Point(1, 2)]
        """,
        foreign_env,
    )
    _, out, _ = run("items", name, "--json")
    [entry] = json.loads(out)
    assert entry["value"].startswith("<unreadable value:")


def test_items_reads_in_pages(run, name, monkeypatch):
    filled(name, 2500)
    page_sizes = []
    call = Client.call

    def recording_call(client, request):
        if request.op == protocol.SCAN:
            page_sizes.append(request.args[2])
        return call(client, request)

    monkeypatch.setattr(Client, "call", recording_call)
    run("items", name, "5")
    assert page_sizes == [6]
    page_sizes.clear()
    run("items", name, "--all", "--json")
    assert page_sizes == [1000, 1000, 1000]


def test_items_pipe_to_head_exits_quietly(name, child_env):
    # Far more output than a pipe buffers, so the writer meets the closed pipe.
    Dict.from_name(name, create_if_missing=True).update({f"k{i}": "v" * 60 for i in range(5000)})
    for extra in ([], ["--json"]):
        command = f"{sys.executable} -m sharedict items {name} --all {' '.join(extra)} | head -n 3"
        completed = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {command}"],
            env=child_env,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
        )
        assert len(completed.stdout.splitlines()) == 3
        assert completed.stderr == ""
        assert completed.returncode == 1


@pytest.mark.parametrize(
    "args",
    [
        ["get", "{name}", "key"],
        ["get", "{name}", "key", "--json"],
        ["items", "{name}"],
        ["list", "--json"],
        ["--help"],
        ["--version"],
    ],
    ids=["get", "get-json", "items", "list-json", "help", "version"],
)
def test_output_to_full_disk_fails(name, child_env, args):
    Dict.from_name(name, create_if_missing=True)["key"] = "v" * 100_000
    with open("/dev/full", "w") as full:
        completed = subprocess.run(
            [sys.executable, "-m", "sharedict", *(arg.format(name=name) for arg in args)],
            env=child_env,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=CHILD_TIMEOUT,
        )
    assert completed.returncode == 1
    assert completed.stderr == "Error: cannot write the output: No space left on device\n"


def test_int_of_many_digits_prints(run, name):
    # Python refuses to convert ints of over 4,300 digits to text unless the limit is lifted.
    Dict.from_name(name, create_if_missing=True)["big"] = 10**5000
    default_limit = getattr(sys, "get_int_max_str_digits", lambda: None)()  # Python 3.10.7 and later
    assert run("get", name, "big") == (0, "1" + "0" * 5000 + "\n", "")
    assert run("get", name, "big", "--json") == (0, "1" + "0" * 5000 + "\n", "")
    code, out, _ = run("items", name, "--json")
    assert code == 0
    assert f'"value": 1{"0" * 5000}}}' in out
    # Restored for a program that calls main().
    assert getattr(sys, "get_int_max_str_digits", lambda: None)() == default_limit


# clear and delete.


def test_clear_with_yes(run, name):
    filled(name, 5)
    assert run("clear", name, "--yes") == (0, "", "")
    assert Dict.from_name(name).len() == 0


def test_clear_without_terminal_refuses(run, name):
    filled(name, 5)
    code, _, err = run("clear", name)
    assert code == 1
    assert_one_line_error(err)
    assert "--yes" in err
    assert Dict.from_name(name).len() == 5


def test_clear_child_without_terminal_refuses(name, child_env):
    filled(name, 5)
    completed = run_child(["clear", name], child_env, stdin=subprocess.DEVNULL)
    assert completed.returncode == 1
    assert "stdin is not a terminal" in completed.stderr
    assert Dict.from_name(name).len() == 5


def test_clear_confirmed_on_terminal(name, child_env):
    filled(name, 5)
    completed = run_on_terminal(["clear", name], child_env, b"y")
    assert completed.returncode == 0, completed.stderr
    assert b"Delete all 5 entries" in completed.stderr
    assert Dict.from_name(name).len() == 0


def test_clear_declined_on_terminal(name, child_env):
    filled(name, 5)
    completed = run_on_terminal(["clear", name], child_env, b"n")
    assert completed.returncode == 1
    assert b"aborted" in completed.stderr
    assert Dict.from_name(name).len() == 5


def test_clear_missing_dict_fails(run, name):
    code, _, err = run("clear", name, "--yes")
    assert code == 1
    assert f"dict {name!r} not found" in err


def test_delete_with_yes(run, name):
    filled(name, 2)
    assert run("delete", name, "-y") == (0, "", "")
    with pytest.raises(Exception, match="not found"):
        Dict.from_name(name).len()


def test_delete_without_terminal_refuses(run, name):
    filled(name, 2)
    code, _, err = run("delete", name)
    assert code == 1
    assert_one_line_error(err)
    assert Dict.from_name(name).len() == 2


def test_delete_child_without_terminal_refuses(name, child_env):
    filled(name, 2)
    completed = run_child(["delete", name], child_env, stdin=subprocess.DEVNULL)
    assert completed.returncode == 1
    assert "--yes" in completed.stderr
    assert Dict.from_name(name).len() == 2


def test_delete_confirmed_on_terminal(name, child_env):
    filled(name, 2)
    completed = run_on_terminal(["delete", name], child_env, b"y")
    assert completed.returncode == 0, completed.stderr
    assert run_child(["list", "--json"], child_env).stdout.count(f'"{name}"') == 0


def test_delete_missing_dict_fails(run, name):
    code, _, err = run("delete", name, "--yes")
    assert code == 1
    assert_one_line_error(err)
    assert "--allow-missing" in err


def test_delete_missing_dict_allowed(run, name):
    assert run("delete", name, "--allow-missing") == (0, "", "")


# export and import.


def sample_entries() -> list[tuple[object, object]]:
    return [
        ("text", "value"),
        (7, "int key"),
        (True, "bool key, stored apart from its match key"),
        (1.5, 2.5),
        (-0.0, "negative zero"),
        ((True, "t", 2.0), ["a", "tuple key"]),
        (frozenset({1.5, "x"}), {"nested": (1, 2)}),
        (b"\x00raw", b"\xffbytes"),
        (None, None),
        ("long" * 200, "a key longer than the inline limit"),
        ((False, "long" * 200), "a long key with a stored form"),
        (ValueError, "a pickled key"),
    ]


def test_export_import_restores_exactly(run, name, tmp_path):
    source = Dict.from_name(name, create_if_missing=True)
    source.update(sample_entries())
    del source[7]
    source[7] = "moved to the end"
    path = str(tmp_path / "backup.sdx")

    code, _, err = run("export", name, path)
    assert code == 0
    assert "exported 12 entries" in err
    code, _, err = run("import", name + "-copy", path)
    assert code == 0
    assert "imported 12 entries" in err

    copy = Dict.from_name(name + "-copy")
    copied = list(copy.items())
    assert copied == list(source.items())
    assert [type(key) for key, _ in copied] == [type(key) for key, _ in source.items()]
    assert copy[1] == "bool key, stored apart from its match key"
    assert copy[(1, "t", 2)] == ["a", "tuple key"]
    assert copy[0] == "negative zero"


def test_export_import_unimportable_types(run, name, tmp_path, foreign_env):
    run_python(
        f"""
        from sharedict import Dict
        from {FOREIGN_MODULE} import Point
        d = Dict.from_name({name!r}, create_if_missing=True)
        d[Point(1, 2)] = Point(3, 4)
        d[(True, Point(5, 6))] = [Point(7, 8)]
        d["plain"] = "text"
        """,
        foreign_env,
    )
    path = str(tmp_path / "foreign.sdx")
    assert run("export", name, path)[0] == 0
    assert run("import", name + "-copy", path)[0] == 0

    out = run_python(
        f"""
        from sharedict import Dict
        from {FOREIGN_MODULE} import Point
        d = Dict.from_name({name + "-copy"!r})
        print(list(d.items()) == list(Dict.from_name({name!r}).items()))
        print(d[Point(1, 2)] == Point(3, 4), d[(1, Point(5, 6))] == [Point(7, 8)])
        """,
        foreign_env,
    )
    assert out.split() == ["True", "True", "True"]


def test_export_file_is_private(run, name, tmp_path):
    filled(name, 1)
    path = tmp_path / "private.sdx"
    run("export", name, str(path))
    assert path.stat().st_mode & 0o777 == 0o600


def test_export_file_format(run, name, tmp_path):
    Dict.from_name(name, create_if_missing=True)["k"] = "v"
    path = tmp_path / "format.sdx"
    run("export", name, str(path))
    header, entry, trailer = msgpack.Unpacker(open(path, "rb"), raw=False)
    assert header["format"] == "sharedict-export"
    assert header["version"] == FORMAT_VERSION
    assert entry[:2] == [b"Sk", None]
    assert trailer == {"entries": 1}


def test_export_stopped_by_sigterm_leaves_nothing(daemon, name, child_env, tmp_path):
    Dict.from_name(name, create_if_missing=True).update({f"k{i}": "v" * 1000 for i in range(5000)})
    target = tmp_path / "backup.sdx"
    export = subprocess.Popen(
        [sys.executable, "-m", "sharedict", "export", name, str(target)],
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # From the moment the partial file exists, a SIGTERM must remove it, so the signal
    # goes out at once. Pausing the daemon keeps the export waiting inside its scan.
    assert wait_until(lambda: any(tmp_path.glob(".backup.sdx.*.partial")), interval=0)
    os.kill(daemon.process.pid, signal.SIGSTOP)
    try:
        export.send_signal(signal.SIGTERM)
        _, err = export.communicate(timeout=CHILD_TIMEOUT)
    finally:
        os.kill(daemon.process.pid, signal.SIGCONT)
    assert export.returncode == 1
    assert "stopped by SIGTERM" in err
    assert list(tmp_path.iterdir()) == []


def test_export_missing_dict_keeps_file(run, name, tmp_path):
    path = tmp_path / "kept.sdx"
    path.write_bytes(b"earlier backup")
    code, _, err = run("export", name, str(path))
    assert code == 1
    assert f"dict {name!r} not found" in err
    assert "`sharedict list`" in err
    assert "sharedict create" not in err
    assert path.read_bytes() == b"earlier backup"


def test_export_unwritable_directory_fails(run, name, tmp_path):
    filled(name, 1)
    code, _, err = run("export", name, str(tmp_path / "missing" / "backup.sdx"))
    assert code == 1
    assert_one_line_error(err)
    assert "cannot write export file" in err


def test_export_progress_on_terminal(run, name, tmp_path, monkeypatch):
    filled(name, 10)
    monkeypatch.setenv("FORCE_COLOR", "1")
    code, _, err = run("export", name, str(tmp_path / "progress.sdx"))
    assert code == 0
    assert f"exporting dict {name}" in err


def test_import_progress_on_terminal(run, name, tmp_path, monkeypatch):
    filled(name, 10)
    path = str(tmp_path / "progress.sdx")
    run("export", name, path)
    monkeypatch.setenv("FORCE_COLOR", "1")
    code, _, err = run("import", name + "-copy", path)
    assert code == 0
    assert "checking progress.sdx" in err
    assert f"importing into dict {name}-copy" in err


def test_import_into_nonempty_dict_fails(run, name, tmp_path):
    filled(name, 3)
    path = str(tmp_path / "backup.sdx")
    run("export", name, path)
    code, _, err = run("import", name, path)
    assert code == 1
    assert_one_line_error(err)
    assert f"`sharedict clear {name}`" in err
    assert Dict.from_name(name).len() == 3


def test_import_into_empty_existing_dict(run, name, tmp_path):
    filled(name, 3)
    path = str(tmp_path / "backup.sdx")
    run("export", name, path)
    run("clear", name, "--yes")
    assert run("import", name, path)[0] == 0
    assert Dict.from_name(name).len() == 3


def test_import_truncated_file_changes_nothing(run, name, tmp_path):
    filled(name, 100)
    path = tmp_path / "backup.sdx"
    run("export", name, str(path))
    path.write_bytes(path.read_bytes()[:-20])
    code, _, err = run("import", name + "-copy", str(path))
    assert code == 1
    assert_one_line_error(err)
    assert "is damaged" in err
    assert run("get", name + "-copy", "k0")[0] == 1


def test_import_wrong_count_fails(run, name, tmp_path):
    path = tmp_path / "forged.sdx"
    packer = msgpack.Packer(use_bin_type=True)
    header = {"format": "sharedict-export", "version": FORMAT_VERSION}
    path.write_bytes(packer.pack(header) + packer.pack([b"Sk", None, b"v"]) + packer.pack({"entries": 2}))
    code, _, err = run("import", name, str(path))
    assert code == 1
    assert "end marker records 2 entries, but the file contains 1" in err


def test_import_malformed_entry_fails(run, name, tmp_path):
    path = tmp_path / "forged.sdx"
    packer = msgpack.Packer(use_bin_type=True)
    header = {"format": "sharedict-export", "version": FORMAT_VERSION}
    path.write_bytes(packer.pack(header) + packer.pack(["text", None, b"v"]) + packer.pack({"entries": 1}))
    code, _, err = run("import", name, str(path))
    assert code == 1
    assert "entry 1 is not" in err


def forged_export(path: Path, *entries: list[bytes | None]) -> str:
    """Write an export file of ``entries`` with a valid header and end marker."""
    packer = msgpack.Packer(use_bin_type=True)
    header = {"format": "sharedict-export", "version": FORMAT_VERSION}
    body = b"".join(packer.pack(entry) for entry in entries)
    path.write_bytes(packer.pack(header) + body + packer.pack({"entries": len(entries)}))
    return str(path)


def test_import_foreign_match_key_fails(run, name, tmp_path):
    path = forged_export(tmp_path / "forged.sdx", [b"Sk", b"Sother", b"v"])
    code, _, err = run("import", name, path)
    assert code == 1
    assert "match key of entry 1 does not belong to its stored key" in err


def test_import_noncanonical_key_fails(run, name, tmp_path):
    # True is stored under the match key of 1, never under its own encoding.
    path = forged_export(tmp_path / "forged.sdx", [b"Sk", None, b"v"], [b"1", None, b"v"])
    code, _, err = run("import", name, path)
    assert code == 1
    assert "entry 2" in err


def test_import_cut_tuple_key_fails(run, name, tmp_path):
    path = forged_export(tmp_path / "forged.sdx", [b"T\x00\x00\x00\x02", None, b"v"])
    code, _, err = run("import", name, path)
    assert code == 1
    assert "the key of entry 1 is not a key encoding" in err
    assert run("get", name, "k")[0] == 1


def tuple_key(*parts: bytes) -> bytes:
    """Encode a tuple key from the encodings of its items, as the key codec lays it out."""
    return b"T" + len(parts).to_bytes(4, "big") + b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def nested_key(depth: int) -> bytes:
    key = b"N"
    for _ in range(depth):
        key = tuple_key(key)
    return key


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(b"\xffnot-a-key", id="unknown-tag"),
        pytest.param(b"Ntrailing", id="bytes-after-none"),
        pytest.param(tuple_key(b"Nxyz"), id="bytes-after-item"),
        pytest.param(b"I\x00\x01", id="long-int"),
        pytest.param(b"Z" + (2).to_bytes(4, "big") + (b"\x00\x00\x00\x02Sa" * 2), id="repeated-item"),
        pytest.param(nested_key(3000), id="deep-nesting"),
    ],
)
def test_import_invalid_key_encoding_fails(run, name, tmp_path, key):
    path = forged_export(tmp_path / "forged.sdx", [key, None, b"v"])
    code, _, err = run("import", name, path)
    assert code == 1
    assert_one_line_error(err)
    assert "the key of entry 1 is not a key encoding" in err


def test_import_other_file_fails(run, name, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an export\n")
    code, _, err = run("import", name, str(path))
    assert code == 1
    assert_one_line_error(err)
    assert "is not a sharedict export file" in err


def test_import_newer_version_fails(run, name, tmp_path):
    path = tmp_path / "future.sdx"
    path.write_bytes(msgpack.packb({"format": "sharedict-export", "version": FORMAT_VERSION + 1}))
    code, _, err = run("import", name, str(path))
    assert code == 1
    assert f"format version {FORMAT_VERSION + 1}" in err


def test_import_missing_file_is_usage_error(run, name, tmp_path):
    code, _, err = run("import", name, str(tmp_path / "absent.sdx"))
    assert code == 2
    assert "does not exist" in err


@pytest.mark.parametrize("key", [key for key, _ in sample_entries()], ids=lambda key: type(key).__name__)
def test_match_key_of_stored_key(key):
    match_key, stored_key = encode_key(key)
    assert match_key_of(stored_key or match_key) == match_key


# status and stop.


def test_status_shows_daemon(run, daemon):
    code, out, _ = run("status")
    assert code == 0
    labels = [line.split("  ")[0] for line in out.splitlines()]
    for label in ("pid", "uptime", "socket", "data dir", "disk usage", "dicts", "entries", "expire after"):
        assert label in labels
    assert daemon.socket_path in out


def test_status_json(run, daemon):
    code, out, _ = run("status", "--json")
    info = json.loads(out)
    assert info["socket_path"] == daemon.socket_path
    assert info["data_dir"] == daemon.data_dir


def test_status_lists_held_locks(run):
    lock = Lock.from_name("cli-status-lock", lease=30)
    lock.acquire()
    try:
        _, out, _ = run("status")
    finally:
        lock.release()
    assert "cli-status-lock" in out


@pytest.fixture
def no_daemon(monkeypatch: pytest.MonkeyPatch) -> str:
    """A socket path with no daemon behind it, with auto-start on: only data commands may start one."""
    socket_dir = tempfile.mkdtemp(prefix="sd-cli-", dir="/tmp")
    socket_path = os.path.join(socket_dir, "sharedict.sock")
    monkeypatch.setenv("SHAREDICT_SOCKET", socket_path)
    monkeypatch.setenv("SHAREDICT_DATA_DIR", os.path.join(socket_dir, "data"))
    monkeypatch.setenv("SHAREDICT_AUTOSTART", "1")
    monkeypatch.setattr(Client, "_default", None)
    yield socket_path
    if os.path.exists(socket_path):
        main(["stop", "--socket", socket_path])
    Client._default = None
    subprocess.run(["rm", "-rf", socket_dir], check=True)


def test_status_never_starts_daemon(run, no_daemon):
    code, _, err = run("status")
    assert code == 1
    assert_one_line_error(err)
    assert "`sharedict serve --detach`" in err
    assert not os.path.exists(no_daemon)


def test_stop_without_daemon_fails(run, no_daemon):
    code, _, err = run("stop")
    assert code == 1
    assert "nothing to stop" in err
    assert not os.path.exists(no_daemon)


def test_daemon_gone_after_check_gives_cli_advice(daemon):
    # The daemon stops between the check that it runs and the command's request, as when
    # a SIGTERM races `sharedict status` or `sharedict stop`.
    with pytest.raises(CommandError) as raised:
        with cli._running_daemon(daemon.socket_path, "there is nothing to stop") as client:
            daemon.stop()
            client.call(Request(protocol.STATUS))
    assert str(raised.value) == f"no sharedict daemon is running on {daemon.socket_path}; there is nothing to stop"


def test_data_command_starts_daemon_then_stop(run, no_daemon, name):
    assert run("create", name)[0] == 0
    assert run("status")[0] == 0
    code, out, _ = run("stop")
    assert code == 0
    assert out.startswith("stopped the daemon (pid ")
    assert run("status")[0] == 1


def test_daemon_unavailable_is_one_line(run, no_daemon, monkeypatch):
    monkeypatch.setenv("SHAREDICT_AUTOSTART", "0")
    code, _, err = run("list")
    assert code == 1
    assert_one_line_error(err)
    assert no_daemon in err


def test_autostart_off_suggests_setting_one(run, no_daemon, monkeypatch):
    monkeypatch.setenv("SHAREDICT_AUTOSTART", "off")
    code, _, err = run("list")
    assert code == 1
    assert "set SHAREDICT_AUTOSTART=1 (it is 'off')" in err


def test_zero_sweep_interval_fails_before_autostart(run, no_daemon, monkeypatch):
    monkeypatch.setenv("SHAREDICT_SWEEP_INTERVAL", "0")
    code, _, err = run("list")
    assert code == 1
    assert_one_line_error(err)
    assert "SHAREDICT_SWEEP_INTERVAL='0' is invalid; set it to a positive number of seconds, such as 60" in err
    assert "--sweep-interval" not in err
    assert not os.path.exists(no_daemon)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--sweep-interval", "0"), ("--sweep-interval", "nan"), ("--expire-after", "-1"), ("--expire-after", "inf")],
)
def test_serve_invalid_seconds_is_usage_error(run, no_daemon, flag, value):
    code, _, err = run("serve", flag, value)
    assert code == 2
    assert f"{value!r} is invalid; pass a positive number of seconds" in err
    assert not os.path.exists(no_daemon)


# Usage.


def test_help_exits_zero(run):
    code, out, _ = run("--help")
    assert code == 0
    commands = ["serve", "status", "stop", "list", "create", "get", "put", "items", "clear", "delete", "export", "import"]
    for command in commands:
        assert f"  {command} " in out


def test_no_command_is_usage_error(run):
    assert run()[0] == 2


def test_unknown_command_is_usage_error(run):
    code, _, err = run("frobnicate")
    assert code == 2
    assert "No such command" in err


def test_missing_argument_is_usage_error(run):
    code, _, err = run("get", "only-a-name")
    assert code == 2
    assert "Missing argument 'KEY'" in err


def test_invalid_dict_name_is_usage_error(run):
    code, _, err = run("create", "no spaces")
    assert code == 2
    assert "invalid dict name 'no spaces'" in err


@pytest.mark.parametrize("count", ["many", "0", "-5", "2.5"])
def test_invalid_count_is_usage_error(run, name, count):
    code, _, err = run("items", name, count)
    assert code == 2
    assert f"{count!r} is invalid; N must be a positive whole number of entries" in err
