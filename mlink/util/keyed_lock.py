"""One lock per key (a user), created on demand and dropped when unused.

Why: several places must serialise work per user — two sessions sending
initial presence at once must not both deliver the same stored messages; a
profile's compare-then-modify and a roster's read-modify-write must not
interleave — while memory stays proportional to users being worked on now,
not to every user ever seen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)


class KeyedLock(Generic[K]):
    def __init__(self, on_idle: Callable[[K], None] | None = None) -> None:
        # key -> (lock, holders and waiters)
        self._locks: dict[K, tuple[trio.Lock, list[int]]] = {}
        # Called when the last holder of a key's lock leaves (e.g. to drop
        # per-key state that only lives while someone works on the key).
        self._on_idle = on_idle

    def __contains__(self, key: K) -> bool:
        """Whether someone holds or waits for `key`'s lock."""
        return key in self._locks

    def __len__(self) -> int:
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, key: K) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (trio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]
                if self._on_idle is not None:
                    self._on_idle(key)
