"""The daemon against clients that break the wire protocol, spoken over raw sockets.

Every malformed request must end in an error reply or a closed connection, and never
in a stuck connection, a dead daemon, or trouble for another client. A bystander
thread keeps calling the daemon through the normal client for the whole test, so a
failure to serve anyone else shows up at once.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import start_serve, stop_process, wait_until
from sharedict import Dict
from sharedict.api import aio, protocol
from sharedict.api.config import Settings
from sharedict.api.errors import CODE_BY_ERROR, DaemonUnavailableError, ProtocolError, RequestSizeError
from sharedict.api.transport import Client, Request

RECEIVE_TIMEOUT = 20.0
PROTOCOL_CODE = CODE_BY_ERROR[ProtocolError]
SIZE_CODE = CODE_BY_ERROR[RequestSizeError]


class RawConnection:
    """A socket to the daemon that sends whatever bytes the test gives it."""

    def __init__(self, socket_path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(RECEIVE_TIMEOUT)
        self.sock.connect(socket_path)
        self.reader = protocol.FrameReader()
        self.closed = False

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: Any) -> None:
        self.send_bytes(protocol.encode_frame_bytes(message))

    def receive(self) -> Any:
        """Return the next reply, or None once the daemon has closed the connection."""
        while True:
            for body in self.reader.frames():
                return msgpack.unpackb(body, raw=False)
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                # Closing a Unix socket with unread input resets it, which can drop the
                # reply sent just before.
                data = b""
            if not data:
                self.closed = True
                return None
            self.reader.feed(data)

    def call(self, request_id: int, op: str, *args: Any) -> Any:
        self.send([request_id, op, *args])
        return self.receive()

    def hello(self) -> None:
        reply = self.call(1, protocol.HELLO, protocol.PROTOCOL_VERSION, os.getpid())
        assert reply[1] == protocol.STATUS_OK, reply

    def is_closed(self) -> bool:
        """Wait for the daemon to close the connection, skipping replies sent before."""
        while not self.closed:
            self.receive()
        return True

    def close(self) -> None:
        self.sock.close()


class Bystander:
    """Another client that keeps calling the daemon, recording any error it meets."""

    def __init__(self, handle: Dict) -> None:
        self.handle = handle
        self.calls = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bystander", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.handle[self.calls] = self.calls
                assert self.handle[self.calls] == self.calls
            except BaseException as exc:
                self.errors.append(exc)
                return
            self.calls += 1

    def start(self) -> None:
        self._thread.start()

    def wait_for_calls(self, count: int) -> None:
        """Wait until ``count`` more calls succeeded: proof the daemon still serves."""
        target = self.calls + count
        deadline = time.monotonic() + RECEIVE_TIMEOUT
        while self.calls < target and not self.errors and time.monotonic() < deadline:
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=RECEIVE_TIMEOUT)


@pytest.fixture
def daemon(module_daemon):
    """One daemon serves the whole module: it must outlive every test's abuse."""
    return module_daemon


@pytest.fixture(scope="module")
def running_bystander(module_daemon) -> Iterator[Bystander]:
    handle = Dict.from_name("bystander", create_if_missing=True, client=module_daemon.client())
    bystander = Bystander(handle)
    bystander.start()
    yield bystander
    bystander.stop()


@pytest.fixture(autouse=True)
def bystander(running_bystander, daemon) -> Iterator[Bystander]:
    """The bystander, checked after each test: it made progress and met no error."""
    yield running_bystander
    running_bystander.wait_for_calls(10)
    assert running_bystander.errors == []
    assert daemon.process.poll() is None


@pytest.fixture(scope="module")
def status_client(module_daemon):
    return module_daemon.client()


def connection_count(status_client) -> int:
    return status_client.call(Request(protocol.STATUS))["connections"]


def wait_for_connection_count(status_client, count: int) -> bool:
    deadline = time.monotonic() + RECEIVE_TIMEOUT
    while time.monotonic() < deadline:
        if connection_count(status_client) == count:
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def raw(daemon) -> Iterator[RawConnection]:
    connection = RawConnection(daemon.socket_path)
    yield connection
    connection.close()


@pytest.fixture
def greeted(raw) -> RawConnection:
    raw.hello()
    return raw


_dict_numbers = itertools.count()


