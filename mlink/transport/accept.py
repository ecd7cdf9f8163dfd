"""Accept loops that name the errors they tolerate, as trio.serve_listeners does.

Why: `accept()` fails for two kinds of reason. Resource exhaustion (no file
descriptors, no buffer memory) is temporary and must not end the listener:
back off and keep serving, logging once per interval rather than per
attempt (a thousand idle sockets must not write ten lines a second). A
connection aborted before we took it is the peer's business. Anything else
is a bug or a closed listener and is raised, not swallowed.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

# Out of descriptors or kernel memory: wait for connections to end.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# The peer gave up between SYN and accept: nothing to do.
PEER_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
# How long to wait after running out of resources: long enough for some
# connections to end, short enough that a login storm hardly notices
# (trio.serve_listeners uses the same 100 ms).
ACCEPT_BACKOFF_SECONDS = 0.1
# At most one log line per this interval about exhausted resources.
ACCEPT_LOG_INTERVAL = 10.0


class AcceptLoop:
    """Accepts on one listener and hands each stream to `handler` in the
    given nursery; counts what it tolerated (for `mlink status`)."""

    def __init__(self, listener: trio.SocketListener,
                 handler: Callable[[trio.SocketStream], Awaitable[None]],
                 kind: str = "") -> None:
        self.listener = listener
        self.handler = handler
        self.kind = kind  # the listener type (`c2s`, `component`...), for status
        self.exhausted = 0  # accepts refused for lack of resources
        self._last_log = float("-inf")
        self._unlogged = 0
        # Cancelled by `close`: ends the accepting, not the nursery the
        # accepted connections run in, so they stay up.
        self._scope = trio.CancelScope()

    def close(self) -> None:
        """Stop accepting and close the socket (a reload removed the
        listener); connections accepted already carry on."""
        self._scope.cancel()

    async def run(self, nursery: trio.Nursery) -> None:
        with self._scope:
            await self._accept(nursery)

    async def _accept(self, nursery: trio.Nursery) -> None:
        async with self.listener:
            while True:
                try:
                    stream = await self.listener.accept()
                except OSError as exc:
                    if exc.errno in PEER_ERRNOS:
                        continue
                    if exc.errno not in RESOURCE_ERRNOS:
                        raise
                    self._note_exhausted(exc)
                    await trio.sleep(ACCEPT_BACKOFF_SECONDS)
                    continue
                nursery.start_soon(self.handler, stream)

    def _note_exhausted(self, exc: OSError) -> None:
        self.exhausted += 1
        self._unlogged += 1
        now = trio.current_time()
        if now - self._last_log >= ACCEPT_LOG_INTERVAL:
            log.warning("accept failed %d time(s) in the last %.0f s: %s; backing off",
                        self._unlogged, ACCEPT_LOG_INTERVAL, exc.strerror or exc)
            self._last_log = now
            self._unlogged = 0
