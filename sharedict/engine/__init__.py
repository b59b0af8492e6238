"""The LMDB storage engine: dicts, entries, the last-access index, group commit, expiry."""

from sharedict.engine.errors import DictExists, DictNotFound, EngineError, EntryNotFound, StorageFull
from sharedict.engine.layout import DictRecord, Entry
from sharedict.engine.store import Store
from sharedict.engine.writer import GroupCommitWriter

__all__ = [
    "DictExists",
    "DictNotFound",
    "DictRecord",
    "EngineError",
    "Entry",
    "EntryNotFound",
    "GroupCommitWriter",
    "StorageFull",
    "Store",
]