@pytest.fixture
def dict_id(greeted) -> bytes:
    """The id of a new dict of this test's own."""
    reply = greeted.call(2, protocol.DICT_CREATE, "main", f"raw-{next(_dict_numbers)}", False)
    assert reply[1] == protocol.STATUS_OK, reply
    record, _ = reply[2]
    return record["id"]


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def is_error_or_closed(connection: RawConnection, reply: Any) -> bool:
    if reply is None:
        return connection.closed
    return isinstance(reply, list) and len(reply) == 3 and reply[1] != protocol.STATUS_OK


# Frames that are not requests at all. The daemon cannot trust anything more on such a
# connection, so it must close it, after an error reply at most.

NOT_REQUESTS = {
    "garbage_body": frame(b"\xc1\xc1\xc1\xc1"),
    "http_request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "random_body": frame(bytes(range(256)) * 4),
    "reversed_bytes": bytes(range(255, -1, -1)),
    "integer": frame(msgpack.packb(42)),
    "string": frame(msgpack.packb("hello")),
    "map": frame(msgpack.packb({"id": 1, "op": "hello"})),
    "empty_array": frame(msgpack.packb([])),
    "id_only": frame(msgpack.packb([1])),
    "string_id": frame(msgpack.packb(["1", "hello", 1])),
    "float_id": frame(msgpack.packb([1.0e30, "hello", 1])),
    "bool_id": frame(msgpack.packb([True, "hello", 1])),
    "negative_id": frame(msgpack.packb([-1, "hello", 1])),
    "empty_frame": frame(b""),
    "trailing_bytes": frame(msgpack.packb([1, "hello", 1]) + b"\x00"),
    "deep_nesting": frame(b"\x91" * 100_000 + b"\x00"),
    "array_claiming_4g_items": frame(b"\xdd\xff\xff\xff\xff"),
    "string_claiming_4g_bytes": frame(b"\x93\x01\xa5hello\xdb\xff\xff\xff\xff"),
    "integer_map_key": frame(msgpack.packb([1, "hello", {1: 2}])),
}


@pytest.mark.parametrize("data", NOT_REQUESTS.values(), ids=NOT_REQUESTS.keys())
def test_not_a_request_closes_connection(raw, data):
    raw.send_bytes(data)
    reply = raw.receive()
    assert is_error_or_closed(raw, reply)
    assert raw.is_closed()


@pytest.mark.parametrize("data", NOT_REQUESTS.values(), ids=NOT_REQUESTS.keys())
def test_not_a_request_after_hello_closes_connection(greeted, data):
    greeted.send_bytes(data)
    reply = greeted.receive()
    assert is_error_or_closed(greeted, reply)
    assert greeted.is_closed()


def test_oversized_frame_header_rejected_at_once(raw):
    raw.send_bytes(b"\xff\xff\xff\xff")
    reply = raw.receive()
    assert reply is not None
    assert reply[1] == SIZE_CODE
    assert raw.is_closed()


def test_frame_one_byte_over_limit_rejected(greeted):
    greeted.send_bytes(struct.pack(">I", protocol.MAX_FRAME_SIZE + 1))
    reply = greeted.receive()
    assert reply is not None
    assert reply[1] == SIZE_CODE
    assert greeted.is_closed()


def test_truncated_frame_then_close(daemon, bystander, status_client):
    baseline = connection_count(status_client)
    for cut in (1, 3, 4, 10):
        connection = RawConnection(daemon.socket_path)
        connection.hello()
        data = protocol.encode_frame_bytes([2, protocol.STATUS])
        connection.send_bytes(data[:cut])
        connection.close()
    bystander.wait_for_calls(10)
    assert wait_for_connection_count(status_client, baseline)


def test_truncated_frame_then_half_close(raw):
    raw.hello()
    raw.send_bytes(protocol.encode_frame_bytes([2, protocol.STATUS])[:-1])
    raw.sock.shutdown(socket.SHUT_WR)
    assert raw.is_closed()


