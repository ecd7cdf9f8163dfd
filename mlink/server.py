"""One server process: listeners, sessions, router, directory, modules.

`Server.serve()` is what a shard runs inside its own `trio.run`.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from mlink.config_model import Config, ListenerConfig
from mlink.directory import open_directory
from mlink.directory.base import Directory, DirectoryError, DirectoryUnavailable
from mlink.hooks import Hooks, NonzaEvent
from mlink.jid import JID, InvalidJID, parse_jid
from mlink.jid import cache_size as jid_cache_size
from mlink.jid import set_cache_size as set_jid_cache_size
from mlink.module import BusHandler, FeatureProvider, HTTPHandler
from mlink.modules import load_modules
from mlink.router.components import ComponentTable
from mlink.router.router import Router
from mlink.router.sessions import SessionInfo, SessionTable, StreamControl
from mlink.sasl.mock_key import load_mock_salt_key
from mlink.sasl.registry import (
    PASSWORD,
    SCRAM_SECRET,
    UNAVAILABLE,
    CredentialAnswer,
    CredentialSource,
    MechanismProvider,
    NeedCredential,
    SaslRegistry,
    builtin_providers,
)
from mlink.store import DEFAULT_FILENAME, Store
from mlink.store.module_store import ModuleStore
from mlink.stream.c2s import ID_BYTES, StreamSettings
from mlink.stream.framing import TCPFraming

if TYPE_CHECKING:
    from mlink.shard.bus import Bus
from mlink.transport.accept import AcceptLoop
from mlink.transport.client import CONNECTION_SLOT, BindRefused, ClientConnection
from mlink.transport.component import ComponentConnection
from mlink.transport.limits import AuthThrottle, ConnectionLimiter, ConnectionSlot
from mlink.transport.listeners import (
    ListenerChange,
    ListenerError,
    ListenerSet,
    open_reuseport_listener,
)
from mlink.transport.tls import ServerTLS
from mlink.transport.websocket import WebSocketEndpoint
from mlink.util.counters import ShardCounters
from mlink.util.heaptrim import HeapTrimmer
from mlink.util.watchdog import LoopWatchdog
from mlink.xml.serialize import WireStanza

log = logging.getLogger(__name__)

STORE_FILE = DEFAULT_FILENAME
# On shutdown, how long sessions get to flush their closing tags.
SHUTDOWN_GRACE = 5.0
# Listener kinds served as HTTP (RFC 7395 WebSocket, XEP-0156 host-meta).
WEBSOCKET_KINDS = ("websocket", "websocket-tls")
# Listener kinds that need the configured certificate.
TLS_KINDS = ("tls", "websocket-tls")
# A connection refused at accept gets this long to take its stream error.
REFUSAL_SEND_TIMEOUT = 1.0
# How long start-up waits for the directory's first answer (see
# `_warm_directory`): long enough for a large embedded file or a slow LDAP
# bind, short enough that a directory that is down does not hold the start.
DIRECTORY_WARM_SECONDS = 10.0


class Server:
    def __init__(self, config: Config, directory: Directory | None = None) -> None:
        self.config = config
        self.domains = frozenset(config.domains)
        self.directory = directory if directory is not None else open_directory(config.directory)
        tls_cfg = config.tls
        self.tls = (
            ServerTLS(tls_cfg.certificate, tls_cfg.key, tls_cfg.client_cas)
            if tls_cfg.certificate is not None and tls_cfg.key is not None
            else None
        )
        # CA certificates (DER) modules added to the client CAs (from the
        # directory): kept so that a reload's new TLS context has them too.
        self.module_client_cas: list[bytes] = []
        self.sessions = SessionTable()
        self.hooks = Hooks()
        self.router = Router(self.domains, self.sessions, self.hooks, self._account_exists)
        # External components (XEP-0114): their domains, where they are connected.
        self.components = ComponentTable(
            self.router, self.hooks, [c.name for c in config.components.components])
        self.component_connections: set[ComponentConnection] = set()
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
        # Stanzas of ended sessions waiting to be routed again (`reroute_later`),
        # in order, with the session they were for; one task routes them all.
        self._reroute: deque[tuple[JID, list[ET.Element | WireStanza]]] = deque()
        self._reroute_wake = trio.Event()
        self._rerouted_all = trio.Event()
        self._rerouted_all.set()
        self._rerouting = False
        set_jid_cache_size(config.caches.jids)
        self.sasl = SaslRegistry()
        for provider in builtin_providers():
            self.sasl.add_mechanism(provider)
        self.sasl.add_credential_source(PASSWORD, self._check_password)
        self.sasl.add_credential_source(SCRAM_SECRET, self._scram_secret)
        self.mock_salt_key = load_mock_salt_key(config.data_dir)
        # Namespaces of nonzas modules handle on established streams.
        self.nonza_namespaces: set[str] = set()
        # Path prefix -> a module's handler, on the HTTP listeners.
        self.http_handlers: dict[str, HTTPHandler] = {}
        self.modules = load_modules(self, config.modules)
        self.connections: set[ClientConnection] = set()
        self._no_connections = trio.Event()
        self._no_connections.set()
        self.bound_ports: dict[str, int] = {}
        self.accept_loops: list[AcceptLoop] = []
        # The client listeners (<listen>), opened at start and changed by a
        # reload (`prepare_listeners`, `commit_listeners`).
        self.listeners = ListenerSet(self._listener_loop, self._serve_listener)
        self.watchdog = LoopWatchdog()
        # Stanzas and logins by kind, for the console's /metrics.
        self.counters = ShardCounters()
        # Returns the heap pages that logged-out connections freed (see
        # mlink/util/heaptrim.py: without it RSS grew with every cycle).
        self.heap_trimmer = HeapTrimmer()
        # Per-shard abuse limits (mlink.transport.limits, docs/security.md).
        limits = config.limits
        self.connection_limiter = ConnectionLimiter(
            limits.connections_per_address, limits.unauthenticated_per_address,
            limits.exempt_loopback)
        self.auth_throttle = AuthThrottle(limits.auth_free_failures, limits.auth_max_delay,
                                          limits.auth_forget_seconds)
        self.apply_limits()

    def apply_limits(self) -> None:
        """Make the limiters follow `self.config` (at start and on reload),
        keeping what they have counted."""
        limits = self.config.limits
        limiter = self.connection_limiter
        limiter.per_address = limits.connections_per_address
        limiter.unauthenticated_limit = limits.unauthenticated_per_address
        limiter.loopback_exempt = limits.exempt_loopback
        # Proxies carry many clients each: never counted as one address.
        limiter.trusted = tuple(ipaddress.ip_network(p, strict=False)
                                for p in self.config.websocket.trusted_proxies)
        throttle = self.auth_throttle
        throttle.free_failures = limits.auth_free_failures
        throttle.max_delay = limits.auth_max_delay
        throttle.forget = throttle.addresses.forget = throttle.accounts.forget = \
            limits.auth_forget_seconds

    # -- the built-in credential sources (SASL PLAIN and SCRAM) --------------------

    async def _check_password(self, jid: str, request: NeedCredential) -> object:
        password = request.detail["password"]
        try:
            with self.counters.timed("password-login"):
                ok, verdict = await self.directory.password_login(jid, password)
        except DirectoryUnavailable as exc:
            log.warning("directory unavailable while authenticating %s: %s", jid, exc)
            return UNAVAILABLE
        if verdict.condition is not None:
            # The directory said why (its ppolicy control): tell the user.
            return CredentialAnswer(True, (verdict.condition, verdict.text))
        if ok and verdict.notice:
            self.spawn_background("refresh-credentials",
                                  partial(self._refresh_credentials, jid, password))
            return CredentialAnswer(True, None, verdict.notice)
        if ok:
            # The directory just confirmed this is the current password:
            # rehash an outdated userPassword (embedded), and if the SCRAM
            # secrets are missing or stale (the password was changed
            # elsewhere) derive fresh ones, off the login's path.
            self.spawn_background("refresh-credentials",
                                  partial(self._refresh_credentials, jid, password))
        return ok

    async def _refresh_credentials(self, jid: str, password: str) -> None:
        try:
            await self.directory.refresh_credentials(jid, password)
        except DirectoryError as exc:
            log.warning("stored credentials of %s not refreshed: %s", jid, exc)

    async def _scram_secret(self, jid: str, request: NeedCredential) -> object:
        """The secret, with the directory's verdict (locked, expired) held
        back until the client has proved its password."""
        try:
            with self.counters.timed("scram-login"):
                login = await self.directory.scram_login(jid, request.detail["mechanism"])
        except DirectoryUnavailable as exc:
            log.warning("directory unavailable while authenticating %s: %s", jid, exc)
            return UNAVAILABLE
        verdict = login.verdict
        if verdict.condition == "not-authorized" or login.secret is None:
            return None  # fails at the proof, like a wrong password
        refusal = (verdict.condition, verdict.text) if verdict.condition else None
        return CredentialAnswer(login.secret, refusal, verdict.notice)

    async def auth_failed(self, jid: str | None, mechanism: str | None, condition: str,
                          counted: bool) -> None:
        """A failed SASL attempt: a wrong SCRAM proof against the user's
        real secret counts in the directory, so its lockout (ppolicy)
        applies as it does to binds. A user whose secrets are missing or
        stale is not counted: the password may well have been right."""
        if jid is None or condition != "not-authorized" or mechanism is None or not counted:
            return
        if mechanism.startswith("SCRAM-"):
            try:
                await self.directory.record_failure(jid)
            except DirectoryUnavailable as exc:
                log.warning("failed login of %s not recorded in the directory: %s", jid, exc)

    async def nonza_received(self, info: SessionInfo, element: ET.Element,
                             stream: StreamControl | None = None) -> None:
        """A module's nonza from an authenticated stream: its handler runs
        like a stanza's, isolated from the stream on a crash."""
        namespace = element.tag[1:].partition("}")[0]
        try:
            with self.router.batch():
                await self.hooks.fire(f"nonza/{namespace}", NonzaEvent(info, element, stream))
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
        """Bind `conn`, ending a session that holds the same full JID;
        BindRefused when the account has all the resources it may have."""
        old = self.sessions.replaced(bare, resource)
        most = self.config.limits.max_resources
        if old is None and most and len(self.router.resources(bare)) >= most:
            # RFC 6120 §7.6.2.1: "the account has reached a limit on the
            # number of simultaneous connected resources allowed".
            raise BindRefused("resource-constraint",
                              f"resource limit reached: at most {most} resources")
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

    def adopt_session(self, conn: ClientConnection, info: SessionInfo) -> None:
        """`conn` carries on the existing session `info` (resumed by a
        module after it left the table): bound here, announced everywhere."""
        cluster = self.router.cluster
        if cluster is not None:
            cluster.drop_replica(info.jid)  # the shard it came from (no SESSION_DOWN)
        self.sessions.adopt(conn, info)
        if cluster is not None:
            cluster.announce(conn.info)

    def cache_sizes(self) -> dict[str, tuple[int, int]]:
        """(entries, bound) of each bounded cache, for `mlink status`."""
        sizes = {"jids": jid_cache_size()}
        for name, service in (("profiles", "profiles"), ("blocklists", "blocking/lists")):
            found = self.shared_services.get(service)
            size = getattr(found, "size", None)
            if size is not None:
                sizes[name] = size
        return sizes

    def end_user_sessions(self, jid: str, text: str) -> int:
        """End every local session of the account `jid` (deleted, disabled
        or locked in the directory) with `not-authorized` and `text`; how
        many."""
        try:
            bare = parse_jid(jid).bare
        except InvalidJID:
            return 0
        ended = 0
        for conn in self.sessions.of_user(bare):
            conn.kick("not-authorized", text)
            ended += 1
        if ended:
            log.info("ended %d session(s) of %s: %s", ended, bare, text)
        return ended

    async def account_removed(self, jid: str) -> None:
        """Fire `account/removed` for an account deleted through mlink
        (`mlink user delete`, the console), which an LDAP change feed
        cannot see: modules drop what they keep for it (uploads)."""
        try:
            bare = parse_jid(jid).bare
        except InvalidJID:
            return
        await self.hooks.notify("account/removed", str(bare))

    def session_list(self, user: str | None = None) -> list[dict[str, str]]:
        """This shard's bound sessions (of `user`, a bare JID, when given),
        for `mlink session list` and the console: full JID and address."""
        if user is not None:
            try:
                conns = self.sessions.of_user(parse_jid(user).bare)
            except InvalidJID:
                return []
        else:
            conns = self.sessions.all()
        return [{"jid": str(conn.info.jid), "address": str(getattr(conn, "peer", ""))}
                for conn in conns]

    def kick_sessions(self, jid: str, text: str) -> list[str]:
        """End the local session `jid` (a full JID) or every local session
        of `jid` (a bare JID) with `policy-violation` and `text`, as an
        administrator's kick; the full JIDs ended."""
        try:
            target = parse_jid(jid)
        except InvalidJID:
            return []
        if target.resource:
            found = self.sessions.get(target)
            conns = [found] if found is not None else []
        else:
            conns = self.sessions.of_user(target)
        ended = [str(conn.info.jid) for conn in conns]
        for conn in conns:
            conn.kick("policy-violation", text)
        if ended:
            log.info("kicked %s: %s", ", ".join(ended), text)
        return ended

    def detach_session(self, conn: ClientConnection, moving_to: int | None = None) -> bool:
        """Take `conn` out of the session table here and on every shard, at
        once (it is ending): stanzas for it now take the "no such resource"
        path instead of vanishing into a closing connection. False when it
        was not (or no longer) bound."""
        if not self.sessions.unbind(conn):
            return False
        cluster = self.router.cluster
        if cluster is not None:
            if moving_to is not None and moving_to != cluster.shard:
                # Resumed on that shard: not down anywhere, passed on there
                # until it says it has it (make before break).
                cluster.moved(conn.info, moving_to)
            else:
                cluster.announce_down(conn.info)
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

    async def reroute_later(self, jid: JID, stanzas: list[ET.Element | WireStanza]) -> None:
        """Route again, to the end, the stanzas a session ended without
        (RFC 6121 §8.5.3.2: another resource, offline storage, a bounce).
        The server's task does it, not the connection's, so no per-connection
        time limit cuts a long list short; only shutdown bounds it (and says
        how many were left). Without that task (tests), routed here."""
        if not stanzas:
            return
        if self._nursery is None or not self._rerouting:
            await self._reroute_batch(jid, stanzas)
            return
        self._reroute.append((jid, stanzas))
        if self._rerouted_all.is_set():  # one event per busy spell: shutdown may wait on it
            self._rerouted_all = trio.Event()
        self._reroute_wake.set()

    async def _rerouter(self) -> None:
        self._rerouting = True
        try:
            while True:
                while self._reroute:
                    jid, stanzas = self._reroute[0]
                    await self._reroute_batch(jid, stanzas)
                    self._reroute.popleft()
                self._rerouted_all.set()
                self._reroute_wake = trio.Event()
                await self._reroute_wake.wait()
        finally:
            self._rerouting = False

    async def _reroute_batch(self, jid: JID, stanzas: list[ET.Element | WireStanza]) -> None:
        done = 0
        try:
            for orphan in stanzas:
                try:
                    stanza = orphan.element() if isinstance(orphan, WireStanza) else orphan
                    await self.router.reroute(stanza)
                except Exception:
                    log.exception("routing a stanza of %s again failed", jid)
                done += 1
        finally:
            if done < len(stanzas):
                log.warning("%d of %d stanza(s) of %s not routed again", len(stanzas) - done,
                            len(stanzas), jid)
                del stanzas[:done]
            else:
                log.info("routed again the %d stanza(s) of %s", done, jid)

    def attach_bus(self, bus: Bus) -> None:
        """Become one shard of several: route through `bus` to the others."""
        from mlink.shard.cluster import Cluster

        cluster = self.router.cluster = Cluster(self, bus)
        self.components.attach(
            lambda channel, payload, shard: cluster.send_module(channel, payload, shard),
            self.bus_subscribe)

    # -- ModuleHost (mlink.module): what modules reach through their context --------

    def spawn_background(self, name: str, task: Callable[[], Awaitable[None]]) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._run_background, name, task)
        else:
            self.background_tasks.append((name, task))

    def add_http_handler(self, prefix: str, handler: HTTPHandler) -> None:
        if prefix in self.http_handlers:
            raise ValueError(f"HTTP prefix {prefix!r} is already served")
        self.http_handlers[prefix] = handler

    def http_handler(self, path: str) -> HTTPHandler | None:
        """The module handler for a request path, if one serves it."""
        for prefix, handler in self.http_handlers.items():
            if path.startswith(prefix):
                return handler
        return None

    def listener_port(self, kind: str) -> int | None:
        return self.bound_ports.get(kind)

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

    @property
    def shard_count(self) -> int:
        cluster = self.router.cluster
        return max(1, cluster.bus.shards) if cluster is not None else 1

    def add_stream_feature(self, provider: FeatureProvider, authenticated: bool) -> None:
        self.stream_feature_providers.append((provider, authenticated))

    def add_sasl_mechanism(self, provider: MechanismProvider) -> None:
        self.sasl.add_mechanism(provider)

    def add_credential_source(self, kind: str, source: CredentialSource) -> None:
        self.sasl.add_credential_source(kind, source)

    def trust_client_cas(self, certificates: Sequence[bytes]) -> None:
        """Client CAs supplied by a module: applied to the TLS context now,
        and again to each context a reload builds."""
        new = [der for der in certificates if der not in self.module_client_cas]
        self.module_client_cas.extend(new)
        if self.tls is not None:
            self.tls.trust_client_cas(new)

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
            max_auth_failures=limits.auth_failures_per_stream,
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
        await self._warm_directory()
        async with trio.open_nursery() as nursery:
            change = await self.prepare_listeners(self.config, self.tls)
            self.commit_listeners(change, nursery)
            if self.config.components.components:
                await self._listen_components(nursery)
            for name, task in self.background_tasks:
                nursery.start_soon(self._run_background, name, task)
            nursery.start_soon(self.watchdog.run)
            nursery.start_soon(self.heap_trimmer.run)
            nursery.start_soon(self._rerouter)
            self._nursery = nursery
            task_status.started()

    async def _warm_directory(self) -> None:
        """Reach the directory before the listeners open: the embedded one
        reads and indexes its file (a fraction of a second per thousand
        users, which the first logins would otherwise wait for, the loop
        starved meanwhile), LDAP opens its first connection. A directory
        that does not answer is logged; the server starts all the same
        (logins then get temporary-auth-failure until it answers)."""
        try:
            with trio.move_on_after(DIRECTORY_WARM_SECONDS):
                await self.directory.ping()
        except DirectoryError as exc:
            log.warning("directory not reachable at start: %s", exc)

    async def prepare_listeners(self, config: Config, tls: ServerTLS | None) -> ListenerChange:
        """Bind the listeners `config` adds to those open (all of them at
        start); ListenerError, one line, with nothing bound, when one
        cannot be. A TLS listener without a certificate is skipped (and
        opens on the reload that brings one)."""
        wanted = []
        for lc in config.listeners:
            if lc.kind in TLS_KINDS and tls is None:
                log.warning("%s listener on port %d needs a certificate; skipped",
                            lc.kind, lc.port)
                continue
            wanted.append(lc)
        return await self.listeners.prepare(wanted)

    def commit_listeners(self, change: ListenerChange,
                         nursery: trio.Nursery | None = None) -> list[str]:
        """Apply a prepared change: new listeners accept, removed ones
        close (their established connections stay); what was done."""
        nursery = nursery or self._nursery
        if nursery is None:
            self.listeners.abort(change)
            raise ListenerError("the server is not serving")
        done = self.listeners.commit(change, nursery)
        component = self.bound_ports.get("component")
        self.bound_ports.clear()
        self.bound_ports.update(self.listeners.ports())
        if component is not None:
            self.bound_ports["component"] = component
        self.accept_loops[:] = [one.loop for one in self.listeners.open.values()] + [
            loop for loop in self.accept_loops if loop.kind == "component"]
        return done

    def _listener_loop(self, lc: ListenerConfig, listener: trio.SocketListener) -> AcceptLoop:
        """The accept loop of a bound client listener: WebSocket endpoints
        are built here, from the configuration in force when it opens."""
        handler: Callable[[trio.SocketStream], Awaitable[None]]
        if lc.kind in WEBSOCKET_KINDS:
            handler = WebSocketEndpoint(self, secure=lc.kind == "websocket-tls").handle
        else:
            handler = partial(self._handle, direct_tls=lc.kind == "tls")
        log.info("listening for %s (%s) on %s port %d", lc.kind, _describe(lc.kind),
                 lc.address, listener.socket.getsockname()[1])
        return AcceptLoop(listener, partial(self._admit, handler, lc.kind), lc.kind)

    async def _listen_components(self, nursery: trio.Nursery) -> None:
        """The XEP-0114 port, opened only when components are configured."""
        cc = self.config.components
        listener = await open_reuseport_listener(
            ListenerConfig(kind="component", port=cc.port, address=cc.address))
        port = listener.socket.getsockname()[1]
        self.bound_ports["component"] = port
        log.info("listening for components (XEP-0114) on %s port %d", cc.address, port)
        loop = AcceptLoop(listener, partial(self._admit, self._handle_component, "component"),
                          "component")
        self.accept_loops.append(loop)
        nursery.start_soon(self._serve_listener, loop)

    async def _handle_component(self, stream: trio.SocketStream) -> None:
        conn = ComponentConnection(self, self.components, stream)
        self.component_connections.add(conn)
        try:
            await conn.run()
        except Exception:
            log.exception("component connection handler crashed")
        finally:
            self.component_connections.discard(conn)

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

    async def _admit(self, handler: Callable[[trio.SocketStream], Awaitable[None]], kind: str,
                     stream: trio.SocketStream) -> None:
        """Apply the per-address connection limits at accept, before any TLS
        or XML work: a refused connection costs a few bytes and a close."""
        try:
            address = stream.socket.getpeername()[0]
        except (OSError, IndexError, TypeError):
            address = None
        admitted = self.connection_limiter.admit(address)
        if not isinstance(admitted, ConnectionSlot):
            self.connection_limiter.note_refused(admitted, trio.current_time())
            await self._refuse(stream, kind)
            return
        token = CONNECTION_SLOT.set(admitted)
        try:
            await handler(stream)
        finally:
            admitted.release()
            CONNECTION_SLOT.reset(token)

    async def _refuse(self, stream: trio.SocketStream, kind: str) -> None:
        """Close a refused connection cleanly: on the plain c2s listener the
        client first gets a stream header and a `policy-violation` stream
        error (RFC 6120 §4.9.1.1 allows an error before the client's header),
        so it knows not to retry at once; TLS and HTTP listeners just close."""
        with trio.move_on_after(REFUSAL_SEND_TIMEOUT):
            try:
                if kind == "c2s":
                    framing = TCPFraming()
                    data = framing.header(secrets.token_urlsafe(ID_BYTES),
                                          sorted(self.domains)[0], None)
                    data += b"".join(framing.error(
                        "policy-violation", "too many connections from your address"))
                    await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        with trio.CancelScope(shield=True):
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

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
        """End every stream with `system-shutdown` and let them flush.
        Modules hear `server/stopping` first (rooms tell their occupants)."""
        with trio.move_on_after(SHUTDOWN_GRACE), self.router.batch():
            await self.hooks.notify("server/stopping", None)
        for conn in list(self.connections):
            conn.kick("system-shutdown", "the server is stopping")
        for component in list(self.component_connections):
            component.kick("system-shutdown", "the server is stopping")
        with trio.move_on_after(SHUTDOWN_GRACE):
            await self._no_connections.wait()
        # What ended sessions left to route again (offline storage).
        with trio.move_on_after(SHUTDOWN_GRACE):
            await self._rerouted_all.wait()
        left = sum(len(stanzas) for _, stanzas in self._reroute)
        if left:
            log.warning("shutdown: %d stanza(s) of ended sessions not routed again", left)
        # Modules finish work they buffered (archive writes) while the
        # store is still open.
        with trio.move_on_after(SHUTDOWN_GRACE):
            try:
                await self.hooks.notify("server/stopped", self)
            except Exception:
                log.exception("server/stopped handler failed")
        await self.directory.aclose()
        if self.store is not None:
            await self.store.aclose()


def _describe(kind: str) -> str:
    return {
        "c2s": "clients, STARTTLS",
        "tls": "clients, direct TLS",
        "websocket": "clients, XMPP over WebSocket and host-meta, HTTP",
        "websocket-tls": "clients, XMPP over WebSocket and host-meta, HTTPS",
    }.get(kind, kind)
