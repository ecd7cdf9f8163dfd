"""A bounded per-user cache whose loads cannot cache stale data.

Several modules keep a per-user value read from the store or the directory
(blocklists, profiles): each needs a size bound (memory must not grow with
every user ever seen) and the same race guard — a load that overlaps a
change (here or, through `Module.user_cache`, on another shard) must not
cache what it read before the change. Only keys with a load in flight have
any bookkeeping, so the guard costs nothing for idle users.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Load:
    """A load in flight for one key; `stale` once the key was invalidated."""

    __slots__ = ("count", "stale")

    def __init__(self) -> None:
        self.count = 0
        self.stale = False


class UserCache(Generic[K, V]):
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._values: OrderedDict[K, V] = OrderedDict()
        self._loads: dict[K, Load] = {}

    def get(self, key: K) -> V | None:
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    def begin(self, key: K) -> Load:
        """Call before reading the value from its source; pass the result
        to `finish` with what was read."""
        load = self._loads.get(key)
        if load is None:
            load = self._loads[key] = Load()
        load.count += 1
        return load

    def finish(self, key: K, load: Load, value: V, keep: bool = True) -> None:
        """Cache `value` unless the key changed while it was read (or
        `keep` is False: the caller only wanted it once)."""
        load.count -= 1
        if not load.count and self._loads.get(key) is load:
            del self._loads[key]
        if keep and not load.stale:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self.max_entries:
                self._values.popitem(last=False)

    def invalidate(self, key: K) -> None:
        """The source changed: drop the value, and any load under way."""
        self._values.pop(key, None)
        load = self._loads.get(key)
        if load is not None:
            load.stale = True

    def invalidate_all(self) -> None:
        """Any value may be stale (changes may have gone unannounced): drop
        them all, and every load under way."""
        self._values.clear()
        for load in self._loads.values():
            load.stale = True

    def forget(self, key: K) -> None:
        self._values.pop(key, None)

    def __len__(self) -> int:
        return len(self._values)