def test_connection_closed_mid_pipeline(daemon, bystander, status_client, dict_id):
    baseline = connection_count(status_client)
    connection = RawConnection(daemon.socket_path)
    connection.hello()
    requests = []
    for request_id in range(2, 200):
        if request_id % 2:
            requests.append(protocol.encode_frame_bytes([request_id, protocol.STATUS]))
        else:
            key = str(request_id).encode()
            requests.append(protocol.encode_frame_bytes([request_id, protocol.PUT, dict_id, key, None, key, False]))
    connection.send_bytes(b"".join(requests))
    connection.close()
    bystander.wait_for_calls(10)
    assert wait_for_connection_count(status_client, baseline)


# Requests before the handshake.


def test_request_before_hello_rejected(raw):
    reply = raw.call(7, protocol.STATUS)
    assert reply[0] == 7
    assert reply[1] == PROTOCOL_CODE


def test_hello_after_rejected_request_works(raw):
    raw.call(7, protocol.GET, b"12345678", b"key")
    raw.hello()
    reply = raw.call(8, protocol.STATUS)
    assert reply[1] == protocol.STATUS_OK


@pytest.mark.parametrize("version", [0, 2, 999, -1, "1", None, [1], 1.0, 2**64 - 1])
def test_wrong_protocol_version_rejected(raw, version):
    reply = raw.call(3, protocol.HELLO, version, os.getpid())
    assert reply[0] == 3
    assert reply[1] == PROTOCOL_CODE


def test_hello_without_version_rejected(raw):
    reply = raw.call(3, protocol.HELLO)
    assert reply[1] == PROTOCOL_CODE


def test_wrong_version_message_names_both_versions(raw):
    reply = raw.call(3, protocol.HELLO, 999, os.getpid())
    assert str(protocol.PROTOCOL_VERSION) in reply[2]
    assert "999" in reply[2]


# Requests with a valid shape and wrong contents: an error reply for that request, and
# the connection keeps serving.


@pytest.mark.parametrize("op", ["no_such_op", "", "GET", "get ", "hello\x00", "x" * 10_000])
def test_unknown_operation_rejected(greeted, op):
    reply = greeted.call(5, op)
    assert reply[0] == 5
    assert reply[1] == PROTOCOL_CODE
    assert greeted.call(6, protocol.STATUS)[1] == protocol.STATUS_OK


@pytest.mark.parametrize("op", [None, 1, b"get", ["get"], {"op": "get"}])
def test_operation_not_string_rejected(greeted, op):
    reply = greeted.call(5, op)
    assert is_error_or_closed(greeted, reply)


def test_second_hello_gets_reply(greeted):
    reply = greeted.call(5, protocol.HELLO, protocol.PROTOCOL_VERSION, os.getpid())
    assert reply[0] == 5
    assert greeted.call(6, protocol.STATUS)[1] == protocol.STATUS_OK


WRONG_ARGUMENTS = {
    "get_no_args": (protocol.GET,),
    "get_one_arg": (protocol.GET, b"12345678"),
    "get_extra_arg": (protocol.GET, b"12345678", b"k", b"extra"),
    "get_string_id": (protocol.GET, "12345678", b"k"),
    "get_short_id": (protocol.GET, b"1234", b"k"),
    "get_string_key": (protocol.GET, b"12345678", "k"),
    "get_int_key": (protocol.GET, b"12345678", 5),
    "contains_none_key": (protocol.CONTAINS, b"12345678", None),
    "len_no_args": (protocol.LEN,),
    "len_list_id": (protocol.LEN, [1, 2]),
    "put_no_args": (protocol.PUT,),
    "put_missing_flag": (protocol.PUT, b"12345678", b"k", None, b"v"),
    "put_string_value": (protocol.PUT, b"12345678", b"k", None, "v", False),
    "put_int_flag": (protocol.PUT, b"12345678", b"k", None, b"v", 1),
    "put_map_stored_key": (protocol.PUT, b"12345678", b"k", {"a": 1}, b"v", False),
    "update_not_list": (protocol.UPDATE, b"12345678", {"k": "v"}),
    "update_entry_too_short": (protocol.UPDATE, b"12345678", [[b"k", b"v"]]),
    "update_entry_not_list": (protocol.UPDATE, b"12345678", [b"k"]),
    "update_too_many_entries": (protocol.UPDATE, b"12345678", [[b"k", None, b"v"]] * 10_001),
    "pop_float_key": (protocol.POP, b"12345678", 1.5),
    "clear_extra_arg": (protocol.CLEAR, b"12345678", True),
    "scan_negative_position": (protocol.SCAN, b"12345678", -1, 10, True, True),
    "scan_huge_position": (protocol.SCAN, b"12345678", 2**64 - 1, 10, True, True),
    "scan_zero_page": (protocol.SCAN, b"12345678", 0, 0, True, True),
    "scan_string_flag": (protocol.SCAN, b"12345678", 0, 10, "yes", True),
    "scan_float_page": (protocol.SCAN, b"12345678", 0, 10.5, True, True),
    "dict_open_no_args": (protocol.DICT_OPEN,),
    "dict_open_bytes_name": (protocol.DICT_OPEN, "main", b"kv"),
    "dict_open_bad_name": (protocol.DICT_OPEN, "main", "a/b"),
    "dict_open_long_name": (protocol.DICT_OPEN, "main", "k" * 65),
    "dict_create_int_flag": (protocol.DICT_CREATE, "main", "kv", 1),
    "dict_create_bad_env": (protocol.DICT_CREATE, "", "kv", True),
    "dict_by_id_none": (protocol.DICT_BY_ID, None),
    "dict_list_int_env": (protocol.DICT_LIST, 5),
    "dict_delete_no_args": (protocol.DICT_DELETE,),
    "dict_ephemeral_extra_arg": (protocol.DICT_EPHEMERAL, "main", "extra"),
    "status_extra_arg": (protocol.STATUS, 1),
    "get_ext_type_key": (protocol.GET, b"12345678", msgpack.ExtType(5, b"x")),
}


