"""An index of bound sessions by full and by bare JID.

The session table (local sessions) and the cluster's replica of the other
shards' sessions need the same two lookups — by full JID for delivery, by
bare JID for a user's resources — kept consistent on every add and remove.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from mlink.jid import JID

T = TypeVar("T")


class JidIndex(Generic[T]):
    __slots__ = ("_by_full", "_by_bare")

    def __init__(self) -> None:
        self._by_full: dict[JID, T] = {}
        self._by_bare: dict[JID, dict[str, T]] = {}

    def put(self, full: JID, value: T) -> None:
        self._by_full[full] = value
        self._by_bare.setdefault(full.bare, {})[full.resource] = value

    def remove(self, full: JID) -> T | None:
        value = self._by_full.pop(full, None)
        if value is None:
            return None
        resources = self._by_bare.get(full.bare)
        if resources is not None:
            resources.pop(full.resource, None)
            if not resources:
                del self._by_bare[full.bare]
        return value

    def get(self, full: JID) -> T | None:
        return self._by_full.get(full)

    def resource(self, bare: JID, resource: str) -> T | None:
        return self._by_bare.get(bare, {}).get(resource)

    def resources(self, bare: JID) -> dict[str, T]:
        """The user's entries by resource (do not modify)."""
        found = self._by_bare.get(bare)
        return found if found is not None else {}

    def has_user(self, bare: JID) -> bool:
        return bare in self._by_bare

    def items(self) -> Iterator[tuple[JID, T]]:
        return iter(list(self._by_full.items()))

    def values(self) -> list[T]:
        return list(self._by_full.values())

    def __len__(self) -> int:
        return len(self._by_full)

