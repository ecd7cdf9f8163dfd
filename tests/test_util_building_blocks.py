"""The shared building blocks (issue 11, item 8): the bounded per-user
cache with its race guard, keyed locks, the output buffer's write marks."""

from __future__ import annotations

import trio
import trio.testing

from mlink.util.keyed_lock import KeyedLock
from mlink.util.outbuffer import OutputBuffer
from mlink.util.user_cache import UserCache


def test_user_cache_is_bounded_and_keeps_the_most_recently_used() -> None:
    cache: UserCache[str, int] = UserCache(2)
    for key, value in (("a", 1), ("b", 2)):
        cache.finish(key, cache.begin(key), value)
    assert cache.get("a") == 1  # a is now the most recent
    cache.finish("c", cache.begin("c"), 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert len(cache) == 2


def test_a_load_that_overlaps_a_change_is_not_cached() -> None:
    cache: UserCache[str, str] = UserCache(10)
    load = cache.begin("alice")  # reading the old value...
    cache.invalidate("alice")  # ...while it changes
    cache.finish("alice", load, "old")
    assert cache.get("alice") is None
    cache.finish("alice", cache.begin("alice"), "new")
    assert cache.get("alice") == "new"


async def test_keyed_lock_serialises_one_key_and_forgets_idle_keys() -> None:
    seen: list[str] = []
    idle: list[str] = []
    locks: KeyedLock[str] = KeyedLock(idle.append)

    async def work(name: str) -> None:
        async with locks.hold("alice"):
            seen.append(f"{name}-in")
            await trio.testing.wait_all_tasks_blocked()
            seen.append(f"{name}-out")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(work, "one")
        nursery.start_soon(work, "two")
    assert seen in (["one-in", "one-out", "two-in", "two-out"],
                    ["two-in", "two-out", "one-in", "one-out"])
    assert "alice" not in locks and idle == ["alice"]


async def test_output_marks_say_what_was_written_and_discard_returns_items() -> None:
    out: OutputBuffer[str] = OutputBuffer(limit=100)
    out.push(b"12345", "first")
    first = out.mark()
    out.push(b"678", "second")
    batch = out.take()
    out.written_now(sum(len(c) for c in batch))
    assert out.written >= first and out.pending == 0
    out.push(b"abc", "third")
    taken = out.take()  # a write that never completes...
    assert taken == [b"abc"]
    assert out.discard() == ["third"]  # ...hands its stanza back
    assert not out.fits(101)