@pytest.mark.parametrize("request_args", WRONG_ARGUMENTS.values(), ids=WRONG_ARGUMENTS.keys())
def test_wrong_arguments_get_error_reply(greeted, request_args):
    reply = greeted.call(9, *request_args)
    assert reply is not None
    assert reply[0] == 9
    assert reply[1] != protocol.STATUS_OK
    assert isinstance(reply[2], str)
    assert greeted.call(10, protocol.STATUS)[1] == protocol.STATUS_OK


def test_wrong_arguments_reply_is_protocol_error(greeted):
    reply = greeted.call(9, protocol.GET, "12345678", b"k")
    assert reply[1] == PROTOCOL_CODE
    assert "get" in reply[2]


def test_wrong_arguments_store_nothing(greeted, dict_id):
    greeted.call(9, protocol.PUT, dict_id, b"k", None, "not bytes", False)
    greeted.call(10, protocol.UPDATE, dict_id, [[b"a", None, b"1"], [b"b", None, 2]])
    reply = greeted.call(11, protocol.LEN, dict_id)
    assert reply[2] == 0


def test_unknown_dict_id_not_found(greeted):
    reply = greeted.call(9, protocol.GET, b"\xff" * 8, b"k")
    assert reply[1] != protocol.STATUS_OK
    assert greeted.call(10, protocol.STATUS)[1] == protocol.STATUS_OK


# Request ids: the whole unsigned 64-bit range works, and nothing outside it.


@pytest.mark.parametrize("request_id", [0, 1, 2**31, 2**32, 2**63, 2**64 - 1])
def test_request_id_echoed(greeted, request_id):
    reply = greeted.call(request_id, protocol.STATUS)
    assert reply[0] == request_id
    assert reply[1] == protocol.STATUS_OK


@pytest.mark.parametrize("request_id", [-1, -(2**63)])
def test_negative_request_id_closes_connection(greeted, request_id):
    reply = greeted.call(request_id, protocol.STATUS)
    assert is_error_or_closed(greeted, reply)
    assert greeted.is_closed()


def test_write_with_huge_request_id(greeted, dict_id):
    reply = greeted.call(2**64 - 1, protocol.PUT, dict_id, b"k", None, b"v", False)
    assert reply[0] == 2**64 - 1
    assert reply[1] == protocol.STATUS_OK


# Pipelining: many requests in one send, each reply matched to its request by id.


