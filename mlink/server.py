"""One server process: listeners, sessions, router, directory, modules.

`Server.serve()` is what a shard runs inside its own `trio.run`.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING

import trio

from mlink.config_model import Config, ListenerConfig
from mlink.directory import open_directory
from mlink.directory.base import Directory, DirectoryUnavailable
from mlink.hooks import Hooks
from mlink.jid import JID
from mlink.modules import load_modules
from mlink.router.rosters import RosterCache, rosters_of
from mlink.router.router import Router
from mlink.router.sessions import SessionTable
from mlink.store import DEFAULT_FILENAME, Store
from mlink.stream.c2s import StreamSettings

if TYPE_CHECKING:
    from mlink.shard.bus import Bus
from mlink.transport.client import ClientConnection
from mlink.transport.tls import ServerTLS
from mlink.transport.websocket import WebSocketEndpoint

log = logging.getLogger("mlink.server")

# Pending connections the kernel queues per listener: enough for a login
# storm from a benchmark or a reconnecting fleet of clients.
LISTEN_BACKLOG = 1024
STORE_FILE = DEFAULT_FILENAME
# On shutdown, how long sessions get to flush their closing tags.
SHUTDOWN_GRACE = 5.0
# Listener kinds served as HTTP (RFC 7395 WebSocket, XEP-0156 host-meta).
WEBSOCKET_KINDS = ("websocket", "websocket-tls")
# Listener kinds that need the configured certificate.
TLS_KINDS = ("tls", "websocket-tls")


class Server:
    def __init__(self, config: Config, directory: Directory | None = None) -> None:
        self.config = config
        self.domains = frozenset(config.domains)
        self.directory = directory if directory is not None else open_directory(config.directory)
        tls_cfg = config.tls
        self.tls = (
            ServerTLS(tls_cfg.certificate, tls_cfg.key)
            if tls_cfg.certificate is not None and tls_cfg.key is not None
            else None
        )
        self.sessions = SessionTable()
        self.hooks = Hooks()
        self.router = Router(self.domains, self.sessions, self.hooks, self._account_exists)
        # Opened by `serve` (or by tests) before any client is accepted.
        self.store: Store = None  # type: ignore[assignment]
        # Long-running work of modules (e.g. refreshing directory groups),
        # run in the server's nursery while it serves: owned, never orphaned.
        self.background_tasks: list[Callable[[], Awaitable[None]]] = []
        # Cache name -> drop the named user's cached copy (see `changed`).
        self.cache_invalidators: dict[str, Callable[[str], None]] = {}
        self.rosters: RosterCache = rosters_of(self)
        load_modules(self)
        self.connections: set[ClientConnection] = set()
        self._no_connections = trio.Event()
        self._no_connections.set()
        self.bound_ports: dict[str, int] = {}

    async def _account_exists(self, bare: JID) -> bool:
        try:
            return await self.directory.user_exists(str(bare))
        except DirectoryUnavailable:
            # Cannot tell: answer as for a missing account, which leaks
            # nothing and keeps the stanza from being stored for nobody.
            return False

    async def bind_session(self, conn: ClientConnection, bare: JID, resource: str | None) -> JID:
        """Bind `conn`, ending a session that holds the same full JID."""
        old = self.sessions.replaced(bare, resource)
        if old is not None:
            old.kick("conflict", "replaced by a new session with the same resource")
            await self.session_ended(old)  # type: ignore[arg-type]
        full = self.sessions.bind(conn, bare, resource)
        cluster = self.router.cluster
        if cluster is not None:
            cluster.replace_remote(full)  # the same full JID on another shard
            cluster.announce(conn.info)
        with self.router.batch():
            await self.hooks.notify("session/bound", conn.info)
        return full

    async def session_ended(self, conn: ClientConnection) -> None:
        """Announce the end of a bound session once (unavailable presence
        and the like), even while the connection's task is being cancelled."""
        if not self.sessions.unbind(conn):
            return
        if self.router.cluster is not None:
            self.router.cluster.announce_down(conn.info)
        with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_GRACE):
            try:
                with self.router.batch():
                    await self.hooks.notify("session/closed", conn.info)
            except Exception:
                log.exception("session/closed handler failed for %s", conn.info.jid)

    def attach_bus(self, bus: Bus) -> None:
        """Become one shard of several: route through `bus` to the others."""
        from mlink.shard.cluster import Cluster

        self.router.cluster = Cluster(self, bus)

    def changed(self, user: str, what: str) -> None:
        """`user`'s durable `what` ("roster", "blocklist") was written: other
        shards drop their cached copies (a no-op in one process)."""
        if self.router.cluster is not None:
            self.router.cluster.invalidate(user, what)

    def stream_settings(self, tls_active: bool, websocket: bool = False) -> StreamSettings:
        """Settings for a new c2s stream; `websocket` selects RFC 7395 framing."""
        limits = self.config.limits
        return StreamSettings(
            domains=self.domains,
            tls_available=self.tls is not None,
            tls_required=self.config.tls.required,
            tls_active=tls_active,
            max_stanza_bytes=limits.max_stanza_bytes,
            max_depth=limits.max_depth,
            extra_features=b"".join(self.hooks.stream_features),
            session_features=b"".join(self.hooks.session_features),
            websocket=websocket,
        )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on every configured listener until cancelled."""
        if self.store is None:
            self.store = await Store.open(self.config.data_dir / STORE_FILE)
        async with trio.open_nursery() as nursery:
            for lc in self.config.listeners:
                if lc.kind in TLS_KINDS and self.tls is None:
                    log.warning(
                        "%s listener on port %d needs a certificate; skipped", lc.kind, lc.port
                    )
                    continue
                handler: Callable[[trio.SocketStream], Awaitable[None]]
                if lc.kind in WEBSOCKET_KINDS:
                    handler = WebSocketEndpoint(self, secure=lc.kind == "websocket-tls").handle
                else:
                    handler = partial(self._handle, direct_tls=lc.kind == "tls")
                listener = await open_reuseport_listener(lc)
                port = listener.socket.getsockname()[1]
                self.bound_ports[lc.kind] = port
                log.info("listening for %s (%s) on %s port %d", lc.kind, _describe(lc.kind),
                         lc.address, port)
                nursery.start_soon(self._accept_loop, listener, handler)
            for task in self.background_tasks:
                nursery.start_soon(task)
            task_status.started()

    async def _accept_loop(
        self,
        listener: trio.SocketListener,
        handler: Callable[[trio.SocketStream], Awaitable[None]],
    ) -> None:
        async with listener, trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # EMFILE and friends: log, back off, keep serving.
                    log.warning("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(handler, stream)

    async def _handle(self, stream: trio.SocketStream, direct_tls: bool) -> None:
        await self.run_connection(ClientConnection(self, stream, direct_tls))

    async def run_connection(self, conn: ClientConnection) -> None:
        """Run `conn` to its end, known to `shutdown` meanwhile (TCP and
        WebSocket connections alike)."""
        self.connections.add(conn)
        if self._no_connections.is_set():
            self._no_connections = trio.Event()
        try:
            await conn.run()
        except Exception:
            log.exception("connection handler crashed")
        finally:
            self.connections.discard(conn)
            if not self.connections:
                self._no_connections.set()

    async def shutdown(self) -> None:
        """End every stream with `system-shutdown` and let them flush."""
        for conn in list(self.connections):
            conn.kick("system-shutdown", "the server is stopping")
        with trio.move_on_after(SHUTDOWN_GRACE):
            await self._no_connections.wait()
        await self.directory.aclose()
        if self.store is not None:
            await self.store.aclose()


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


def _describe(kind: str) -> str:
    return {
        "c2s": "clients, STARTTLS",
        "tls": "clients, direct TLS",
        "websocket": "clients, XMPP over WebSocket and host-meta, HTTP",
        "websocket-tls": "clients, XMPP over WebSocket and host-meta, HTTPS",
    }.get(kind, kind)
