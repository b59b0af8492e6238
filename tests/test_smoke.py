"""A first pass over the blocking API against a real daemon."""

from sharedict import Dict


def test_put_then_get_roundtrip(daemon):
    kv = Dict.from_name("kv", create_if_missing=True)
    kv["cloud"] = "dictionary"
    assert kv["cloud"] == "dictionary"


def test_value_survives_crash_restart(daemon):
    kv = Dict.from_name("kv", create_if_missing=True)
    kv["cloud"] = "dictionary"
    daemon.restart(crash=True)
    assert kv["cloud"] == "dictionary"