def test_pipelined_requests_each_get_one_reply(greeted, dict_id):
    count = 300
    frames = []
    for request_id in range(100, 100 + count):
        if request_id % 3 == 0:
            frames.append(protocol.encode_frame_bytes([request_id, protocol.GET, dict_id, b"missing"]))
        else:
            key = str(request_id).encode()
            frames.append(protocol.encode_frame_bytes([request_id, protocol.PUT, dict_id, key, None, key, False]))
    greeted.send_bytes(b"".join(frames))

    replies = {}
    for _ in range(count):
        reply = greeted.receive()
        assert reply is not None
        assert reply[0] not in replies
        replies[reply[0]] = reply
    assert sorted(replies) == list(range(100, 100 + count))
    for request_id, reply in replies.items():
        assert reply[1] == protocol.STATUS_OK, reply
        expected = [False, None] if request_id % 3 == 0 else True
        assert reply[2] == expected, reply


def test_pipelined_writes_all_stored(greeted, dict_id):
    keys = [str(i).encode() for i in range(500)]
    frames = [
        protocol.encode_frame_bytes([100 + i, protocol.PUT, dict_id, key, None, b"v" + key, False])
        for i, key in enumerate(keys)
    ]
    greeted.send_bytes(b"".join(frames))
    for _ in keys:
        assert greeted.receive()[1] == protocol.STATUS_OK

    for i, key in enumerate(keys):
        reply = greeted.call(1000 + i, protocol.GET, dict_id, key)
        assert reply[2] == [True, b"v" + key]


def test_pipeline_with_bad_request_in_middle(greeted, dict_id):
    frames = [protocol.encode_frame_bytes([100 + i, protocol.LEN, dict_id]) for i in range(10)]
    frames.insert(5, protocol.encode_frame_bytes([50, "no_such_op"]))
    greeted.send_bytes(b"".join(frames))
    replies = {reply[0]: reply for reply in (greeted.receive() for _ in range(11))}
    assert replies[50][1] == PROTOCOL_CODE
    assert all(replies[100 + i][1] == protocol.STATUS_OK for i in range(10))


def test_pipeline_replies_before_malformed_frame_sent(greeted, dict_id):
    frames = [protocol.encode_frame_bytes([100 + i, protocol.LEN, dict_id]) for i in range(10)]
    greeted.send_bytes(b"".join(frames) + frame(b"\xc1"))
    replies = []
    while (reply := greeted.receive()) is not None:
        replies.append(reply)
    answered = {reply[0] for reply in replies if reply[1] == protocol.STATUS_OK}
    assert answered == set(range(100, 110))


def test_request_split_across_sends(greeted, dict_id):
    data = protocol.encode_frame_bytes([77, protocol.PUT, dict_id, b"k", None, b"v" * 1000, False])
    for start in range(0, len(data), 7):
        greeted.send_bytes(data[start : start + 7])
    reply = greeted.receive()
    assert reply[:2] == [77, protocol.STATUS_OK]


# Many abusive clients at once.


def test_many_abusive_connections_at_once(daemon, status_client):
    baseline = connection_count(status_client)
    payloads = list(NOT_REQUESTS.values())
    connections = []
    for index in range(60):
        connection = RawConnection(daemon.socket_path)
        connection.send_bytes(payloads[index % len(payloads)])
        connections.append(connection)
    for connection in connections:
        assert connection.is_closed()
        connection.close()
    assert wait_for_connection_count(status_client, baseline)


def test_idle_connections_do_not_block_others(daemon, bystander):
    connections = [RawConnection(daemon.socket_path) for _ in range(50)]
    bystander.wait_for_calls(50)
    assert bystander.errors == []
    for connection in connections:
        connection.close()


def test_daemon_out_of_file_descriptors_recovers(tmp_path):
    socket_dir = tempfile.mkdtemp(prefix="sd-fd-", dir="/tmp")
    socket_path = os.path.join(socket_dir, "sharedict.sock")
    log_path = tmp_path / "daemon.log"
    process = start_serve(socket_path, str(tmp_path / "data"), str(log_path), max_open_files=64)
    connections = []
    try:
        # The listen backlog takes the connections that the daemon has no descriptor for.
        connections = [RawConnection(socket_path) for _ in range(100)]
        assert wait_until(lambda: "cannot accept" in log_path.read_text())
        waiting = connections.pop()
        for connection in connections:
            connection.close()
        waiting.hello()
        assert waiting.call(2, protocol.STATUS)[1] == protocol.STATUS_OK
        waiting.close()

        # A daemon that retried at once would log thousands of warnings a second.
        assert log_path.read_text().count("cannot accept") < 10
    finally:
        for connection in connections:
            connection.close()
        stop_process(process)
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_client_that_never_reads_replies(daemon, bystander, dict_id):
    connection = RawConnection(daemon.socket_path)
    connection.hello()
    connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = protocol.encode_frame_bytes([3, protocol.SCAN, dict_id, 0, 1000, True, True])
    try:
        for _ in range(2000):
            connection.send_bytes(request)
    except OSError as exc:
        # The daemon may cut off a client that never reads, which is also fine.
        assert exc.errno in (errno.EPIPE, errno.ECONNRESET)
    bystander.wait_for_calls(50)
    assert bystander.errors == []
    connection.close()


