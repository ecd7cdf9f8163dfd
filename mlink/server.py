"""One server process: listeners, sessions, router, directory, modules.

`Server.serve()` is what a shard runs inside its own `trio.run`.
"""

from __future__ import annotations

import errno
import logging
import socket
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from mlink.config_model import Config, ListenerConfig
from mlink.directory import open_directory
from mlink.directory.base import Directory, DirectoryUnavailable
from mlink.hooks import Hooks, NonzaEvent
from mlink.jid import JID
from mlink.module import BusHandler, FeatureProvider
from mlink.modules import load_modules
from mlink.router.router import Router
from mlink.router.sessions import SessionInfo, SessionTable
from mlink.sasl.mock_key import load_mock_salt_key
from mlink.sasl.registry import (
    PASSWORD,
    SCRAM_SECRET,
    UNAVAILABLE,
    CredentialSource,
    MechanismProvider,
    NeedCredential,
    SaslRegistry,
    builtin_providers,
)
from mlink.store import DEFAULT_FILENAME, Store
from mlink.store.module_store import ModuleStore
from mlink.stream.c2s import StreamSettings

if TYPE_CHECKING:
    from mlink.shard.bus import Bus
from mlink.transport.accept import AcceptLoop
from mlink.transport.client import ClientConnection
from mlink.transport.tls import ServerTLS
from mlink.transport.websocket import WebSocketEndpoint
from mlink.util.heaptrim import HeapTrimmer
from mlink.util.watchdog import LoopWatchdog

