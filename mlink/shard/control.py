"""JSON lines between the supervisor and its shards, and between
`mlink status` and the supervisor.

Why JSON lines and not bus frames: this channel carries a handful of small
messages a minute (ready, stats), is read by people when debugging, and
must work while the bus is down (that is when status matters most).
"""

from __future__ import annotations

import json
from typing import Any

import trio

# The longest control message accepted: a stats reply lists one line of
# counters per peer shard, a few KiB even with a hundred shards. A longer
# line is a bug or a stray writer, and is refused rather than buffered.
MAX_CONTROL_LINE = 1024 * 1024
# Bytes per receive on a control stream.
_RECEIVE_BYTES = 64 * 1024


class ControlError(Exception):
    """The other end sent something that is not a control message."""


class LineChannel:
    """One JSON object per line over a trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        # Two tasks may answer at once (ready, a stats reply); lines must
        # not interleave.
        async with self._send_lock:
            await self.stream.send_all(data)

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None at end of stream."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                try:
                    message = json.loads(line)
                except ValueError as exc:
                    raise ControlError(f"not JSON: {exc}") from None
                if not isinstance(message, dict):
                    raise ControlError("not a JSON object")
                return message
            if len(self._buffer) > MAX_CONTROL_LINE:
                raise ControlError(f"control line longer than {MAX_CONTROL_LINE} bytes")
            data = await self.stream.receive_some(_RECEIVE_BYTES)
            if not data:
                return None
            self._buffer += data

    async def aclose(self) -> None:
        await self.stream.aclose()


def find_oserror(exc: BaseException) -> OSError | None:
    """The OSError inside `exc` (Trio wraps a task's failure in exception
    groups), so a start-up failure such as a port in use can be reported as
    one line instead of a traceback."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := find_oserror(inner)) is not None:
                return found
    return None