# Random requests: whatever the arguments, each request gets one reply with its id.

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=5),
    max_leaves=20,
)

# ``shutdown`` would stop the shared daemon, so the fuzzing leaves it out.
FUZZED_OPERATIONS = [
    protocol.HELLO,
    protocol.DICT_OPEN,
    protocol.DICT_CREATE,
    protocol.DICT_BY_ID,
    protocol.DICT_EPHEMERAL,
    protocol.DICT_LIST,
    protocol.DICT_DELETE,
    protocol.GET,
    protocol.CONTAINS,
    protocol.LEN,
    protocol.PUT,
    protocol.UPDATE,
    protocol.POP,
    protocol.CLEAR,
    protocol.SCAN,
    protocol.STATUS,
    "no_such_op",
]


@settings(max_examples=300)
@given(
    request_id=st.integers(min_value=0, max_value=2**64 - 1),
    op=st.sampled_from(FUZZED_OPERATIONS),
    args=st.lists(msgpack_values, max_size=6),
)
def test_random_request_gets_one_reply(greeted, request_id, op, args):
    reply = greeted.call(request_id, op, *args)
    assert reply is not None
    assert reply[0] == request_id
    assert greeted.call(1, protocol.STATUS)[1] == protocol.STATUS_OK


# The client against a daemon that breaks the protocol: a fake daemon of the test's own
# replies to the handshake, or to the request after it, with a broken frame.


class FakeDaemon:
    """A Unix socket server that replies to each connection with the bytes it is given.

    The first ``resets`` connections are closed as soon as their hello arrives, as a
    daemon that is being killed closes them.
    """

    def __init__(self, hello_reply: bytes, request_reply: bytes = b"", resets: int = 0) -> None:
        self.directory = tempfile.mkdtemp(prefix="sd-fake-", dir="/tmp")
        self.socket_path = os.path.join(self.directory, "sharedict.sock")
        self.hello_reply = hello_reply
        self.request_reply = request_reply
        self.resets_left = resets
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.socket_path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with sock:
                reader = protocol.FrameReader()
                if self.resets_left:
                    self.resets_left -= 1
                    self._read_frame(sock, reader)
                    continue
                for reply in (self.hello_reply, self.request_reply):
                    if not self._read_frame(sock, reader):
                        break
                    sock.sendall(reply)
                # Hold the connection open, so that only the reply can end the call.
                while sock.recv(4096):
                    pass

    @staticmethod
    def _read_frame(sock: socket.socket, reader: protocol.FrameReader) -> bool:
        while True:
            for _ in reader.frames():
                return True
            data = sock.recv(4096)
            if not data:
                return False
            reader.feed(data)

    def close(self) -> None:
        self.listener.close()
        shutil.rmtree(self.directory, ignore_errors=True)


HELLO_OK = protocol.encode_frame_bytes([1, protocol.STATUS_OK, {"protocol": protocol.PROTOCOL_VERSION}])

BROKEN_REPLIES = {
    "hello_garbage": (frame(b"\xc1"), b""),
    "hello_oversized_header": (b"\xff\xff\xff\xff", b""),
    "hello_not_array": (frame(msgpack.packb(42)), b""),
    "hello_empty_array": (frame(msgpack.packb([])), b""),
    "hello_short_array": (frame(msgpack.packb([1])), b""),
    "request_garbage": (HELLO_OK, frame(b"\xc1")),
    "request_not_array": (HELLO_OK, frame(msgpack.packb({"id": 2}))),
    "request_short_array": (HELLO_OK, frame(msgpack.packb([2, 0]))),
    "request_oversized_header": (HELLO_OK, b"\xff\xff\xff\xff"),
}