log = logging.getLogger(__name__)

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
        self.background_tasks: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        # Cache name -> drop the named user's cached copy (see `changed`).
        self.cache_invalidators: dict[str, Callable[[str], None]] = {}
        # Services modules share (`Module.shared`), by name.
        self.shared_services: dict[str, Any] = {}
        self._module_stores: dict[str, ModuleStore] = {}
        # Module bus channels ("<module>/<name>") -> handler (`Module.on_bus`).
        self.bus_handlers: dict[str, BusHandler] = {}
        # What modules add to <stream:features>: (provider, after authentication).
        self.stream_feature_providers: list[tuple[FeatureProvider, bool]] = []
        # The nursery `serve` runs everything in, once it runs: modules'
        # tasks spawned later start there too (set before modules load).
        self._nursery: trio.Nursery | None = None
        self.sasl = SaslRegistry()
        for provider in builtin_providers():
            self.sasl.add_mechanism(provider)
        self.sasl.add_credential_source(PASSWORD, self._check_password)
        self.sasl.add_credential_source(SCRAM_SECRET, self._scram_secret)
        self.mock_salt_key = load_mock_salt_key(config.data_dir)
        # Namespaces of nonzas modules handle on established streams.
        self.nonza_namespaces: set[str] = set()
        self.modules = load_modules(self, config.modules)
        self.connections: set[ClientConnection] = set()
        self._no_connections = trio.Event()
        self._no_connections.set()
        self.bound_ports: dict[str, int] = {}
        self.accept_loops: list[AcceptLoop] = []
        self.watchdog = LoopWatchdog()
        # Returns the heap pages that logged-out connections freed (see
        # mlink/util/heaptrim.py: without it RSS grew with every cycle).
        self.heap_trimmer = HeapTrimmer()

    # -- the built-in credential sources (SASL PLAIN and SCRAM) --------------------

    async def _check_password(self, jid: str, request: NeedCredential) -> object:
        try:
            return await self.directory.check_password(jid, request.detail["password"])
        except DirectoryUnavailable as exc:
            log.warning("directory unavailable while authenticating %s: %s", jid, exc)
            return UNAVAILABLE

    async def _scram_secret(self, jid: str, request: NeedCredential) -> object:
        try:
            return await self.directory.scram_secret(jid, request.detail["mechanism"])
        except DirectoryUnavailable as exc:
            log.warning("directory unavailable while authenticating %s: %s", jid, exc)
            return UNAVAILABLE

    async def nonza_received(self, info: SessionInfo, element: ET.Element) -> None:
        """A module's nonza from an established stream: its handler runs
        like a stanza's, isolated from the stream on a crash."""
        namespace = element.tag[1:].partition("}")[0]
        try:
            with self.router.batch():
                await self.hooks.fire(f"nonza/{namespace}", NonzaEvent(info, element))
        except Exception:
            log.exception("nonza handler failed: %s from %s", element.tag, info.jid)

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

    def detach_session(self, conn: ClientConnection) -> bool:
        """Take `conn` out of the session table here and on every shard, at
        once (it is ending): stanzas for it now take the "no such resource"
        path instead of vanishing into a closing connection. False when it
        was not (or no longer) bound."""
        if not self.sessions.unbind(conn):
            return False
        if self.router.cluster is not None:
            self.router.cluster.announce_down(conn.info)
        return True

    async def session_ended(self, conn: ClientConnection) -> None:
        """Announce the end of a bound session once (unavailable presence
        and the like), even while the connection's task is being cancelled."""
        if conn.ended:
            return
        conn.ended = True
        self.detach_session(conn)
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

    # -- ModuleHost (mlink.module): what modules reach through their context --------

    def spawn_background(self, name: str, task: Callable[[], Awaitable[None]]) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._run_background, name, task)
        else:
            self.background_tasks.append((name, task))

    def shared_service(self, name: str, factory: Callable[[], Any]) -> Any:
        if name not in self.shared_services:
            self.shared_services[name] = factory()
        return self.shared_services[name]

    def module_store(self, module: str) -> ModuleStore:
        found = self._module_stores.get(module)
        if found is None:
            found = self._module_stores[module] = ModuleStore(lambda: self.store, module)
        return found

    def bus_subscribe(self, channel: str, handler: BusHandler) -> None:
        self.bus_handlers[channel] = handler

    def bus_send(self, channel: str, payload: bytes, shard: int | None = None) -> None:
        if self.router.cluster is not None:
            self.router.cluster.send_module(channel, payload, shard)

    def owner(self, key: str) -> int:
        cluster = self.router.cluster
        return cluster.owner(key) if cluster is not None else 0

    @property
    def shard(self) -> int:
        cluster = self.router.cluster
        return cluster.shard if cluster is not None else 0

    def add_stream_feature(self, provider: FeatureProvider, authenticated: bool) -> None:
        self.stream_feature_providers.append((provider, authenticated))

    def add_sasl_mechanism(self, provider: MechanismProvider) -> None:
        self.sasl.add_mechanism(provider)

    def add_credential_source(self, kind: str, source: CredentialSource) -> None:
        self.sasl.add_credential_source(kind, source)

    def register_cache(self, name: str, invalidate: Callable[[str], None]) -> Callable[[str], None]:
        """Register a per-user cache under `name`; returns `changed(user)`,
        which makes the other shards drop their copies of `user`'s entry."""
        self.cache_invalidators[name] = invalidate
        return lambda user: self.changed(user, name)

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
            feature_providers=tuple(self.stream_feature_providers),
            sasl=self.sasl,
            nonza_namespaces=frozenset(self.nonza_namespaces),
            mock_salt_key=self.mock_salt_key,
            websocket=websocket,
        )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on every configured listener until cancelled."""
        if self.store is None:
            self.store = await Store.open(self.config.data_dir / STORE_FILE)
        for module_store in self._module_stores.values():
            await module_store.migrate()
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
                loop = AcceptLoop(listener, handler)
                self.accept_loops.append(loop)
                nursery.start_soon(self._serve_listener, loop)
            for name, task in self.background_tasks:
                nursery.start_soon(self._run_background, name, task)
            nursery.start_soon(self.watchdog.run)
            nursery.start_soon(self.heap_trimmer.run)
            self._nursery = nursery
            task_status.started()

    async def _run_background(self, name: str, task: Callable[[], Awaitable[None]]) -> None:
        """A module's background task: its crash is logged, and the rest of
        the server (every other module and connection) keeps running."""
        try:
            await task()
        except Exception:
            log.exception("background task of module %s crashed", name)

    async def _serve_listener(self, loop: AcceptLoop) -> None:
        async with trio.open_nursery() as connections:
            await loop.run(connections)

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
            self.heap_trimmer.connection_closed()
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
