"""Give the C heap's free pages back to the system after logouts.

Why (issue 12, finding 9, measured with mlink/util/memdebug.py): a shard's
RSS grew ~5-7 MiB per 1,000 login/logout cycles while nothing stayed
allocated — Python objects and glibc's bytes in use were the same after
every cycle (~9 MiB), but the free bytes glibc kept in the main heap grew
(38 → 53 MiB). Each TLS connection allocates OpenSSL buffers and record
state (tens of KiB) from the heap; when the connections close, the memory
is free but glibc only returns the *top* of the heap to the system, and a
few long-lived blocks allocated meanwhile keep the top in place, so the
freed pages in the middle stay resident and every burst of logins spreads
over a slightly different, larger part of the heap. `malloc_trim(0)`
releases every free page anywhere in the heap (madvise), which brought RSS
back to the same figure after every cycle.

Most of that free memory was not free yet when a connection closed: with
`mlink/util/memdebug.py` reports, glibc's bytes in use after 1,000 logouts
were 39.8 MiB before `gc.collect()` and 9.1 MiB after (14,555 unreachable
objects: connections in reference cycles, each holding its TLS object and
its OpenSSL buffers); after a second cycle 57.6 MiB before, 9.1 after. The
cyclic garbage collector does not see C memory, and its full collections
come rarely once a process holds many long-lived objects, so that garbage
piled up. Hence a full collection first, then the trim.

So: the server counts closed connections, and a background task trims
once a wave of logouts is over (no close for TRIM_INTERVAL_SECONDS) after
at least TRIM_AFTER_CLOSED closes; under steady churn, where no quiet
second comes, at most every TRIM_BUSY_INTERVAL_SECONDS. Not during a wave:
the next logins reuse the freed memory anyway, and each trim costs
milliseconds (6 ms on a 120 MiB heap once trimmed, 40 ms the first time).
Elsewhere than glibc (no `malloc_trim`), nothing happens.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

# How often the trimmer looks, and how long without a close ends a wave:
# memory comes back a second or two after the last logout.
TRIM_INTERVAL_SECONDS = 1.0
# Under steady churn (a close every second), trim this often all the same.
TRIM_BUSY_INTERVAL_SECONDS = 30.0
# Closed connections since the last trim that make another worth it: each
# left tens of KiB of free heap behind, so 64 are a few MiB; a shard with
# a trickle of logouts is not trimmed every second for nothing.
TRIM_AFTER_CLOSED = 64


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None (musl, macOS: nothing to call)."""
    # The running program's own symbols, libc's among them: no
    # `ctypes.util.find_library`, which imports shutil, tempfile and the
    # compression modules and runs `ldconfig -p` (idle memory and start time).
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


@dataclass
class TrimStats:
    trims: int = 0
    seconds: float = 0.0  # spent collecting and trimming, all trims together

    def as_dict(self) -> dict[str, object]:
        return {"trims": self.trims, "total_ms": round(self.seconds * 1000, 1)}


class HeapTrimmer:
    """Counts closed connections; `run` trims the heap after enough of them."""

    def __init__(self, trim: Callable[[int], int] | None = None) -> None:
        self._trim = trim if trim is not None else _load_malloc_trim()
        self._closed = 0  # since the last trim
        self._closed_at_last_look = 0
        self._last_trim = time.monotonic()
        self.stats = TrimStats()

    def connection_closed(self) -> None:
        self._closed += 1

    def due(self) -> bool:
        """Called every TRIM_INTERVAL_SECONDS: whether to trim now — enough
        connections closed since the last trim, and either none closed
        since the last call (the wave is over) or the last trim is long
        ago. Resets the counts when it says yes."""
        quiet = self._closed == self._closed_at_last_look
        self._closed_at_last_look = self._closed
        if self._trim is None or self._closed < TRIM_AFTER_CLOSED:
            return False
        now = time.monotonic()
        if not quiet and now - self._last_trim < TRIM_BUSY_INTERVAL_SECONDS:
            return False
        self._closed = self._closed_at_last_look = 0
        self._last_trim = now
        return True

    def trim_if_due(self) -> bool:
        """`due`, then collect and trim here (tests and tools)."""
        if not self.due() or self._trim is None:
            return False
        started = time.perf_counter()
        gc.collect()
        self._trim(0)
        self.stats.trims += 1
        self.stats.seconds += time.perf_counter() - started
        return True

    async def run(self) -> None:
        trim = self._trim
        if trim is None:
            log.debug("no malloc_trim in this C library; freed heap pages stay resident")
            return
        # Once after start-up too: reading the configuration and the
        # embedded directory's file (its whole text, then its parse) leaves
        # freed heap that an idle shard would otherwise keep resident.
        after_start = True
        while True:
            await trio.sleep(TRIM_INTERVAL_SECONDS)
            if not self.due() and not after_start:
                continue
            after_start = False
            started = time.perf_counter()
            gc.collect()
            # malloc_trim walks the whole heap; ctypes releases the GIL for
            # the call, so in a worker thread it does not hold up the loop.
            await trio.to_thread.run_sync(trim, 0)
            self.stats.trims += 1
            self.stats.seconds += time.perf_counter() - started
