"""Exceptions of the storage engine.

The engine knows nothing of the wire or of the user's API: the daemon translates these
into error replies at one boundary, and the client turns those into ``sharedict`` errors.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of the engine's exceptions."""


class DictNotFound(EngineError):
    """No dict has this name or id; it may have been deleted."""


class DictExists(EngineError):
    """A dict with this name exists already."""


class EntryNotFound(EngineError):
    """The dict has no entry for this key, or the entry has expired."""


class StorageFull(EngineError):
    """The disk is full, or the map cannot grow any further."""