@pytest.mark.parametrize("replies", BROKEN_REPLIES.values(), ids=BROKEN_REPLIES.keys())
def test_client_rejects_broken_reply(replies, tmp_path):
    fake = FakeDaemon(*replies)
    client = Client(Settings(socket_path=fake.socket_path, data_dir=str(tmp_path), autostart=False))
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            client.call(Request(protocol.STATUS))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(timeout=RECEIVE_TIMEOUT)
    fake.close()
    client.close()
    assert outcome, "the client still waits for a reply"
    assert isinstance(outcome[0], ProtocolError), repr(outcome[0])


@pytest.mark.parametrize("replies", BROKEN_REPLIES.values(), ids=BROKEN_REPLIES.keys())
def test_async_client_rejects_broken_reply(replies, tmp_path):
    fake = FakeDaemon(*replies)
    client = Client(Settings(socket_path=fake.socket_path, data_dir=str(tmp_path), autostart=False))
    handle = Dict.from_name("kv", client=client)

    async def call() -> None:
        await asyncio.wait_for(handle.len.aio(), RECEIVE_TIMEOUT)

    try:
        with pytest.raises(ProtocolError):
            asyncio.run(call())
    finally:
        fake.close()
        client.close()


STATUS_OK_REPLY = protocol.encode_frame_bytes([2, protocol.STATUS_OK, {"pid": 1}])


def test_client_waits_out_handshake_resets(tmp_path):
    fake = FakeDaemon(HELLO_OK, STATUS_OK_REPLY, resets=5)
    client = Client(Settings(socket_path=fake.socket_path, data_dir=str(tmp_path), autostart=False))
    try:
        assert client.call(Request(protocol.STATUS)) == {"pid": 1}
        assert fake.resets_left == 0
    finally:
        fake.close()
        client.close()


def test_async_client_waits_out_handshake_resets(tmp_path):
    fake = FakeDaemon(HELLO_OK, STATUS_OK_REPLY, resets=5)
    client = Client(Settings(socket_path=fake.socket_path, data_dir=str(tmp_path), autostart=False))

    async def call() -> Any:
        return await asyncio.wait_for(aio.call_async(client, Request(protocol.STATUS)), RECEIVE_TIMEOUT)

    try:
        assert asyncio.run(call()) == {"pid": 1}
        assert fake.resets_left == 0
    finally:
        fake.close()
        client.close()


def test_async_handshake_with_silent_daemon_times_out(tmp_path, monkeypatch):
    # A listening socket that never accepts: connect() succeeds and the hello waits.
    directory = tempfile.mkdtemp(prefix="sd-silent-", dir="/tmp")
    socket_path = os.path.join(directory, "sharedict.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(8)
    monkeypatch.setattr(aio, "HANDSHAKE_TIMEOUT", 0.5)
    client = Client(Settings(socket_path=socket_path, data_dir=str(tmp_path), autostart=False))

    async def call() -> Any:
        return await asyncio.wait_for(aio.call_async(client, Request(protocol.STATUS)), RECEIVE_TIMEOUT)

    try:
        with pytest.raises(DaemonUnavailableError, match=r"did not answer hello within 0\.5 s"):
            asyncio.run(call())
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)
        client.close()


# Frame splitting, without a daemon.


def frame_of(body: bytes) -> bytes:
    return protocol.HEADER.pack(len(body)) + body


def test_reader_fed_while_iterating_keeps_order():
    reader = protocol.FrameReader()
    reader.feed(frame_of(b"a") + frame_of(b"b") + frame_of(b"cc")[:3])
    frames = reader.frames()
    first = bytes(next(frames))
    reader.feed(frame_of(b"cc")[3:] + frame_of(b"d"))
    rest = [bytes(body) for body in frames] + [bytes(body) for body in reader.frames()]
    assert [first, *rest] == [b"a", b"b", b"cc", b"d"]


def test_reader_bodies_survive_later_feeds():
    reader = protocol.FrameReader()
    reader.feed(frame_of(b"first") + frame_of(b"second")[:2])
    bodies = list(reader.frames())
    reader.feed(frame_of(b"second")[2:])
    bodies += list(reader.frames())
    assert [bytes(body) for body in bodies] == [b"first", b"second"]
