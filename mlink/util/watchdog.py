"""A watchdog for the event loop: stalls are counted and their cause logged.

Why: one slow call on a shard's loop (a quadratic parse, a blocking system
call) stalls every user of that shard, and `mlink status` would still say
"ready". A heartbeat task in the loop stamps the time every
HEARTBEAT_SECONDS; a daemon thread checks the stamp. When the loop has not
ticked for STALL_SECONDS, the thread captures what the loop's thread is
executing at that moment (its Python stack) and, once the loop runs again,
the stall is logged once with that stack and its length, and counted.

Cost: one sleep-and-stamp per 50 ms in the loop, and a thread that wakes at
the same rate; nothing per task step or per stanza (a Trio instrument
would cost two Python calls per step on the hot path).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)

# A loop that has not run for this long is stalled: users notice well under
# a second, and a healthy loop ticks every HEARTBEAT_SECONDS.
STALL_SECONDS = 0.1
HEARTBEAT_SECONDS = 0.05
# Frames of the stalled thread's stack shown in the log line.
STACK_FRAMES = 8
# At most one log line per this many seconds (every stall is counted): a
# saturated shard is late at every heartbeat, and a line with a stack for
# each would add to the load it reports.
LOG_INTERVAL = 10.0


@dataclass
class StallStats:
    stalls: int = 0  # stalls over STALL_SECONDS since start
    longest: float = 0.0  # seconds, the longest one
    last_cause: str = ""  # the innermost frames when the longest was seen
    _samples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"stalls": self.stalls, "longest_ms": round(self.longest * 1000, 1),
                "cause": self.last_cause}


class LoopWatchdog:
    def __init__(self) -> None:
        self.stats = StallStats()
        self._last_tick = time.monotonic()
        self._loop_thread = threading.get_ident()
        self._stalled_since: float | None = None
        self._stack = ""
        self._last_log = float("-inf")
        self._unlogged = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    async def run(self) -> None:
        """The heartbeat (in the loop) and its checker (a daemon thread),
        until cancelled."""
        self._loop_thread = threading.get_ident()
        checker = threading.Thread(target=self._check, name="mlink-watchdog", daemon=True)
        self._last_tick = time.monotonic()
        checker.start()
        try:
            while True:
                await trio.sleep(HEARTBEAT_SECONDS)
                self._tick()
        finally:
            self._stop.set()

    def _tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            gap = now - self._last_tick - HEARTBEAT_SECONDS
            self._last_tick = now
            stack, self._stack = self._stack, ""
            self._stalled_since = None
        if gap < STALL_SECONDS:
            return
        stats = self.stats
        stats.stalls += 1
        if gap > stats.longest:
            stats.longest = gap
            stats.last_cause = _innermost(stack)
        self._unlogged += 1
        if now - self._last_log < LOG_INTERVAL:
            return
        more = f" ({self._unlogged - 1} more since the last report)" if self._unlogged > 1 else ""
        self._last_log, self._unlogged = now, 0
        log.warning("event loop stalled %.0f ms%s%s", gap * 1000, more,
                    f"; it was running:\n{stack}" if stack else "")

    def _check(self) -> None:
        """In the thread: catch the loop while it is stuck, for the log."""
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with self._lock:
                now = time.monotonic()
                late = now - self._last_tick - HEARTBEAT_SECONDS
                if late < STALL_SECONDS or self._stack:
                    continue
                if now - self._last_log < LOG_INTERVAL and late <= self.stats.longest:
                    # Neither a report due nor a new longest stall: skip the
                    # stack (formatting it holds the GIL, and a saturated
                    # shard is late at every beat).
                    continue
                frame = sys._current_frames().get(self._loop_thread)
                if frame is not None:
                    self._stack = "".join(traceback.format_stack(frame, limit=STACK_FRAMES))


def _innermost(stack: str) -> str:
    """'file:line in function' of the innermost frame of a formatted stack."""
    frames = [line.strip() for line in stack.splitlines() if line.strip().startswith("File ")]
    if not frames:
        return ""
    # 'File "/path/x.py", line 12, in name' -> 'x.py:12 in name'
    parts = frames[-1].split('"')
    if len(parts) < 3:
        return frames[-1]
    where, rest = parts[1].rsplit("/", 1)[-1], parts[2]
    line, _, function = rest.removeprefix(", line ").partition(", in ")
    return f"{where}:{line} in {function}"
