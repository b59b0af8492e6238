"""Keys at the size limit: slow, because each test moves a key of 100 MiB several times.

Values at the limit and one byte over, and keys over it, are tested in
``tests/test_limits.py``.
"""

from __future__ import annotations

import uuid

import pytest

from sharedict import Dict, RequestSizeError
from sharedict.api import protocol
from sharedict.api.protocol import MAX_OBJECT_SIZE
from sharedict.api.serialization import dump_value, encode_key
from sharedict.api.transport import Request


@pytest.fixture
def kv(daemon) -> Dict:
    return Dict.from_name(f"limits-{uuid.uuid4().hex[:12]}", create_if_missing=True).hydrate()


def key_of_encoded_size(size: int) -> bytes:
    # The canonical encoding of bytes is one tag byte and the bytes.
    key = bytes(size - 1)
    assert len(encode_key(key)[0]) == size
    return key


@pytest.mark.slow
def test_key_at_size_limit_round_trips(kv):
    key = key_of_encoded_size(MAX_OBJECT_SIZE)
    kv[key] = "largest key"
    assert kv[key] == "largest key"
    assert key in list(kv.keys())
    assert kv.pop(key) == "largest key"
    assert len(kv) == 0


@pytest.mark.slow
def test_key_and_value_at_limit(kv):
    key = key_of_encoded_size(MAX_OBJECT_SIZE)
    # Large bytes values pickle with a fixed overhead, measured on one of 1 MiB.
    value = bytes(MAX_OBJECT_SIZE - (len(dump_value(bytes(1 << 20))) - (1 << 20)))
    assert len(dump_value(value)) == MAX_OBJECT_SIZE
    kv[key] = value
    assert len(kv[key]) == len(value)


@pytest.mark.slow
def test_key_one_byte_over_limit_raises(kv):
    with pytest.raises(RequestSizeError, match="key"):
        kv[key_of_encoded_size(MAX_OBJECT_SIZE + 1)] = "too large"
    assert len(kv) == 0


@pytest.mark.slow
def test_daemon_rejects_key_one_byte_over_limit(kv, daemon):
    # A client that skips its own checks meets the daemon's.
    object_id = bytes.fromhex(kv.object_id[3:])
    request = Request(protocol.PUT, object_id, bytes(MAX_OBJECT_SIZE + 1), None, b"v", False, write=True)
    with pytest.raises(RequestSizeError, match="key"):
        daemon.client().call(request)
    assert len(kv) == 0
