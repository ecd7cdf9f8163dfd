"""The heap trimmer (issue 12, finding 9): trims after enough logouts,
not before, and never without a C library that has `malloc_trim`."""

from __future__ import annotations

import trio
import trio.testing

from mlink.util import heaptrim
from mlink.util.heaptrim import (
    TRIM_AFTER_CLOSED,
    TRIM_BUSY_INTERVAL_SECONDS,
    TRIM_INTERVAL_SECONDS,
    HeapTrimmer,
)
from mlink.util.memdebug import MemoryReporter


def test_trims_only_after_enough_closed_connections() -> None:
    calls: list[int] = []
    trimmer = HeapTrimmer(lambda pad: calls.append(pad) or 1)
    for _ in range(TRIM_AFTER_CLOSED - 1):
        trimmer.connection_closed()
    assert not trimmer.trim_if_due()
    assert not trimmer.trim_if_due()  # quiet, but too few
    trimmer.connection_closed()
    assert not trimmer.trim_if_due()  # enough, but the wave goes on
    assert trimmer.trim_if_due()  # a quiet interval: the wave is over
    assert calls == [0]
    # The count starts over: no second trim without new logouts.
    assert not trimmer.trim_if_due()
    assert trimmer.stats.as_dict()["trims"] == 1


def test_run_trims_in_the_background() -> None:
    calls: list[int] = []
    trimmer = HeapTrimmer(lambda pad: calls.append(pad) or 1)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trimmer.run)
            for _ in range(TRIM_AFTER_CLOSED):
                trimmer.connection_closed()
            await trio.sleep(TRIM_INTERVAL_SECONDS * 2.5)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert calls == [0]


def test_real_malloc_trim_runs() -> None:
    # glibc here: the real function is found and callable.
    trimmer = HeapTrimmer()
    for _ in range(TRIM_AFTER_CLOSED):
        trimmer.connection_closed()
    trimmer.trim_if_due()
    assert trimmer.trim_if_due()


def test_steady_churn_trims_all_the_same(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []
    now = [1000.0]
    monkeypatch.setattr(heaptrim.time, "monotonic", lambda: now[0])
    trimmer = HeapTrimmer(lambda pad: calls.append(pad) or 1)
    for _ in range(int(TRIM_BUSY_INTERVAL_SECONDS / TRIM_INTERVAL_SECONDS) - 1):
        for _ in range(TRIM_AFTER_CLOSED):
            trimmer.connection_closed()
        now[0] += TRIM_INTERVAL_SECONDS
        assert not trimmer.trim_if_due()
    now[0] += TRIM_INTERVAL_SECONDS
    trimmer.connection_closed()
    assert trimmer.trim_if_due()
    assert calls == [0]


def test_memory_report_is_off_without_the_variable(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("MLINK_DEBUG_MEMORY", raising=False)
    assert MemoryReporter.from_env() is None
