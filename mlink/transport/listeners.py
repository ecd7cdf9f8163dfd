"""The client listeners one shard has open, changed in place by a reload.

Why a set of its own: a reload must open the listeners a new `<listen>`
adds and close the ones it removes without touching the others, and
without cutting a connection already accepted on a closed one. Opening is
split from committing so that the reload can bind every new socket first
(the one step that fails: a port in use, a privileged port) and give up
with nothing changed; committing cannot fail.

A listener is identified by its whole `<listen>` (type, address, port):
one whose type or port changed is closed and another opened. Each shard
binds its own socket with SO_REUSEPORT, as at start.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from mlink.config_model import ListenerConfig
from mlink.transport.accept import AcceptLoop

log = logging.getLogger(__name__)

# Pending connections the kernel queues per listener: enough for a login
# storm from a benchmark or a reconnecting fleet of clients.
LISTEN_BACKLOG = 1024


class ListenerError(OSError):
    """A listener that cannot be opened; the message is one line naming it."""


async def open_reuseport_listener(lc: ListenerConfig) -> trio.SocketListener:
    """A listening socket with SO_REUSEPORT, so every shard can bind it
    (trio.open_tcp_listeners does not set it: trio issue #281)."""
    family = socket.AF_INET6 if ":" in lc.address else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            await sock.bind((lc.address, lc.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(exc.errno, f"port {lc.port} on {lc.address} is in use") from None
            raise
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def describe(lc: ListenerConfig, port: int | None = None) -> str:
    """`c2s on 127.0.0.1 port 5222`: how logs and `mlink reload` name it."""
    return f"{lc.kind} on {lc.address} port {lc.port if port is None else port}"


@dataclass
class OpenListener:
    config: ListenerConfig
    loop: AcceptLoop
    port: int  # the bound port (the kernel's choice for port 0)


@dataclass
class ListenerChange:
    """What `ListenerSet.prepare` bound and what `commit` will close."""

    wanted: list[ListenerConfig]
    opened: list[tuple[ListenerConfig, trio.SocketListener]] = field(default_factory=list)
    removed: list[ListenerConfig] = field(default_factory=list)


class ListenerSet:
    """The open client listeners, by their `<listen>`. `make_loop` builds
    the accept loop of a bound socket; `serve` runs one in the server's
    nursery (each in a nursery of its own connections)."""

    def __init__(self, make_loop: Callable[[ListenerConfig, trio.SocketListener], AcceptLoop],
                 serve: Callable[[AcceptLoop], Awaitable[None]]) -> None:
        self.make_loop = make_loop
        self.serve = serve
        self.open: dict[ListenerConfig, OpenListener] = {}

    async def prepare(self, wanted: Sequence[ListenerConfig]) -> ListenerChange:
        """Bind what `wanted` adds; ListenerError (one line), with every
        socket it bound closed again, when one cannot be."""
        change = ListenerChange(list(dict.fromkeys(wanted)))
        keep = set(change.wanted)
        change.removed = [lc for lc in self.open if lc not in keep]
        try:
            for lc in change.wanted:
                if lc in self.open:
                    continue
                try:
                    change.opened.append((lc, await open_reuseport_listener(lc)))
                except OSError as exc:
                    reason = ("the port is in use" if exc.errno == errno.EADDRINUSE
                              else exc.strerror or str(exc))
                    raise ListenerError(exc.errno, f"cannot listen for {describe(lc)}: "
                                                   f"{reason}") from None
        except BaseException:
            self.abort(change)
            raise
        return change

    def abort(self, change: ListenerChange) -> None:
        """Give up a prepared change: close what it bound."""
        for _, listener in change.opened:
            listener.socket.close()
        change.opened = []

    def commit(self, change: ListenerChange, nursery: trio.Nursery) -> list[str]:
        """Close the removed listeners (connections accepted on them stay),
        start accepting on the new ones; one line for each, as logged."""
        done = []
        for lc in change.removed:
            gone = self.open.pop(lc)
            gone.loop.close()
            line = f"stopped listening for {describe(lc, gone.port)}"
            log.info("%s (established connections stay)", line)
            done.append(line)
        for lc, listener in change.opened:
            port = listener.socket.getsockname()[1]
            loop = self.make_loop(lc, listener)
            self.open[lc] = OpenListener(lc, loop, port)
            nursery.start_soon(self.serve, loop)
            line = f"listening for {describe(lc, port)}"
            done.append(line)
        # In the configuration's order, as `ports` reads them.
        self.open = {lc: self.open[lc] for lc in change.wanted if lc in self.open}
        change.opened = []
        return done

    def ports(self) -> dict[str, int]:
        """The bound port of each listener type (the last of a type wins,
        as at start)."""
        return {lc.kind: one.port for lc, one in self.open.items()}

    def listing(self) -> list[str]:
        """`c2s 0.0.0.0:5222` for each open listener, for `mlink status`."""
        return [f"{lc.kind} {lc.address}:{one.port}" for lc, one in self.open.items()]
