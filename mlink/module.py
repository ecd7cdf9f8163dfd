"""The module context: what one feature module sees of the server.

Modelled on Prosody's `module` object. Each module file defines
`setup(module: Module) -> None` and gets its own `Module`, never the
server: it hooks events, declares features, reads its own typed options,
keeps data in its own namespaced stores, runs background tasks, logs under
its own name, declares per-session fields, and talks to the same module on
other shards. The core knows nothing of any one XEP; everything a feature
needs from the core passes through this class, so a new feature (or a
third-party one, given by import path in `<modules>`) edits no core file.

The host behind a `Module` is described by the `ModuleHost` protocol, so
this file (and every module) imports no `mlink.server`.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from mlink.hooks import Handler, Hooks
from mlink.router.fields import FieldCodec, SessionField, field_registry
from mlink.router.router import HostedDomain

if TYPE_CHECKING:
    from mlink.config_model import Config
    from mlink.directory.base import Directory
    from mlink.router.router import Router
    from mlink.router.sessions import SessionInfo
    from mlink.sasl.registry import CredentialSource, MechanismProvider
    from mlink.store import Store
    from mlink.store.module_store import ModuleStore

T = TypeVar("T")
# A stream feature: given what is known of the stream, the element to offer
# in <stream:features>, or None to offer nothing on this stream.
FeatureProvider = Callable[["StreamView"], ET.Element | None]
# What a module on another shard sent: (source shard, payload bytes).
BusHandler = Callable[[int, bytes], Awaitable[None]]


class HTTPExchange(Protocol):
    """One HTTP request on the server's HTTP(S) listeners, as a module's
    HTTP handler sees it (`Module.add_http_handler`); implemented by
    `mlink.transport.http_exchange`. One request per connection: the
    connection closes after the response."""

    method: str
    # The request target's path, still percent-encoded, and its query.
    path: str
    query: str
    # The client's address (for logs and limits), None if unknown.
    peer: str | None
    # Whether the request came over TLS, or in plain HTTP from this machine
    # or a configured trusted (TLS-terminating) proxy, as for WebSocket.
    secure: bool

    def header(self, name: str) -> str | None:
        """A request header field (name in lower case)."""
        ...

    @property
    def started(self) -> bool:
        """Whether the response head has been sent."""
        ...

    async def receive_body(self, idle_timeout: float) -> bytes | None:
        """The next piece of the request body, None once it is complete.
        Raises TimeoutError when the client sends nothing for
        `idle_timeout` seconds, ConnectionError when it is gone or its
        body is malformed. Sends `100 Continue` first if the client waits
        for it, so call it only once the request is accepted."""
        ...

    async def respond(self, status: int, headers: Sequence[tuple[str, str]] = (),
                      body: bytes = b"") -> None:
        """A whole response (Content-Length set here)."""
        ...

    async def start(self, status: int, headers: Sequence[tuple[str, str]],
                    length: int) -> None:
        """A response head announcing `length` body bytes, sent with `send`."""
        ...

    async def send(self, data: bytes, idle_timeout: float) -> None:
        """Body bytes; TimeoutError when the client does not take them
        within `idle_timeout`, ConnectionError when it is gone."""
        ...


# A module's HTTP handler: answers one exchange (see `Module.add_http_handler`).
HTTPHandler = Callable[[HTTPExchange], Awaitable[None]]


class StreamView(Protocol):
    """What a stream-feature provider may know of the stream it offers on."""

    tls_active: bool
    authenticated: bool
    websocket: bool


class ModuleHost(Protocol):
    """What the server offers to modules (implemented by `mlink.server.Server`)."""

    hooks: Hooks
    router: Router
    directory: Directory
    store: Store
    config: Config
    nonza_namespaces: set[str]

    def spawn_background(self, name: str, task: Callable[[], Awaitable[None]]) -> None: ...
    def shared_service(self, name: str, factory: Callable[[], Any]) -> Any: ...
    def module_store(self, module: str) -> ModuleStore: ...
    def bus_subscribe(self, channel: str, handler: BusHandler) -> None: ...
    def register_cache(self, name: str, invalidate: Callable[[str], None]
                       ) -> Callable[[str], None]: ...
    def bus_send(self, channel: str, payload: bytes, shard: int | None = None) -> None: ...
    def owner(self, key: str) -> int: ...
    @property
    def shard(self) -> int: ...
    @property
    def shard_count(self) -> int: ...
    def add_stream_feature(self, provider: FeatureProvider, authenticated: bool) -> None: ...
    def add_sasl_mechanism(self, provider: MechanismProvider) -> None: ...
    def add_credential_source(self, kind: str, source: CredentialSource) -> None: ...
    def add_http_handler(self, prefix: str, handler: HTTPHandler) -> None: ...
    def listener_port(self, kind: str) -> int | None: ...
    def trust_client_cas(self, certificates: Sequence[bytes]) -> None: ...


class Module:
    """One module's handle on the server; see the module docstring."""

    def __init__(self, name: str, host: ModuleHost) -> None:
        self.name = name
        self._host = host
        # Dotted names of third-party modules are kept whole; ours are
        # "mlink.modules.<name>", as `__name__` would give.
        self.log = logging.getLogger(name if "." in name else f"mlink.modules.{name}")

    # -- what the module reaches ---------------------------------------------------

    @property
    def router(self) -> Router:
        """Routing and delivery (RFC 6120 §10): route, deliver, bounce, resources."""
        return self._host.router

    @property
    def directory(self) -> Directory:
        return self._host.directory

    @property
    def data(self) -> Store:
        """The server's shared store (rosters, offline messages, profiles:
        data several modules and the command line share). A module's own
        data goes in `store`."""
        return self._host.store

    @property
    def store(self) -> ModuleStore:
        """This module's namespaced key-value, map and archive stores."""
        return self._host.module_store(self.name)

    @property
    def config(self) -> Config:
        """The current configuration snapshot (replaced whole on reload:
        read it when needed, do not keep parts of it)."""
        return self._host.config

    @property
    def options(self) -> Any:
        """This module's own typed options (its `OPTIONS` dataclass, filled
        from its `<module>` element), from the current snapshot."""
        options = getattr(self._host.config, "module_options", None) or {}
        return options.get(self.name)

    @property
    def domains(self) -> frozenset[str]:
        return self._host.router.domains

    # -- what the server offers (for discovery) ----------------------------------

    def server_features(self) -> frozenset[str]:
        """Every disco feature the modules declared (`add_feature`)."""
        return frozenset(self._host.hooks.features)

    def handles(self, event: str) -> bool:
        """Whether any module handles `event`."""
        return self._host.hooks.has(event)

    def account_extras(self) -> tuple[list[tuple[str, str, str]], frozenset[str]]:
        """Identities and features modules added to accounts' disco#info."""
        hooks = self._host.hooks
        return list(hooks.account_identities), frozenset(hooks.account_features)

    # -- what the module adds ------------------------------------------------------

    def hook(self, event: str, handler: Handler, priority: int = 0) -> None:
        """Handle a named event (see `mlink.hooks` for the names)."""
        self._host.hooks.on(event, handler, priority)

    async def fire(self, event: str, payload: object) -> None:
        """Tell every handler of `event` (an event of this module's own)."""
        await self._host.hooks.notify(event, payload)

    def add_feature(self, var: str) -> None:
        """A disco#info feature of the server (XEP-0030)."""
        self._host.hooks.add_feature(var)

    def add_account_feature(self, var: str, identity: tuple[str, str, str] | None = None) -> None:
        """A feature (and optional identity) accounts show in disco#info."""
        self._host.hooks.account_features.add(var)
        identities = self._host.hooks.account_identities
        if identity is not None and identity not in identities:
            identities.append(identity)  # one identity, however many modules name it

    def add_host(self, domain: str, parent: str, handler: Handler) -> None:
        """Serve the subdomain `domain` (e.g. `conference.<parent>`): every
        stanza to it or to a JID under it, from a local client or a module,
        goes to `handler` (event `hosted/<module name>`, a `StanzaEvent`)
        instead of being refused as a remote domain; `parent`'s disco#items
        lists it. One handler serves all of this module's subdomains."""
        router = self._host.router
        if domain in router.domains or domain in router.hosted:
            raise ValueError(f"domain {domain!r} is already served")
        event = f"hosted/{self.name}"
        if not self._host.hooks.has(event):
            self._host.hooks.on(event, handler)
        router.hosted[domain] = HostedDomain(parent, self.name)

    def hosted_domains(self, parent: str) -> list[str]:
        """The subdomains modules serve under local domain `parent`."""
        return self._host.router.hosted_under(parent)

    def add_stream_feature(self, provider: FeatureProvider, *, authenticated: bool) -> None:
        """Offer an element in <stream:features>: after authentication
        (`authenticated=True`) or on every stream."""
        self._host.add_stream_feature(provider, authenticated)

    def add_nonza_handler(self, namespace: str, handler: Handler) -> None:
        """Handle top-level elements of `namespace` on established streams
        (a stream extension's own elements); the handler gets a
        `mlink.hooks.NonzaEvent`. Without one, such elements end the stream."""
        self._host.nonza_namespaces.add(namespace)
        self._host.hooks.on(f"nonza/{namespace}", handler)

    def add_sasl_mechanism(self, provider: MechanismProvider) -> None:
        """Offer a SASL mechanism (see `mlink.sasl.registry`)."""
        self._host.add_sasl_mechanism(provider)

    def add_credential_source(self, kind: str, source: CredentialSource) -> None:
        """Answer a mechanism's credential requests of `kind`."""
        self._host.add_credential_source(kind, source)

    def add_http_handler(self, prefix: str, handler: HTTPHandler) -> None:
        """Answer HTTP requests whose path starts with `prefix` (e.g.
        `/upload/`) on the server's `websocket` and `websocket-tls`
        listeners: `handler` gets an `HTTPExchange` after the request head
        was read and checked (size, fields, time), on whichever shard
        accepted the connection."""
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError(f"HTTP prefix {prefix!r} must start and end with '/'")
        self._host.add_http_handler(prefix, handler)

    def listener_port(self, kind: str) -> int | None:
        """The port the listener of `kind` (`websocket-tls`, ...) is bound
        to, once the server listens; None if there is none."""
        return self._host.listener_port(kind)

    def trust_client_cas(self, certificates: Sequence[bytes]) -> None:
        """Make the TLS listeners accept client certificates issued by these
        CAs (DER) besides the configured `<client-ca>` files, from now on
        and after a reload (CA certificates read from the directory)."""
        self._host.trust_client_cas(certificates)

    def session_field(self, name: str, default: T, codec: FieldCodec[T] | None = None
                      ) -> SessionField[T]:
        """A per-session value of this module. With a codec it is replicated
        to the other shards with the session (keep it small: it travels
        whenever it changes)."""
        return field_registry.declare(f"{self.name}:{name}", default, codec)

    def shared(self, name: str, factory: Callable[[], T]) -> T:
        """A service several modules share (e.g. the roster cache), made by
        `factory` on first use and the same object for every module."""
        return self._host.shared_service(name, factory)  # type: ignore[no-any-return]

    def user_cache(self, name: str, invalidate: Callable[[str], None]) -> Callable[[str], None]:
        """Register a per-user cache of this module kept on every shard;
        returns `changed(user)`, to call after writing `user`'s data so the
        other shards drop their copies (they call `invalidate(user)`)."""
        return self._host.register_cache(f"{self.name}:{name}", invalidate)

    def spawn(self, task: Callable[[], Awaitable[None]]) -> None:
        """Run `task` in the server's nursery while the server serves: it
        is owned (cancelled at shutdown), and its crash is logged, not fatal."""
        self._host.spawn_background(self.name, task)

    # -- the module on other shards ------------------------------------------------

    @property
    def shard(self) -> int:
        return self._host.shard

    @property
    def shard_count(self) -> int:
        """How many shards the server runs (configured, alive or not): how
        many answers a question to every shard can get."""
        return self._host.shard_count

    def owner(self, key: str) -> int:
        """The shard that owns `key` (a room, a resumption token): the same
        answer on every shard, so one shard holds each such object."""
        return self._host.owner(key)

    def on_bus(self, handler: BusHandler, channel: str = "") -> None:
        """Receive what this module sends from other shards."""
        self._host.bus_subscribe(f"{self.name}/{channel}", handler)

    def send_bus(self, payload: bytes, shard: int | None = None, channel: str = "") -> None:
        """Send `payload` to this module on `shard` (None: every other shard).
        A no-op with one shard."""
        self._host.bus_send(f"{self.name}/{channel}", payload, shard)


class Codec(Generic[T]):
    """Small helpers to build a `FieldCodec` from two functions."""

    def __init__(self, encode: Callable[[T], bytes], decode: Callable[[bytes], T]) -> None:
        self.encode = encode
        self.decode = decode


BOOL_CODEC: FieldCodec[bool] = Codec(lambda v: b"\x01" if v else b"", lambda b: b == b"\x01")


def session_value(info: SessionInfo, field: SessionField[T]) -> T:
    """`field`'s value in `info` (sugar for `field.get(info)`)."""
    return field.get(info)
