"""``Dict.objects``: create, list and delete named dicts."""

from __future__ import annotations

import datetime
from collections.abc import Generator
from typing import Any

from sharedict.api import protocol
from sharedict.api.codec import check_environment, check_name
from sharedict.api.dict import Dict
from sharedict.api.errors import AlreadyExistsError, InvalidError, NotFoundError
from sharedict.api.operation import operation
from sharedict.api.transport import Client, Request


def _aware_time(created_before: datetime.datetime | str) -> datetime.datetime:
    if isinstance(created_before, str):
        try:
            created_before = datetime.datetime.fromisoformat(created_before)
        except ValueError:
            raise InvalidError(
                f"created_before={created_before!r} is not an ISO 8601 time such as '2026-01-31T12:00:00'"
            ) from None
    if not isinstance(created_before, datetime.datetime):
        raise InvalidError(f"created_before must be a datetime or an ISO 8601 string, not {type(created_before).__name__}")
    # A time without a zone is local time, as in Modal.
    return created_before.astimezone()


class DictManager:
    """Management of named dicts, as ``Dict.objects``."""

    api_name = "Dict.objects"
    _client = None

    @operation
    def create(
        self,
        name: str,
        *,
        allow_existing: bool = False,
        environment_name: str | None = None,
        client: Client | None = None,
    ) -> Generator[Request, Any, None]:
        """Create a named dict; raises ``AlreadyExistsError`` unless ``allow_existing``."""
        name = check_name(name)
        environment_name = check_environment(environment_name)
        try:
            yield Request(protocol.DICT_CREATE, environment_name, name, bool(allow_existing), write=True)
        except AlreadyExistsError:
            raise AlreadyExistsError(
                f"dict {name!r} already exists in environment {environment_name!r}; "
                "pass allow_existing=True to accept an existing dict"
            ) from None

    @operation
    def list(
        self,
        *,
        max_objects: int | None = None,
        created_before: datetime.datetime | str | None = None,
        environment_name: str | None = None,
        client: Client | None = None,
    ) -> Generator[Request, Any, list[Dict]]:
        """Return handles on the named dicts of an environment, newest first."""
        if max_objects is not None and (
            not isinstance(max_objects, int) or isinstance(max_objects, bool) or max_objects < 0
        ):
            raise InvalidError(f"max_objects={max_objects!r} is not a count; pass None or an int of 0 or more")
        environment_name = check_environment(environment_name)
        before = None if created_before is None else _aware_time(created_before)

        records = yield Request(protocol.DICT_LIST, environment_name)
        handles = []
        for record in records:
            # Compare datetimes made as info() makes them, at microsecond resolution, so that
            # a dict's own info().created_at lists only the dicts created before it.
            created_at = datetime.datetime.fromtimestamp(record["created_at"], tz=datetime.timezone.utc)
            if before is not None and created_at >= before:
                continue
            if max_objects is not None and len(handles) >= max_objects:
                break
            handle = Dict._handle(name=record["name"], environment_name=environment_name, client=client)
            handle._apply_record(record)
            handles.append(handle)
        return handles

    @operation
    def delete(
        self,
        name: str,
        *,
        allow_missing: bool = False,
        environment_name: str | None = None,
        client: Client | None = None,
    ) -> Generator[Request, Any, None]:
        """Delete a named dict and all its entries, irreversibly.

        Every handle on it raises ``NotFoundError`` afterwards, also when a dict of the
        same name is created again. A missing dict raises ``NotFoundError`` unless
        ``allow_missing``.
        """
        name = check_name(name)
        environment_name = check_environment(environment_name)
        try:
            record = yield Request(protocol.DICT_OPEN, environment_name, name)
            yield Request(protocol.DICT_DELETE, record["id"], write=True)
        except NotFoundError:
            if allow_missing:
                return
            raise NotFoundError(
                f"dict {name!r} not found in environment {environment_name!r}; "
                "pass allow_missing=True to ignore a missing dict"
            ) from None


Dict.objects = DictManager()  # type: ignore[attr-defined]
