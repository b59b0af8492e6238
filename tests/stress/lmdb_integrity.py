"""An offline check of a data directory: does the LMDB environment open, and do its tables agree?

Run it only after the daemon has stopped. It opens the environment read-only with py-lmdb
and cross-checks the sub-databases that ``sharedict.engine.store`` keeps:

* every ``index`` entry of a live dict has its ``order`` record, with the same key ref,
  and its ``access`` record, with the same last access;
* every ``order`` and ``access`` record has the entry it points to;
* the entry count in ``stats`` equals the entries found, and the next sequence number
  is above every sequence number in use;
* names, dict records and data ids point at each other;
* entries of a data id that no dict uses belong to one listed in ``garbage``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import lmdb

from sharedict.engine.layout import FORMAT_VERSION, STATS, U64, DictRecord, name_key, unpack_order

SUB_DATABASES = (b"names", b"dicts", b"stats", b"index", b"order", b"access", b"garbage", b"meta")


@dataclass
class IntegrityReport:
    """What the check found: problems (empty when consistent) and the records it counted."""

    problems: list[str] = field(default_factory=list)
    dicts: int = 0
    entries: int = 0
    garbage_records: int = 0

    def add(self, problem: str) -> None:
        # A damaged table can produce thousands of lines; the first ones name the fault.
        if len(self.problems) < 50:
            self.problems.append(problem)


def check_data_dir(data_dir: str) -> IntegrityReport:
    """Open the environment of ``data_dir`` read-only and cross-check its sub-databases."""
    report = IntegrityReport()
    env = lmdb.open(data_dir, readonly=True, max_dbs=16, subdir=True, create=False)
    try:
        dbs = {name: env.open_db(name, create=False) for name in SUB_DATABASES}
        with env.begin(buffers=False) as txn:
            _check(txn, dbs, report)
    finally:
        env.close()
    return report


def _check(txn: lmdb.Transaction, dbs: dict[bytes, object], report: IntegrityReport) -> None:
    stored_format = txn.get(b"format", db=dbs[b"meta"])
    if stored_format is None or U64.unpack(stored_format)[0] != FORMAT_VERSION:
        report.add(f"meta: format is {stored_format!r}, expected {FORMAT_VERSION}")

    live_data_ids = _check_dicts(txn, dbs, report)
    garbage = set(txn.cursor(db=dbs[b"garbage"]).iternext(values=False))
    report.garbage_records = len(garbage)
    for data_id in garbage & live_data_ids:
        report.add(f"garbage: data id {data_id.hex()} is listed as garbage but a dict uses it")

    index_seqs = _check_index(txn, dbs, live_data_ids, garbage, report)
    order_seqs = _check_order(txn, dbs, live_data_ids, garbage, report)
    _check_access(txn, dbs, live_data_ids, garbage, report)

    for data_id in live_data_ids:
        raw = txn.get(data_id, db=dbs[b"stats"])
        if raw is None:
            continue  # reported by _check_dicts
        count, next_seq = STATS.unpack(raw)
        seqs = index_seqs.get(data_id, [])
        if count != len(seqs):
            report.add(f"stats: data id {data_id.hex()} counts {count} entries, the index has {len(seqs)}")
        if count != len(order_seqs.get(data_id, [])):
            report.add(f"stats: data id {data_id.hex()} counts {count} entries, the order table has {len(order_seqs.get(data_id, []))}")
        if seqs and max(seqs) >= next_seq:
            report.add(f"stats: data id {data_id.hex()} has next sequence number {next_seq}, but {max(seqs)} is in use")
        duplicates = [seq for seq, times in Counter(seqs).items() if times > 1]
        if duplicates:
            report.add(f"index: data id {data_id.hex()} uses sequence numbers {duplicates[:5]} more than once")
        report.entries += len(seqs)


def _check_dicts(txn: lmdb.Transaction, dbs: dict[bytes, object], report: IntegrityReport) -> set[bytes]:
    """Check names, dict records and stats against each other; return the data ids in use."""
    live_data_ids: set[bytes] = set()
    for object_id, raw in txn.cursor(db=dbs[b"dicts"]):
        report.dicts += 1
        record = DictRecord.unpack(object_id, raw)
        if record.data_id in live_data_ids:
            report.add(f"dicts: data id {record.data_id.hex()} is used by two dicts")
        live_data_ids.add(record.data_id)
        if txn.get(record.data_id, db=dbs[b"stats"]) is None:
            report.add(f"dicts: dict {object_id.hex()} has data id {record.data_id.hex()} without stats")
        if record.name is not None:
            named = txn.get(name_key(record.environment_name, record.name), db=dbs[b"names"])
            if named != object_id:
                report.add(f"dicts: dict {record.name!r} ({object_id.hex()}) is not reachable by its name")

    for names_key, object_id in txn.cursor(db=dbs[b"names"]):
        if txn.get(object_id, db=dbs[b"dicts"]) is None:
            report.add(f"names: {names_key!r} points at missing dict {object_id.hex()}")

    for data_id in txn.cursor(db=dbs[b"stats"]).iternext(values=False):
        if data_id not in live_data_ids:
            report.add(f"stats: data id {data_id.hex()} belongs to no dict")
    return live_data_ids


def _owner_problem(table: str, data_id: bytes, live: set[bytes], garbage: set[bytes]) -> str | None:
    if data_id in live or data_id in garbage:
        return None
    return f"{table}: entry of data id {data_id.hex()}, which no dict uses and which is not garbage"


def _check_index(
    txn: lmdb.Transaction, dbs: dict[bytes, object], live: set[bytes], garbage: set[bytes], report: IntegrityReport
) -> dict[bytes, list[int]]:
    seqs: dict[bytes, list[int]] = {}
    for index_key, index_value in txn.cursor(db=dbs[b"index"]):
        data_id, ref = index_key[:8], index_key[8:]
        problem = _owner_problem("index", data_id, live, garbage)
        if problem:
            report.add(problem)
        if data_id not in live:
            continue
        seq = U64.unpack_from(index_value)[0]
        seqs.setdefault(data_id, []).append(seq)
        order_value = txn.get(data_id + U64.pack(seq), db=dbs[b"order"])
        if order_value is None:
            report.add(f"index: entry {index_key.hex()[:40]} has seq {seq} without an order record")
            continue
        access_ms, order_ref, _ = unpack_order(order_value)
        if order_ref != ref:
            report.add(f"index: entry {index_key.hex()[:40]} and its order record {seq} name different keys")
        if txn.get(data_id + U64.pack(access_ms) + U64.pack(seq), db=dbs[b"access"]) is None:
            report.add(f"index: entry {index_key.hex()[:40]} (seq {seq}) has no access record at {access_ms}")
    return seqs


def _check_order(
    txn: lmdb.Transaction, dbs: dict[bytes, object], live: set[bytes], garbage: set[bytes], report: IntegrityReport
) -> dict[bytes, list[int]]:
    seqs: dict[bytes, list[int]] = {}
    for order_key, order_value in txn.cursor(db=dbs[b"order"]):
        data_id = order_key[:8]
        seq = U64.unpack_from(order_key, 8)[0]
        problem = _owner_problem("order", data_id, live, garbage)
        if problem:
            report.add(problem)
        if data_id not in live:
            continue
        seqs.setdefault(data_id, []).append(seq)
        _, ref, _ = unpack_order(order_value)
        index_value = txn.get(data_id + ref, db=dbs[b"index"])
        if index_value is None or U64.unpack_from(index_value)[0] != seq:
            report.add(f"order: record {seq} of data id {data_id.hex()} has no index entry")
    return seqs


def _check_access(
    txn: lmdb.Transaction, dbs: dict[bytes, object], live: set[bytes], garbage: set[bytes], report: IntegrityReport
) -> None:
    for access_key in txn.cursor(db=dbs[b"access"]).iternext(values=False):
        data_id = access_key[:8]
        access_ms = U64.unpack_from(access_key, 8)[0]
        seq = U64.unpack_from(access_key, 16)[0]
        problem = _owner_problem("access", data_id, live, garbage)
        if problem:
            report.add(problem)
        if data_id not in live:
            continue
        order_value = txn.get(data_id + U64.pack(seq), db=dbs[b"order"])
        if order_value is None or unpack_order(order_value)[0] != access_ms:
            report.add(f"access: record ({access_ms}, {seq}) of data id {data_id.hex()} has no matching order record")
