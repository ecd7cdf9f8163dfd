"""The configuration schema: what mlink.xml may say, and the snapshot the
server holds.

Each class is one XML element (its `XML` ElementSpec), each field one
attribute or child (its `Setting`, see `mlink.config_schema`), with its
documentation and the reason for its default. `mlink.config.load_config`
reads the file against this schema, `mlink.config_render` writes it, and
`mlink.config_doc` generates the reference in docs/configuration.md.

Every class is a frozen dataclass: the server holds one immutable
snapshot and a reload replaces it whole, so no reader ever sees half of
an old configuration and half of a new one. Lists given to a constructor
are kept as tuples. Tests and tools may build these directly.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

from mlink.config_schema import (
    DN,
    LDAPURL,
    AttributeName,
    Bool,
    Checker,
    Choice,
    Domain,
    ElementSpec,
    ExtraAttribute,
    FieldName,
    Filter,
    FloatAtLeast,
    Frozen,
    Host,
    Int,
    Network,
    Origin,
    PathKind,
    PositiveFloat,
    Raw,
    RedirectURI,
    SimpleFilter,
    Str,
    WebSocketURL,
    absolute_path,
    attr,
    base_dn_for_domain,
    custom,
    not_in_file,
    section,
    sections,
    texts,
)

if TYPE_CHECKING:
    from xml.etree.ElementTree import Element

# RFC 6120 §13.12 asks servers to accept stanzas of at least 10,000 bytes;
# 256 KiB leaves room for avatars in vCards and large forms while bounding
# the memory one connection can pin. (The same reason is the `why` of
# LimitsConfig.max_stanza_bytes, which the docs show.)
DEFAULT_MAX_STANZA_BYTES = 256 * 1024
# RFC 6120 §13.12: a server must accept stanzas of at least 10,000 bytes, so
# a lower limit would break conforming clients.
MIN_STANZA_BYTES = 10_000
# Real stanzas nest a dozen levels at most; see LimitsConfig.max_depth.
DEFAULT_MAX_DEPTH = 64
# Time to finish SASL and bind, as Prosody's c2s_timeout; see
# LimitsConfig.auth_timeout.
DEFAULT_AUTH_TIMEOUT = 60.0
# Messages stored per offline user (XEP-0160), as Prosody's default; see
# LimitsConfig.max_offline_messages.
DEFAULT_MAX_OFFLINE_MESSAGES = 100
# Output queued for one client; see LimitsConfig.max_output_bytes. At least
# one largest stanza must fit (RFC 6120 §13.12's 10,000 bytes, with room).
DEFAULT_MAX_OUTPUT_BYTES = 4 * 1024 * 1024
MIN_OUTPUT_BYTES = 64 * 1024
# -- abuse limits (LimitsConfig; docs/security.md compares them with Prosody's
# and ejabberd's defaults). Per shard where they count connections or
# failures: shards share no memory, and a shared counter would cost a bus
# round trip on every accept.
# SASL failures one stream may have before it ends with policy-violation:
# RFC 6120 §6.4.5 asks for "at least 2 and no more than 5" retries.
DEFAULT_AUTH_FAILURES_PER_STREAM = 5
# Failures an address or an account may have before answers are delayed.
DEFAULT_AUTH_FREE_FAILURES = 5
# The longest delay put before a credential check of a penalised address
# or account: long enough to make guessing slow, short enough that a user
# whose account is being guessed at can still log in.
DEFAULT_AUTH_MAX_DELAY = 10.0
# One recorded failure is forgotten per this many seconds.
DEFAULT_AUTH_FORGET_SECONDS = 60.0
# Connections (any state) from one address, per shard.
DEFAULT_CONNECTIONS_PER_ADDRESS = 100
# Connections from one address that have not authenticated yet, per shard.
DEFAULT_UNAUTHENTICATED_PER_ADDRESS = 10
# Resources bound at once for one account: Prosody's max_resources default,
# ejabberd's example max_user_sessions.
DEFAULT_MAX_RESOURCES = 10
# Stanzas per second a session may send on average, and the burst it may
# send at once (a login: roster, disco, presence, a hundred room joins).
DEFAULT_STANZA_RATE = 50.0
DEFAULT_STANZA_BURST = 200
# Seconds a stanza may take from its first byte to its last.
DEFAULT_READ_TIMEOUT = 60.0
# Personal roster items per user (directory-group items are not counted).
DEFAULT_MAX_ROSTER_ITEMS = 1000
# Bytes of XEP-0049 private XML per user (keys and values).
DEFAULT_MAX_PRIVATE_BYTES = 1024 * 1024
# Profile cache lifetime; see ProfilesConfig.cache_seconds.
DEFAULT_PROFILE_CACHE_SECONDS = 60.0
# Largest avatar; see ProfilesConfig.max_photo_bytes.
DEFAULT_MAX_PHOTO_BYTES = 192 * 1024
# base64 turns 3 bytes into 4: a photo larger than 3/4 of the stanza limit
# could never be sent in a vCard or avatar stanza, so the file is refused.
BASE64_RATIO = (3, 4)
# Directory group re-read interval; see RostersConfig.refresh_seconds.
DEFAULT_GROUP_REFRESH_SECONDS = 300.0
# Highest TCP port number (ports are 16-bit); 0 asks the OS for a free port,
# which tests use.
MAX_PORT = 65535
# Each LDAP connection is a socket and a server-side session; a few dozen is
# already more than one mlink process can keep busy, and a typo like
# pool-size="8000" should not open thousands of connections to the
# directory.
MAX_LDAP_POOL_SIZE = 256
# Default port per listener type: the IANA ports for xmpp-client and
# xmpps-client (XEP-0368), and Prosody/ejabberd's usual HTTP and HTTPS ports.
LISTENER_DEFAULT_PORTS: dict[str, int] = {
    "c2s": 5222, "tls": 5223, "websocket": 5280, "websocket-tls": 5281,
}
# Listener types that need the certificate of <tls>.
TLS_LISTENER_KINDS = ("tls", "websocket-tls")
# The names of Python's logging levels, so the value maps directly.
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
BACKENDS = ("embedded", "ldap")
# Who owns a profile field (white paper, "Operational Model"; docs/directory.md).
PROFILE_POLICIES = ("directory", "update", "static", "local")
# The modules loaded when <modules> does not say otherwise, in load order
# (order matters only where two modules hook one event at one priority).
DEFAULT_MODULES = (
    "roster", "presence", "subscription", "offline", "blocking", "carbons", "disco", "ping",
    "version", "last", "private", "vcard", "user_profile", "avatar", "shared_groups",
    "accounts", "register", "muc", "stream_management", "csi", "mam", "pep", "push", "bookmarks",
)


# -- listeners ---------------------------------------------------------------------


def _check_listeners(chk: Checker, items: list[tuple[Element, ListenerConfig]]) -> None:
    seen: dict[tuple[str, int], int | None] = {}
    for elem, lc in items:
        if lc.port != 0:
            key = (lc.address, lc.port)
            if key in seen:
                chk.fail(elem, f"{lc.address} port {lc.port} already used at line {seen[key]}")
            seen[key] = chk.line(elem)


@dataclass(frozen=True, slots=True)
class ListenerConfig(Frozen):
    XML: ClassVar[ElementSpec] = ElementSpec(
        "listen", "one or more, required",
        doc="A port on which clients connect. At least one is required. Listeners "
            "added, removed or changed apply live on reload (see [Reloading](#reloading)).",
        comment="Where clients connect. type: c2s = XMPP with STARTTLS (RFC 6120),\n"
                "tls = direct TLS (XEP-0368), websocket = XMPP over WebSocket\n"
                "(RFC 7395) on plain HTTP, websocket-tls = the same on HTTPS (wss://).\n"
                "port 0 picks a free port.",
    )
    kind: str = attr(
        "type", kind=Choice(tuple(LISTENER_DEFAULT_PORTS),
                            "unknown listener type {value!r} (use c2s, tls, websocket or "
                            "websocket-tls)"),
        required="<listen> needs a 'type' attribute (c2s, tls, websocket or websocket-tls)",
        doc="`c2s`: XMPP over TCP with STARTTLS (RFC 6120). `tls`: direct TLS, the stream "
            "starts after the TLS handshake (XEP-0368); needs a certificate. `websocket`: "
            "XMPP over WebSocket (RFC 7395) on plain HTTP (`ws://`). `websocket-tls`: the "
            "same on HTTPS (`wss://`) with the `<tls>` certificate; needs a certificate. "
            "See [WebSocket listeners](#websocket-listeners).",
    )
    port: int = attr(
        "port", kind=Int(0, MAX_PORT),
        default_from=lambda chk, v: LISTENER_DEFAULT_PORTS[v["kind"]],
        default_doc="5222 for `c2s`, 5223 for `tls`, 5280 for `websocket`, 5281 for "
                    "`websocket-tls`",
        doc="TCP port, `0`..`65535`. `0` lets the system choose a free port (useful in "
            "tests). Two listeners cannot share an address and non-zero port.",
        why="The IANA ports for xmpp-client and xmpps-client (XEP-0368), and "
            "Prosody's usual HTTP and HTTPS ports.",
    )
    address: str = attr(
        "address", "0.0.0.0", kind=Host(),
        doc="Address to bind: an IPv4 or IPv6 address (`::` for all IPv6 addresses) or a "
            "host name such as `localhost`.",
    )


# -- TLS -------------------------------------------------------------------------------


def _finish_tls(chk: Checker, elem: Element | None, parent: Element, tls: TLSConfig,
                values: Mapping[str, Any]) -> TLSConfig:
    if elem is not None and (tls.certificate is None) != (tls.key is None):
        chk.fail(elem, "<tls> needs both 'certificate' and 'key', or neither")
    if tls.certificate is None:
        # Without a certificate these settings could never work; say so
        # now rather than when the first client connects.
        where = elem if elem is not None else parent
        for listener in values.get("listeners", ()):
            if listener.kind in TLS_LISTENER_KINDS:
                chk.fail(where,
                         f'a type="{listener.kind}" listener needs <tls certificate=... key=...>')
        if tls.required:
            chk.fail(where, "TLS is required but no certificate is configured: give <tls "
                            'certificate=... key=...>, or required="false" for local testing only')
        if tls.client_cas:
            chk.fail(where, "<client-ca> needs the server's own certificate: give <tls "
                            "certificate=... key=...>")
    return tls


@dataclass(frozen=True, slots=True)
class TLSConfig(Frozen):
    XML: ClassVar[ElementSpec] = ElementSpec(
        "tls", "at most once", finish=_finish_tls,
        notes="`certificate` and `key` go together. Without a certificate the file is refused "
              "if `required` is `true` (no client could ever log in) or if there is a "
              '`type="tls"` or `type="websocket-tls"` listener. `required="false"` without a '
              "certificate is meant for local testing only: passwords would cross the network "
              "in the clear.\n\n"
              'Omitting `<tls>` is the same as `<tls required="true"/>`, which needs a '
              "certificate; so in practice a configuration always has a `<tls>` element.\n\n"
              "The certificate and key are read again on reload: new connections get the "
              "new ones.",
        comment='Certificate and private key (PEM). required="true": clients must\n'
                "start TLS before they may authenticate (RFC 6120 5.3.1).",
    )
    certificate: Path | None = attr(
        "certificate", None, kind=PathKind(must_exist=True), default_doc="none",
        doc="PEM certificate (chain) file. Must exist. Should cover every `<domain>`.",
    )
    key: Path | None = attr(
        "key", None, kind=PathKind(must_exist=True), default_doc="none",
        doc="PEM private key for the certificate. Must exist; keep it mode 0600.",
    )
    required: bool = attr(
        "required", True, kind=Bool(),
        doc="When `true`, clients must establish TLS before authenticating; on `c2s` ports "
            "STARTTLS is mandatory.",
        why="RFC 6120 §5.3.1: servers should require TLS before SASL.",
    )
    client_cas: tuple[Path, ...] = texts(
        "client-ca", kind=PathKind(must_exist=True), cardinality="inside `<tls>`, any number",
        doc="Text content: a PEM file of CA certificates (roots and intermediates) that "
            "issue client certificates, for SASL EXTERNAL (XEP-0178); repeat for several "
            "files. Given: the `tls` and `c2s` listeners ask every client for a certificate "
            "(optional: a client without one still uses SCRAM or PLAIN), verify a certificate "
            "sent against these CAs only, and the `sasl_external` module is enabled (see its "
            "options and docs/security.md). A certificate's dates and revocation are checked "
            "at authentication, so the client is told why it is refused. Read again on "
            "reload. Not asked on `websocket-tls` listeners (browsers would prompt).",
    )


# -- WebSocket ------------------------------------------------------------------------

_WEBSOCKET_EXAMPLE = """\
<websocket see-other-uri="wss://other.example.org/xmpp-websocket">
  <origin>https://chat.example.org</origin>
  <trusted-proxy>10.0.0.1</trusted-proxy>
</websocket>"""


# In-memory caches of a shard; see CachesConfig.
DEFAULT_JID_CACHE = 16384
DEFAULT_PROFILE_CACHE = 10_000
DEFAULT_BLOCKLIST_CACHE = 100_000


@dataclass(frozen=True, slots=True)
class CachesConfig(Frozen):
    """Bounds of the per-shard caches (their sizes show in `mlink status`)."""

    XML: ClassVar[ElementSpec] = ElementSpec(
        "caches", "at most once",
        doc="How many entries each in-memory cache of a shard may hold; the oldest (least "
            "recently used) go first. Omitted: the defaults.",
    )
    jids: int = attr(
        "jids", DEFAULT_JID_CACHE, kind=Int(1), hide_default=True,
        doc="Prepared JIDs (PRECIS work done once per distinct address).",
        why="About 0.3-0.4 KiB each: 16,384 stay under 8 MiB even when an attacker sends "
            "distinct addresses, and cover every contact of the users online.",
    )
    profiles: int = attr(
        "profiles", DEFAULT_PROFILE_CACHE, kind=Int(1), hide_default=True,
        doc="Users whose directory profile attributes are kept (vCard, avatars).",
        why="A busy roster's vCard fetches hit the directory rarely; memory stays bounded.",
    )
    blocklists: int = attr(
        "blocklists", DEFAULT_BLOCKLIST_CACHE, kind=Int(1), hide_default=True,
        doc="Blocklists (XEP-0191) of users online on any shard.",
        why="Each is a small set of JIDs; 100,000 covers every user a large deployment has "
            "online at once.",
    )


@dataclass(frozen=True, slots=True)
class WebSocketConfig(Frozen):
    """XMPP over WebSocket (RFC 7395) settings shared by the websocket listeners."""

    XML: ClassVar[ElementSpec] = ElementSpec(
        "websocket", "at most once",
        doc="Settings shared by the `websocket` and `websocket-tls` listeners. Omitted: every "
            "origin allowed, no trusted proxies, no redirect.",
        comment="XMPP over WebSocket: allowed page origins (none listed: all),\n"
                "reverse proxies whose plain ws:// counts as encrypted, and an\n"
                "optional see-other-uri redirecting every stream (RFC 7395).",
        example=_WEBSOCKET_EXAMPLE,
    )
    origins: tuple[str, ...] = texts(
        "origin", kind=Origin(), cardinality="inside `<websocket>`, any number",
        doc="Text `scheme://host[:port]` exactly as browsers send it in the `Origin` header "
            "(`https://chat.example.org`; no path; case-insensitive). When at least one is "
            "listed, a WebSocket handshake whose `Origin` is not in the list is refused with "
            "HTTP 403, so other sites' pages cannot use the endpoint with their visitors' "
            "browsers. A handshake without `Origin` is not from a browser page and is allowed "
            "(any other client can send any Origin, so the check cannot protect against "
            "them). None listed: all origins are allowed, the right default for a standalone "
            "server whose users bring their own web client.",
    )
    trusted_proxies: tuple[str, ...] = texts(
        "trusted-proxy", kind=Network(), cardinality="inside `<websocket>`, any number",
        doc="An IP address or network (`10.0.0.5`, `10.0.0.0/8`, `2001:db8::/64`) of a "
            "TLS-terminating reverse proxy. A plain `ws://` stream from it counts as encrypted "
            "(see [WebSocket listeners](#websocket-listeners)), and host-meta believes its "
            "`X-Forwarded-Proto: https` when writing `wss://` links.",
    )
    public_url: str | None = attr(
        "public-url", None, kind=WebSocketURL(),
        default_doc="`ws(s)://<domain>:<port>/xmpp-websocket` of the listener asked",
        doc="The WebSocket URL host-meta (XEP-0156) gives clients, e.g. "
            "`wss://chat.example.org/xmpp-websocket` behind a reverse proxy. Unset, the link "
            "is built from the served domain the request's `Host` names (else the first "
            "domain) and the listener's own port and scheme — never from an arbitrary "
            "`Host` header, which would let anyone point clients elsewhere.",
    )
    see_other_uri: str | None = attr(
        "see-other-uri", None, kind=RedirectURI(), default_doc="none",
        doc="When set, every WebSocket stream is answered with `<open/>` and then "
            '`<close see-other-uri="..."/>` (RFC 7395 §3.6.1), sending clients to another '
            "endpoint (a `ws://`, `wss://`, or BOSH `http(s)://` URI), e.g. while moving the "
            "service. Clients refuse a redirect from `wss://` to `ws://`.",
    )


# -- external components (XEP-0114) ----------------------------------------------

# The port XEP-0114 components conventionally connect to (Prosody's and
# ejabberd's default component port).
DEFAULT_COMPONENT_PORT = 5347
# A shared secret shorter than this is guessable offline from one recorded
# handshake (SHA-1 of the public stream id and the secret): refused.
MIN_COMPONENT_SECRET = 16


def _finish_component(chk: Checker, elem: Element | None, parent: Element,
                      c: ComponentConfig, values: Mapping[str, Any]) -> ComponentConfig:
    where = elem if elem is not None else parent
    if elem is not None and elem.get("secret") is not None and \
            elem.get("secret-file") is not None:
        chk.fail(elem, "give 'secret' or 'secret-file', not both")
    raw = elem.get("secret-file") if elem is not None else None
    if raw is not None and elem is not None:
        from mlink.config_schema import Invalid, ParseEnv

        try:
            path = PathKind(must_exist=True).parse(raw, ParseEnv(chk.base, values))
        except Invalid as exc:
            chk.fail(elem, exc.message("'secret-file' on <component>"))
        c = dataclasses.replace(c, secret=_read_password(chk, elem, path, "secret-file"),
                                secret_file=path)
    if len(c.secret) < MIN_COMPONENT_SECRET:
        chk.fail(where, f"the secret of component {c.name!r} must be at least "
                        f"{MIN_COMPONENT_SECRET} characters (give 'secret' or 'secret-file')")
    served = set(values.get("domains", ()))
    if c.name in served:
        chk.fail(where, f"component {c.name!r} is a served <domain>; give it a domain of its own")
    return c


@dataclass(frozen=True, slots=True)
class ComponentConfig(Frozen):
    """One external component (XEP-0114) allowed to connect."""

    XML: ClassVar[ElementSpec] = ElementSpec(
        "component", "inside `<components>`, any number", finish=_finish_component,
        extra=(ExtraAttribute(
            "secret-file", "none",
            "File holding the secret (one line; a final newline is ignored). Relative to the "
            "configuration file. Must exist. Not together with `secret`."),),
        doc="A component that may connect and serve the domain `name` (and every JID at "
            "it): stanzas to it go down its connection, stanzas from it must come from it.",
    )
    name: str = attr(
        "name", kind=Domain(), required="<component> needs a 'name' (its domain)",
        doc="The component's domain, such as `push.example.com`; not a served `<domain>` "
            "nor a subdomain a module serves (`conference.<domain>` of `muc`, "
            "`upload.<domain>` of `http_upload`). "
            "It is listed in the disco#items of the served domain it is under (or of the "
            "first one).",
    )
    secret: str = attr(
        "secret", "", kind=Raw(), default_doc="none",
        doc="The shared secret of the handshake, at least 16 characters. Prefer "
            "`secret-file`, or make the configuration file readable by mlink only (0600).",
    )
    # Where `secret` was read from (`secret-file`), not a setting of its
    # own: kept so that writing the configuration out (`mlink config
    # import|export`) writes the reference again, never the secret it holds.
    secret_file: Path | None = None


def _check_components(chk: Checker, items: list[tuple[Element, ComponentConfig]]) -> None:
    first_line: dict[str, int | None] = {}
    for elem, c in items:
        if c.name in first_line:
            chk.fail(elem, f"component {c.name!r} given twice (first at line "
                           f"{first_line[c.name]})")
        first_line[c.name] = chk.line(elem)


def _module_hosts(modules: Sequence[str], options: Mapping[str, object],
                  domains: frozenset[str]) -> dict[str, str]:
    """Subdomain -> the module serving it, for the enabled modules that
    serve subdomains (they define `service_hosts(options, domains)`, the
    function their setup uses, so the check and the server agree)."""
    found: dict[str, str] = {}
    for name in modules:
        path = name if "." in name else f"mlink.modules.{name}"
        hosts = getattr(importlib.import_module(path), "service_hosts", None)
        if hosts is None:
            continue
        try:
            served = hosts(options.get(name), domains)
        except ValueError:
            continue  # the module's own setup reports its bad options
        for host in served:
            found.setdefault(host, name)
    return found


def _finish_config(chk: Checker, elem: Element | None, parent: Element,
                   config: Config, values: Mapping[str, Any]) -> Config:
    """Checks across sections: a component may not take a subdomain a
    module serves (`conference.<domain>`, `upload.<domain>`), which the
    server could only refuse when the module sets up."""
    if config.components.components:
        hosts = _module_hosts(config.modules, config.module_options,
                              frozenset(config.domains))
        section = elem.find("components") if elem is not None else None
        elems = section.findall("component") if section is not None else []
        for c, c_elem in zip(config.components.components, elems, strict=False):
            if c.name in hosts:
                chk.fail(c_elem, f"component {c.name!r} is served by module "
                                 f"{hosts[c.name]!r}; give the component another name")
    return config


_COMPONENTS_EXAMPLE = """\
<components address="127.0.0.1" port="5347">
  <component name="push.example.com" secret-file="push-secret"/>
</components>"""


@dataclass(frozen=True, slots=True)
class ComponentsConfig(Frozen):
    """External components (XEP-0114) and the port they connect to."""

    XML: ClassVar[ElementSpec] = ElementSpec(
        "components", "at most once",
        doc="External components (XEP-0114, the Jabber Component Protocol): services such "
            "as a push gateway that connect to mlink and serve a domain of their own. "
            "Without a `<component>` no component port is opened. See "
            "[architecture.md](architecture.md#external-components).",
        notes="Children: any number of `<component>`. The port, the address and the names "
              "change at a restart; a new `secret` applies on reload to the next connection.",
        comment="External components (XEP-0114), such as a push gateway.",
        example=_COMPONENTS_EXAMPLE,
    )
    port: int = attr(
        "port", DEFAULT_COMPONENT_PORT, kind=Int(0, MAX_PORT),
        doc="TCP port components connect to; `0` picks a free one (tests).",
        why="The conventional component port (Prosody, ejabberd).",
    )
    address: str = attr(
        "address", "127.0.0.1", kind=Host(),
        doc="Address to bind. Components usually run beside the server; give another "
            "address only on a trusted network (the handshake is not encrypted).",
        why="The component protocol has no TLS: keep it off the network unless asked.",
    )
    components: tuple[ComponentConfig, ...] = sections(
        ComponentConfig, "component", check=_check_components)


# -- web console -------------------------------------------------------------------

# The console's HTTPS port when <console> gives none: 5443 is free of the IANA
# XMPP ports and of the WebSocket ones (5280/5281), and easy to remember.
DEFAULT_CONSOLE_PORT = 5443
# An idle console session ends after this many minutes (OWASP's guidance for
# administrative applications is 15-30 minutes of inactivity).
DEFAULT_CONSOLE_IDLE_MINUTES = 30
# Whatever the activity, a console session ends after this many hours, so a
# stolen cookie is not good for ever.
DEFAULT_CONSOLE_MAX_HOURS = 12


def _finish_admin(chk: Checker, elem: Element | None, parent: Element, a: AdminConfig,
                  values: Mapping[str, Any]) -> AdminConfig:
    where = elem if elem is not None else parent
    if (a.group is None) == (a.jid is None):
        chk.fail(where, "<admin> needs either 'group' (the DN of a directory group whose "
                        "members administer) or 'jid' (one administrator), not both")
    if a.jid is not None and ("@" not in a.jid or a.jid.startswith("@") or "/" in a.jid):
        chk.fail(where, f"'jid' on <admin> must be a bare JID user@domain, not {a.jid!r}")
    return a


@dataclass(frozen=True, slots=True)
class AdminConfig(Frozen):
    """Who may use the administration pages of the console, and for which domains."""

    XML: ClassVar[ElementSpec] = ElementSpec(
        "admin", "inside `<console>`, any number", finish=_finish_admin,
        doc="Grants the administration pages to the members of a directory group, or to one "
            "user, for one domain or for all. An administrator of one domain sees and "
            "changes only that domain's users and sessions.",
    )
    group: str | None = attr(
        "group", None, kind=DN(), default_doc="none",
        doc="DN of a directory group (`groupOfNames`/`groupOfUniqueNames` `member`, or "
            "`posixGroup` `memberUid`) whose members are administrators. Read at each "
            "console login, so membership changes apply at the next login. Works with both "
            "directory backends (an embedded directory holds group entries too).",
    )
    jid: str | None = attr(
        "jid", None, kind=Str(), default_doc="none",
        doc="The bare JID of one administrator (convenient with the embedded directory).",
    )
    domain: str | None = attr(
        "domain", None, kind=Domain(), default_doc="every served domain",
        doc="The one domain these administrators manage: delegated administration.",
    )


def _finish_console(chk: Checker, elem: Element | None, parent: Element, c: ConsoleConfig,
                    values: Mapping[str, Any]) -> ConsoleConfig:
    if elem is None:
        return c
    tls = values.get("tls", TLSConfig())
    if tls.certificate is None:
        chk.fail(elem, "<console> serves HTTPS with the <tls> certificate: give <tls "
                       "certificate=... key=...>")
    served = set(values.get("domains", ()))
    for admin in c.admins:
        if admin.domain is not None and admin.domain not in served:
            chk.fail(elem, f"<admin domain={admin.domain!r}> is not a served <domain>")
    url = c.public_url
    if url is not None and (not url.lower().startswith("https://") or len(url) <= 8 or any(
            ch.isspace() or ch in "<>'\"\\" for ch in url)):
        chk.fail(elem, f"'public-url' on <console> must be an https:// URL, not {url!r}")
    return dataclasses.replace(c, enabled=True)


_CONSOLE_EXAMPLE = """\
<console address="127.0.0.1" port="5443">
  <admin group="cn=mlink-admins,ou=Groups,dc=example,dc=com"/>
  <admin jid="admin@example.org" domain="example.org"/>
</console>"""


@dataclass(frozen=True, slots=True)
class ConsoleConfig(Frozen):
    """The web console (docs/console.md): administration, self-service, metrics."""

    XML: ClassVar[ElementSpec] = ElementSpec(
        "console", "at most once", finish=_finish_console,
        doc="The web console on its own HTTPS listener, served by the supervisor process: "
            "administration pages for the users named by `<admin>`, a self-service page "
            "where every user edits their profile and changes their password, and "
            "`/metrics` (OpenMetrics) for Prometheus. Omitted: no console, no listener. See "
            "[console.md](console.md).",
        notes="Needs the `<tls>` certificate (the console is HTTPS only: its cookies are "
              "`Secure`). Children: any number of `<admin>` and `<metrics-client>`. The "
              "listener (`port`, `address`, the element itself) changes at a restart; "
              "`<admin>` and `<metrics-client>` apply on reload (administrators at their next "
              "login). `mlink init --console-admin JID` writes one on loopback.",
        comment="The web console (administration, self-service, /metrics) on its\n"
                "own HTTPS listener with the <tls> certificate. Omitted: off.",
        example=_CONSOLE_EXAMPLE,
    )
    # True when <console> is in the file (set by its finish).
    enabled: bool = not_in_file(False)
    port: int = attr(
        "port", DEFAULT_CONSOLE_PORT, kind=Int(0, MAX_PORT),
        doc="TCP port of the console's HTTPS listener; `0` picks a free one (tests).",
        why="Free of the XMPP and WebSocket ports, and easy to remember.",
    )
    address: str = attr(
        "address", "127.0.0.1", kind=Host(),
        doc="Address to bind. The default keeps the console on the machine itself (reach it "
            "through SSH port forwarding or a reverse proxy); give `0.0.0.0` or `::` to open "
            "it to the network.",
        why="An administration application should not face the Internet unless asked to.",
    )
    idle_minutes: int = attr(
        "idle-minutes", DEFAULT_CONSOLE_IDLE_MINUTES, kind=Int(1),
        doc="A console session ends after this many minutes without a request.",
        why="OWASP's guidance for administrative applications: 15-30 minutes.",
    )
    max_hours: int = attr(
        "max-hours", DEFAULT_CONSOLE_MAX_HOURS, kind=Int(1),
        doc="A console session ends this many hours after its login, active or not.",
        why="A stolen session cookie should not be good for ever.",
    )
    public_url: str | None = attr(
        "public-url", None, kind=Str(), default_doc="none",
        doc="The console's address as users reach it (`https://chat.example.org:5443`, or a "
            "reverse proxy's). Given, the password expiry warning users get at login links "
            "to their self-service page (`<public-url>/me`).",
    )
    admins: tuple[AdminConfig, ...] = sections(AdminConfig, "admin")
    metrics_clients: tuple[str, ...] = texts(
        "metrics-client", kind=Network(), cardinality="inside `<console>`, any number",
        doc="Text: an address or network (`10.0.0.5`, `10.0.0.0/8`) allowed to read "
            "`/metrics` without logging in (a Prometheus server). Loopback addresses always "
            "may; others get 403.",
    )

    @property
    def self_service_url(self) -> str | None:
        """The self-service page users are sent to, when the console is on
        and its public URL known."""
        if not self.enabled or not self.public_url:
            return None
        return self.public_url.rstrip("/") + "/me"


# -- directory ------------------------------------------------------------------------


def _finish_ldap(chk: Checker, elem: Element | None, parent: Element, cfg: LDAPConfig,
                 values: Mapping[str, Any]) -> LDAPConfig:
    if elem is None:
        return cfg
    if elem.get("bind-password") is not None and elem.get("bind-password-file") is not None:
        chk.fail(elem, "give 'bind-password' or 'bind-password-file', not both")
    raw = elem.get("bind-password-file")
    if raw is not None:
        from mlink.config_schema import Invalid, ParseEnv

        try:
            path = PathKind(must_exist=True).parse(raw, ParseEnv(chk.base, values))
        except Invalid as exc:
            chk.fail(elem, exc.message("'bind-password-file' on <ldap>"))
        cfg = dataclasses.replace(cfg, bind_password=_read_password(chk, elem, path),
                                  bind_password_file=path)
    if cfg.bind_password and not cfg.bind_dn:
        chk.fail(elem, "a bind password is given but no 'bind-dn'")
    return cfg


# A password file holds one line; refusing big files keeps a wrong path (a
# log, a disk image) from being read whole.
MAX_PASSWORD_FILE_BYTES = 64 * 1024


def _read_password(chk: Checker, elem: Element, path: Path,
                   what: str = "bind-password-file") -> str:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_PASSWORD_FILE_BYTES + 1)
    except OSError as exc:
        chk.fail(elem, f"cannot read {what} {str(path)!r}: {exc.strerror}")
    if len(raw) > MAX_PASSWORD_FILE_BYTES:
        chk.fail(elem, f"{what} {str(path)!r} is too large for a password")
    try:
        # Editors add a final newline; it is never part of the password.
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        chk.fail(elem, f"{what} {str(path)!r} is not UTF-8")


@dataclass(frozen=True, slots=True)
class LDAPConfig(Frozen):
    XML: ClassVar[ElementSpec] = ElementSpec(
        "ldap", 'inside `<directory backend="ldap">`, exactly once', finish=_finish_ldap,
        extra=(ExtraAttribute(
            "bind-password-file", "none",
            "File holding the bind password (one line; a final newline is ignored). Relative "
            "to the configuration file. Must exist. Not together with `bind-password`."),),
        notes="A bind password without a `bind-dn` is an error.\n\n"
              "Children: one or more `<server>`.",
    )
    servers: tuple[str, ...] = texts(
        "server", kind=LDAPURL(), default_doc="ldap://127.0.0.1:389",
        cardinality="inside `<ldap>`, one or more",
        required="<ldap> needs at least one <server>ldap://host:port</server>",
        comment="Tried in order until one answers.",
        doc="An LDAP URL, `ldap://host[:port]`, `ldaps://host[:port]` or `ldapi://socket`. "
            "Servers are tried in the order given until one answers.",
    )
    base_dn: str = attr(
        "base", "", kind=DN(), required="<ldap> needs a 'base' attribute",
        doc="Base DN of the directory, e.g. `dc=example,dc=com`.",
    )
    bind_dn: str = attr(
        "bind-dn", "", kind=DN(), default_doc="none (anonymous)",
        doc="DN mlink binds as to search users and read credentials.",
    )
    bind_password: str = attr(
        "bind-password", "", kind=Raw(), default_doc="none",
        doc="Password for `bind-dn`. Prefer `bind-password-file`, or make the configuration "
            "file readable only by mlink.",
    )
    users_dn: str = attr(
        "users", "", kind=DN(), default_doc="`ou=People,<base>`",
        default_from=lambda chk, v: f"ou=People,{v['base_dn']}",
        doc="Subtree searched for users.",
    )
    jid_attribute: str = attr(
        "jid-attribute", "mail", kind=Str(),
        doc="Attribute holding a user's bare JID (`user@domain`).",
    )
    user_filter: str = attr(
        "filter", "(objectClass=inetOrgPerson)", kind=SimpleFilter(),
        doc="LDAP filter that an entry must also match to be an XMPP user; must be a "
            "parenthesised filter.",
    )
    password_policy: str = attr(
        "password-policy", "", kind=DN(), default_doc="none (each user's pwdPolicySubentry)",
        hide_default=True,
        doc="DN of the password policy entry (slapd's ppolicy `olcPPolicyDefault`) whose "
            "rules SCRAM logins follow: lockout, expiry, expiry warnings.",
        why="PLAIN is checked by a bind, where the directory applies its policy itself; "
            "SCRAM never binds, so mlink reads the same policy and applies it.",
    )
    disabled_filter: str = attr(
        "disabled-filter", "", kind=Filter(), default_doc="none", hide_default=True,
        doc="An LDAP filter matching disabled accounts, refused by every mechanism, e.g. "
            "Active Directory's `(userAccountControl:1.2.840.113556.1.4.803:=2)`.",
    )
    scram_attribute: str = attr(
        "scram-attribute", "authPassword", kind=Str(),
        doc="Attribute holding SCRAM secrets (RFC 3112 `authPassword` syntax), used for "
            "SCRAM-SHA-1/SCRAM-SHA-256 without knowing the password.",
    )
    pool_size: int = attr(
        "pool-size", 8, kind=Int(1, MAX_LDAP_POOL_SIZE),
        doc=f"Connections kept open to the LDAP server, 1..{MAX_LDAP_POOL_SIZE}.",
        why="A few dozen connections is already more than one mlink process can keep busy, "
            'and a typo like pool-size="8000" should not open thousands.',
    )
    timeout: float = attr(
        "timeout", 5.0, kind=PositiveFloat(),
        doc="Seconds to wait for the LDAP server per operation; positive. When it expires, "
            'authentication fails with a temporary error, not "wrong password".',
    )
    # Where `bind_password` was read from (`bind-password-file`): kept so
    # that a written-out configuration names the file, not the password.
    bind_password_file: Path | None = None


@dataclass(frozen=True, slots=True)
class EmbeddedConfig(Frozen):
    XML: ClassVar[ElementSpec] = ElementSpec(
        "embedded", 'inside `<directory backend="embedded">`, at most once',
    )
    file: Path = attr(
        "file", Path("directory.ldif"), kind=PathKind(),
        default_from=lambda chk, v: absolute_path(chk.base / "directory.ldif"),
        doc="The LDIF file holding users. Relative to the configuration file. Need not "
            "exist yet.",
    )
    base_dn: str = attr(
        "base", "dc=localhost", kind=DN(),
        default_from=lambda chk, v: base_dn_for_domain(v["domains"][0]),
        default_doc="from the first domain: `example.com` → `dc=example,dc=com`, `localhost` "
                    "→ `dc=localhost`",
        doc="Base DN of the entries in the file. Users are under `ou=People,<base>`. Keeping "
            "LDAP's shape means the file can be loaded into OpenLDAP with `slapadd` later.",
    )


_LDAP_EXAMPLE = """\
To use an LDAP server instead:
<directory backend="ldap">
  <ldap base="dc=example,dc=com" bind-dn="cn=mlink,dc=example,dc=com"
        bind-password-file="ldap-password" users="ou=People,dc=example,dc=com"
        jid-attribute="mail" filter="(objectClass=inetOrgPerson)"
        scram-attribute="authPassword" pool-size="8" timeout="5">
    <server>ldap://127.0.0.1:389</server>
  </ldap>
</directory>"""


# How often the directory's change feed looks for changes (kept equal to
# mlink.directory.port.DEFAULT_CHANGES_SECONDS), and the floor below which
# polling would only load the directory server.
DEFAULT_DIRECTORY_CHANGES_SECONDS = 3.0
MIN_DIRECTORY_CHANGES_SECONDS = 0.2


@dataclass(frozen=True, slots=True)
class DirectoryConfig(Frozen):
    XML: ClassVar[ElementSpec] = ElementSpec(
        "directory", "at most once",
        doc="Where users and their credentials live. Omitted: the embedded backend with its "
            "defaults.",
        notes="Its one child must match the backend: `<embedded>` for `embedded` (optional), "
              "`<ldap>` for `ldap` (required). Giving the other one is an error.",
        comment="Where users and their credentials live.",
        example=_LDAP_EXAMPLE,
        example_when=lambda d: d.backend == "embedded",
    )
    backend: str = attr(
        "backend", "embedded",
        kind=Choice(BACKENDS, "unknown directory backend {value!r} (use embedded or ldap)"),
        doc="`embedded`: users in an LDIF file managed by mlink. `ldap`: users in an LDAP "
            "server.",
    )
    embedded: EmbeddedConfig = section(
        EmbeddedConfig, "embedded",
        only_if=lambda v: v["backend"] == "embedded",
        not_applicable='<embedded> does not apply with backend="{backend}"',
    )
    ldap: LDAPConfig = section(
        LDAPConfig, "ldap",
        only_if=lambda v: v["backend"] == "ldap",
        not_applicable='<ldap> does not apply with backend="{backend}"',
        required='backend="ldap" needs an <ldap> element',
        required_if=lambda v: v["backend"] == "ldap",
    )
    changes_seconds: float = attr(
        "changes-seconds", DEFAULT_DIRECTORY_CHANGES_SECONDS,
        kind=FloatAtLeast(MIN_DIRECTORY_CHANGES_SECONDS), hide_default=True,
        doc="How often the directory's change feed looks for changes: static rosters and "
            "group memberships edited in the directory reach online users within it.",
        why="A few seconds: one indexed LDAP search per poll and shard; a smaller value "
            "would only load the directory server.",
    )


# -- where the configuration is held ---------------------------------------------------

# `file`: this file holds everything. `directory`: this file only says how to
# reach the directory and which server entry to read (mlink.config_directory).
CONFIG_SOURCES = ("file", "directory")


@dataclass(frozen=True, slots=True)
class ConfigurationSourceConfig(Frozen):
    XML: ClassVar[ElementSpec] = ElementSpec(
        "configuration", "at most once",
        doc="Where the rest of the configuration is held. Omitted: in this file.",
        notes='With `source="directory"` this file holds only `<configuration>`, '
              "`<directory>` (how to reach the directory; `<embedded>` then needs its "
              "`base`) and `<data>`; every other setting is read from the server entry "
              "`entry` and its children, and changes made there apply live. See "
              "docs/directory.md.",
    )
    source: str = attr(
        "source", "file",
        kind=Choice(CONFIG_SOURCES, "'source' on <configuration> must be file or directory, "
                                    "not {value!r}"),
        doc="`file`: everything is in this file. `directory`: the server entry in the "
            "directory holds the configuration.",
        why="A file is what a small standalone server needs; the directory is where a "
            "managed deployment (several servers, one administration) keeps it.",
    )
    entry: str = attr(
        "entry", "", kind=DN(), default_doc="none",
        required='source="directory" needs an \'entry\' attribute: the DN of the server '
                 "entry (like cn=xmpp1,ou=Servers,dc=example,dc=com)",
        required_if=lambda v: v["source"] == "directory",
        doc="The DN of the server entry (object class `mlinkServer`). Several servers may "
            "name the same entry (a cluster) or each its own.",
    )


# -- limits -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimitsConfig(Frozen):
    XML: ClassVar[ElementSpec] = ElementSpec(
        "limits", "at most once",
        doc="Protection against memory, flooding, guessing and slow-client attacks, per "
            "connection, address and account; docs/security.md compares them with Prosody's "
            "and ejabberd's. Changed limits apply to connections made after a reload.",
        comment="Per-connection protection: largest stanza in bytes, deepest\n"
                "element nesting, seconds allowed to authenticate; messages kept\n"
                "per offline user. More limits (authentication, connections per\n"
                "address, resources, stanza rate, quotas): docs/security.md.",
    )
    max_stanza_bytes: int = attr(
        "stanza-bytes", DEFAULT_MAX_STANZA_BYTES, kind=Int(MIN_STANZA_BYTES),
        default_doc="`262144` (256 KiB)",
        doc=f"Largest stanza accepted, in bytes; at least {MIN_STANZA_BYTES}. Larger stanzas "
            "close the stream with `policy-violation`.",
        why="RFC 6120 §13.12 asks servers to accept stanzas of at least 10,000 bytes; 256 KiB "
            "leaves room for avatars in vCards and large forms while bounding the memory one "
            "connection can pin.",
    )
    max_depth: int = attr(
        "depth", DEFAULT_MAX_DEPTH, kind=Int(1),
        doc="Deepest element nesting accepted within a stream; at least 1.",
        why="Real stanzas nest a dozen levels at most (forms in pubsub in iq); 64 stops a "
            "deep-nesting attack long before it costs anything.",
    )
    auth_timeout: float = attr(
        "auth-timeout", DEFAULT_AUTH_TIMEOUT, kind=PositiveFloat(),
        doc="Seconds an unauthenticated connection has to finish TLS, SASL and resource "
            "binding; positive, may be fractional.",
        why="As Prosody's c2s_timeout: long enough for a slow mobile link, short enough that "
            "idle sockets cannot pile up.",
    )
    max_offline_messages: int = attr(
        "offline-limit", DEFAULT_MAX_OFFLINE_MESSAGES, kind=Int(0),
        doc="Messages stored per user while the user is offline (XEP-0160); past it, senders "
            "get `service-unavailable`. `0` stores none.",
        why="As Prosody's default: enough for a weekend away, small enough that one spammer "
            "cannot fill the store for a user.",
    )
    max_output_bytes: int = attr(
        "output-bytes", DEFAULT_MAX_OUTPUT_BYTES, kind=Int(MIN_OUTPUT_BYTES),
        doc="Bytes queued for one client and not yet taken by it; past it the session ends "
            "with `policy-violation`, and what was not written goes to offline storage or "
            "back to its sender. A single result larger than this is answered with "
            "`resource-constraint` instead of ending the session.",
        why="A client that stops reading may not pin more of our memory; 4 MiB holds many "
            "large stanzas, as Prosody ends slow clients.",
    )
    auth_failures_per_stream: int = attr(
        "auth-failures-per-stream", DEFAULT_AUTH_FAILURES_PER_STREAM, kind=Int(1),
        hide_default=True,
        doc="SASL failures one stream may have; the last one is followed by a "
            "`policy-violation` stream error. Failures that are the server's fault "
            "(`temporary-auth-failure`) do not count.",
        why="RFC 6120 §6.4.5 asks servers to allow at least 2 and no more than 5 retries; 5 "
            "failures leave room for a client that tries SCRAM-PLUS, SCRAM and PLAIN with one "
            "mistyped password and still bound guessing on one stream.",
    )
    auth_free_failures: int = attr(
        "auth-free-failures", DEFAULT_AUTH_FREE_FAILURES, kind=Int(0), hide_default=True,
        doc="Failed authentications (`not-authorized`) an address, or an account, may have "
            "before each further attempt is delayed, the delay doubling from half a second "
            "with every further failure up to `auth-max-delay`. Counted per shard, in memory.",
        why="A few typos cost nothing; a guessing run slows down at once. Per account as well "
            "as per address, so that guessing one password from many addresses is slowed too.",
    )
    auth_max_delay: float = attr(
        "auth-max-delay", DEFAULT_AUTH_MAX_DELAY, kind=FloatAtLeast(0), hide_default=True,
        doc="Longest delay, in seconds, before a credential check of a penalised address or "
            "account; `0` turns the delays off.",
        why="Ten seconds makes guessing slow while a user whose account is under attack can "
            "still log in (a lockout would hand the attacker a denial of service).",
    )
    auth_forget_seconds: float = attr(
        "auth-forget-seconds", DEFAULT_AUTH_FORGET_SECONDS, kind=PositiveFloat(), hide_default=True,
        doc="One recorded failure of an address or account is forgotten per this many seconds.",
        why="A minute: a user who mistyped a few times is back to no delay within minutes; a "
            "guesser keeps paying.",
    )
    connections_per_address: int = attr(
        "connections-per-address", DEFAULT_CONNECTIONS_PER_ADDRESS, kind=Int(0), hide_default=True,
        doc="Connections one IP address (an IPv6 /64) may hold at once, per shard; more are "
            "closed at accept. `0`: no limit. Loopback and WebSocket trusted proxies are exempt "
            "while `exempt-loopback` is true (proxies always).",
        why="Generous for a NAT with many users behind one address, small enough that one "
            "host cannot take the server's file descriptors.",
    )
    unauthenticated_per_address: int = attr(
        "unauthenticated-per-address", DEFAULT_UNAUTHENTICATED_PER_ADDRESS, kind=Int(0),
        hide_default=True,
        doc="Connections from one IP address (an IPv6 /64) that have not authenticated yet, per "
            "shard; more are closed at accept. `0`: no limit.",
        why="Clients authenticate within a second of connecting; ten lets a household "
            "reconnect at once, and stops one host from holding thousands of idle sockets.",
    )
    exempt_loopback: bool = attr(
        "exempt-loopback", True, kind=Bool(), hide_default=True,
        doc="Whether connections from this machine (127.0.0.0/8, ::1) are exempt from the "
            "per-address limits, the address part of the authentication delays and the stanza "
            "rate.",
        why="A reverse proxy or TLS terminator on this machine makes every client look local; "
            "local bots, gateways and benchmarks are trusted.",
    )
    max_resources: int = attr(
        "max-resources", DEFAULT_MAX_RESOURCES, kind=Int(0), hide_default=True,
        doc="Resources one account may bind at once (on every shard together); one more bind "
            "is refused with `resource-constraint` (RFC 6120 §7.6.2.1). Replacing a session "
            "with the same resource is always allowed. `0`: no limit.",
        why="Prosody's max_resources default and ejabberd's example max_user_sessions: enough "
            "for every device a person has.",
    )
    stanza_rate: float = attr(
        "stanza-rate", DEFAULT_STANZA_RATE, kind=FloatAtLeast(0), hide_default=True,
        doc="Stanzas per second one session may send on average (a token bucket); above it "
            "the server stops reading from the session until the rate is met again: nothing is "
            "dropped. `0`: no limit.",
        why="About Prosody's suggested 10 kB/s for c2s in stanzas; far above what a person "
            "types, low enough that one client cannot flood a shard.",
    )
    stanza_burst: int = attr(
        "stanza-burst", DEFAULT_STANZA_BURST, kind=Int(1), hide_default=True,
        doc="Stanzas a session may send at once before `stanza-rate` applies (the bucket's "
            "size).",
        why="A login sends roster, disco and presence requests and perhaps a hundred room "
            "joins at once; that must not wait.",
    )
    read_timeout: float = attr(
        "read-timeout", DEFAULT_READ_TIMEOUT, kind=PositiveFloat(), hide_default=True,
        doc="Seconds a stanza may take from its first byte to its last; a stanza still "
            "incomplete then ends the stream with `connection-timeout`. A session idle between "
            "stanzas is never timed out by this.",
        why="A full-size stanza arrives in well under a minute on any working link; a client "
            "that sends half a stanza and stalls (slowloris) is cut within one.",
    )
    max_roster_items: int = attr(
        "roster-items", DEFAULT_MAX_ROSTER_ITEMS, kind=Int(0), hide_default=True,
        doc="Personal roster items one user may have (items from directory groups are not "
            "counted); a roster set or subscription request adding one more is refused with "
            "`not-allowed`. `0`: no limit.",
        why="Far more contacts than people keep; small enough that a roster result stays well "
            "within the 4 MiB a session may have queued.",
    )
    max_private_bytes: int = attr(
        "private-bytes", DEFAULT_MAX_PRIVATE_BYTES, kind=Int(0), hide_default=True,
        default_doc="`1048576` (1 MiB)",
        doc="Bytes of private XML storage (XEP-0049) one user may keep, keys included; a set "
            "beyond it is refused with `not-allowed`. `0`: no limit.",
        why="Bookmarks of hundreds of rooms and client settings fit many times over; a result "
            "holding all of it stays well within the 4 MiB a session may have queued.",
    )


# -- profiles ---------------------------------------------------------------------------


def _finish_field(chk: Checker, elem: Element | None, parent: Element, f: ProfileFieldConfig,
                  values: Mapping[str, Any]) -> ProfileFieldConfig:
    where = elem if elem is not None else parent
    if f.policy == "static":
        if f.value is None:
            chk.fail(where, f"static field {f.name!r} needs a 'value'")
        if f.attribute is not None:
            chk.fail(where, f"static field {f.name!r} is not read from the directory: "
                            "'attribute' does not apply")
    elif f.value is not None:
        chk.fail(where, f"'value' applies only to policy=\"static\", not {f.policy!r}")
    if f.policy == "local" and f.attribute is not None:
        chk.fail(where, f"local field {f.name!r} is never sent to the directory: "
                        "'attribute' does not apply")
    return f


@dataclass(frozen=True, slots=True)
class ProfileFieldConfig(Frozen):
    """One profile field's source (white paper, "Operational Model")."""

    XML: ClassVar[ElementSpec] = ElementSpec("field", "inside `<profiles>`", finish=_finish_field)
    name: str = attr(
        "name", kind=FieldName(),
        required="<field> needs a 'name' attribute (an XEP-0154 field name)",
        doc="XEP-0154 field name (`display_name`, `mobile`, `photo_data`, ...): lower-case "
            "letters, digits and `_`. Unknown names are reported at startup by the profile "
            "module.",
    )
    policy: str = attr(
        "policy",
        kind=Choice(PROFILE_POLICIES,
                    "unknown policy {value!r} for field {name!r} (use {hint})"),
        required="<field name={name!r}> needs a 'policy' (" + ", ".join(PROFILE_POLICIES) + ")",
        doc="`directory` (read from the directory, clients may not change it), `update` (read "
            "from it, client changes written back), `static` (one value for everyone), `local` "
            "(kept by mlink, never sent to the directory).",
    )
    attribute: str | None = attr(
        "attribute", None, kind=AttributeName(), default_doc="the field's default mapping",
        doc="LDAP attribute name or OID, for `directory` and `update` only.",
    )
    value: str | None = attr(
        "value", None, kind=Raw(), default_doc="none",
        doc="The value every user gets; required with `static`, refused otherwise.",
    )


def _check_fields(chk: Checker, items: list[tuple[Element, ProfileFieldConfig]]) -> None:
    first_line: dict[str, int | None] = {}
    for elem, f in items:
        if f.name in first_line:
            chk.fail(elem, f"field {f.name!r} given twice (first at line {first_line[f.name]})")
        first_line[f.name] = chk.line(elem)


def _largest_photo(values: Mapping[str, Any]) -> int:
    most, per = BASE64_RATIO
    limits = values.get("limits", LimitsConfig())
    return int(limits.max_stanza_bytes * most // per)


def _finish_profiles(chk: Checker, elem: Element | None, parent: Element, p: ProfilesConfig,
                     values: Mapping[str, Any]) -> ProfilesConfig:
    largest = _largest_photo(values)
    if elem is not None and p.max_photo_bytes > largest:
        limits = values.get("limits", LimitsConfig())
        chk.fail(elem, f"'max-photo-bytes' {p.max_photo_bytes} cannot fit in a stanza once "
                       f"base64-encoded: at most {largest} with stanza-bytes="
                       f"{limits.max_stanza_bytes} in <limits>")
    return p


_PROFILES_EXAMPLE = """\
<profiles cache-seconds="60" max-photo-bytes="196608">
  <field name="display_name" policy="directory"/>
  <field name="mobile" policy="update" attribute="mobile"/>
  <field name="org_name" policy="static" value="Example Corp"/>
  <field name="nickname" policy="local"/>
</profiles>"""


@dataclass(frozen=True, slots=True)
class ProfilesConfig(Frozen):
    """Per-field mapping and policy; fields not listed take the defaults of
    `mlink.profile.fields` (XEP-0154's LDAP mapping, local where none)."""

    XML: ClassVar[ElementSpec] = ElementSpec(
        "profiles", "at most once", finish=_finish_profiles,
        doc="Where each profile field (vCard, XEP-0154, avatar) comes from and who may change "
            "it; see [directory.md](directory.md) for the mapping and the policies. Omitted: "
            "every field takes its default (XEP-0154's LDAP attribute with policy `directory`, "
            "`local` where there is none). Policies apply live on reload.",
        notes="Children: any number of `<field>`, each field name at most once.",
        comment="Profiles (vCard, XEP-0154, avatars): per field, who owns it.\n"
                "directory = read from the directory, clients may not change it;\n"
                "update = read from it, client changes written back to it;\n"
                "static = one value for everyone; local = kept by mlink.",
        example=_PROFILES_EXAMPLE,
    )
    fields: tuple[ProfileFieldConfig, ...] = sections(
        ProfileFieldConfig, "field", check=_check_fields)
    cache_seconds: float = attr(
        "cache-seconds", DEFAULT_PROFILE_CACHE_SECONDS, kind=PositiveFloat(),
        doc="How long a profile read from the directory is served from memory; a change made "
            "directly in the directory shows within this time. Positive.",
        why="Changes made directly in the directory show within a minute, while a busy "
            "roster's vCard fetches hit LDAP rarely.",
    )
    max_photo_bytes: int = attr(
        "max-photo-bytes", DEFAULT_MAX_PHOTO_BYTES, kind=Int(1),
        default_from=lambda chk, v: min(DEFAULT_MAX_PHOTO_BYTES, _largest_photo(v)),
        default_doc="`196608` (192 KiB), or 3/4 of `stanza-bytes` if that is less",
        doc="Largest photo (`jpegPhoto`, avatar) accepted. At most 3/4 of `<limits "
            "stanza-bytes>`: base64 makes it 4/3 larger, and a photo that cannot fit in a "
            "stanza could never be sent.",
        why="jpegPhoto values are avatars, not photo albums: 192 KiB fits any sensible avatar "
            "and, base64-encoded, still fits the default 256 KiB stanza.",
    )


# -- rosters -------------------------------------------------------------------------


def _finish_group(chk: Checker, elem: Element | None, parent: Element, g: RosterGroupConfig,
                  values: Mapping[str, Any]) -> RosterGroupConfig:
    where = elem if elem is not None else parent
    if (g.dn is None) == (g.filter is None):
        chk.fail(where, "<group> needs either 'dn' (one group) or 'filter' "
                        "(every group it finds), not both")
    if g.dn is not None and g.base is not None:
        chk.fail(where, "'base' applies to a <group filter=...>, not to one dn")
    if elem is not None and g.name is not None and elem.get("name-attribute") is not None:
        chk.fail(where, "give 'name' (a literal roster group name) or 'name-attribute', "
                        "not both")
    return g


@dataclass(frozen=True, slots=True)
class RosterGroupConfig(Frozen):
    """A directory group (or every group a filter finds) whose members all
    see each other in their rosters (roster pre-population)."""

    XML: ClassVar[ElementSpec] = ElementSpec(
        "group", "inside `<rosters>`", finish=_finish_group,
        notes="The same group (`dn`, or `filter` and `base`) twice is an error. Members come "
              "from `member`, `uniqueMember` and `memberUid`.",
    )
    dn: str | None = attr("dn", None, kind=DN(), default_doc="",
                          doc="One group entry. Give `dn` or `filter`, not both.")
    filter: str | None = attr(
        "filter", None, kind=Filter(), default_doc="",
        doc="Every entry this LDAP filter (RFC 4515, checked when the file is read) finds "
            "below `base`.",
    )
    base: str | None = attr("base", None, kind=DN(), default_doc="`ou=Groups,<base DN>`",
                            doc="Search base for `filter`; not with `dn`.")
    name_attribute: str = attr(
        "name-attribute", "cn", kind=AttributeName(), hide_default=True,
        doc="Attribute of the group whose first value is the roster group name.",
    )
    name: str | None = attr("name", None, kind=Str(), default_doc="",
                            doc="A literal roster group name instead; not with "
                                "`name-attribute`.")


def _check_groups(chk: Checker, items: list[tuple[Element, RosterGroupConfig]]) -> None:
    from mlink.directory.names import normalize_dn

    first_line: dict[tuple[str, str, str], int | None] = {}
    for elem, g in items:
        key = (normalize_dn(g.dn or ""), g.filter or "", normalize_dn(g.base or ""))
        if key in first_line:
            chk.fail(elem, f"the same <group> is given twice (first at line {first_line[key]})")
        first_line[key] = chk.line(elem)


_ROSTERS_EXAMPLE = """\
<rosters refresh-seconds="300" static-attribute="mlinkRosterItem">
  <group dn="cn=sales,ou=Groups,dc=example,dc=com"/>
  <group filter="(objectClass=groupOfNames)" name-attribute="description"/>
</rosters>"""


@dataclass(frozen=True, slots=True)
class RostersConfig(Frozen):
    XML: ClassVar[ElementSpec] = ElementSpec(
        "rosters", "at most once",
        doc="Directory groups whose members see each other in their rosters, and where "
            "personal rosters are kept; see [directory.md](directory.md).",
        notes="Children: any number of `<group>`.",
        comment="Rosters from the directory: members of each group see each other;\n"
                "static-attribute keeps personal rosters in the users' entries.",
        example=_ROSTERS_EXAMPLE,
    )
    groups: tuple[RosterGroupConfig, ...] = sections(
        RosterGroupConfig, "group", check=_check_groups)
    refresh_seconds: float = attr(
        "refresh-seconds", DEFAULT_GROUP_REFRESH_SECONDS, kind=PositiveFloat(),
        doc="How often the groups are read again; membership changes reach online users "
            "within this time. Positive.",
        why="Five minutes: a change of department is not urgent, and a 5,000-member group "
            "costs a few paged searches.",
    )
    # Static rosters: keep each user's personal roster in their directory
    # entry (this attribute) instead of mlink's store; None = the store.
    static_attribute: str | None = attr(
        "static-attribute", None, kind=AttributeName(),
        default_doc="none (rosters in mlink's store)",
        doc="Keep each user's personal roster in this attribute of their directory entry "
            "(`mlinkRosterItem` from the mlink schema), one value per contact.",
    )


# -- modules ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModuleEntry(Frozen):
    """One `<module>` element as written (the loader turns the list into
    `Config.modules` and `Config.module_options`)."""

    XML: ClassVar[ElementSpec] = ElementSpec(
        "module", "inside `<modules>`, any number",
        notes="Children: the module's options, one element per option holding its value as "
              "text (`<max-messages>200</max-messages>`), as the module's `OPTIONS` class "
              "declares them. Options given to a module without `OPTIONS` are an error.",
    )
    name: str = attr(
        "name", kind=Str(), required="<module> needs a 'name' attribute",
        doc="A default module's name (`carbons`), meaning `mlink.modules.<name>`, or the "
            "dotted import path of another module (`example.mymodule`).",
    )
    enabled: bool = attr(
        "enabled", True, kind=Bool(),
        doc="`false` turns a default module off. A module that is not a default is enabled "
            "by being listed.",
    )


def _parse_modules(chk: Any, elem: Element | None, values: Mapping[str, Any]) -> Any:
    return chk.modules(elem)


# -- the whole file ---------------------------------------------------------------------


def _check_domains(chk: Checker, items: list[tuple[Element, str]]) -> None:
    first_line: dict[str, int | None] = {}
    for elem, domain in items:
        if domain in first_line:
            chk.fail(elem, f"domain {domain!r} given twice (first at line {first_line[domain]})")
        first_line[domain] = chk.line(elem)


_MODULES_EXAMPLE = """\
<modules>
  <module name="carbons" enabled="false"/>
  <module name="offline"><max-messages>200</max-messages></module>
  <module name="example.mymodule"/>
</modules>"""


@dataclass(frozen=True, slots=True)
class Config(Frozen):
    XML: ClassVar[ElementSpec] = ElementSpec("mlink", "root, required",
                                             finish=_finish_config)

    path: Path | None = not_in_file()
    domains: tuple[str, ...] = texts(
        "domain", kind=Domain(), cardinality="one or more, required",
        required="no <domain>: at least one domain must be served", check=_check_domains,
        comment="The XMPP domains served: users are user@domain. One or more.",
        doc="Text content: an XMPP service domain this server hosts; users are "
            "`user@domain`. At least one is required; the same domain twice is an error.\n\n"
            "Domains are normalised as RFC 7622 domainparts: surrounding whitespace and a "
            "trailing dot are removed, case is folded, and internationalised names are "
            "converted with IDNA to their ASCII form (`bücher.de` becomes `xn--bcher-kva.de`), "
            "the form in which the server compares JIDs. Each label must be letters, digits "
            "and inner hyphens, at most 63 characters; the whole name at most 253. IP "
            "addresses are not accepted.\n\n"
            "The first domain also provides the default base DN of the embedded directory.",
    )
    listeners: tuple[ListenerConfig, ...] = sections(
        ListenerConfig, "listen", required="no <listen>: the server would accept no connections",
        check=_check_listeners,
    )
    tls: TLSConfig = section(TLSConfig, "tls")
    configuration: ConfigurationSourceConfig = section(
        ConfigurationSourceConfig, "configuration", hide_default=True)
    directory: DirectoryConfig = section(DirectoryConfig, "directory")
    limits: LimitsConfig = section(LimitsConfig, "limits")
    websocket: WebSocketConfig = section(WebSocketConfig, "websocket")
    caches: CachesConfig = section(CachesConfig, "caches", hide_default=True)
    profiles: ProfilesConfig = section(ProfilesConfig, "profiles")
    rosters: RostersConfig = section(RostersConfig, "rosters")
    console: ConsoleConfig = section(ConsoleConfig, "console")
    components: ComponentsConfig = section(ComponentsConfig, "components")
    # Enabled module names in load order (see `mlink.config.load_config`).
    modules: tuple[str, ...] = custom(
        "modules", DEFAULT_MODULES, parse=_parse_modules, cardinality="at most once",
        doc="Which feature modules run, and their options. Omitted: the default set, "
            "in this order: " + ", ".join(f"`{m}`" for m in DEFAULT_MODULES) + ". Modules "
            "load in that order minus the disabled ones, then the other listed modules in "
            "file order. Module options apply live on reload; the module list needs a "
            "restart.",
        example=_MODULES_EXAMPLE,
    )
    # Module name -> its parsed OPTIONS instance, for enabled modules that
    # define OPTIONS.
    module_options: Mapping[str, object] = field(
        default_factory=lambda: MappingProxyType({}))
    data_dir: Path = attr(
        "dir", Path("."), kind=PathKind(), element="data",
        comment="Where the server keeps its state (rosters, offline messages).",
        default_from=lambda chk, v: absolute_path(chk.base),
        default_doc="the configuration file's directory",
        doc="Where the server keeps its state (rosters, offline messages and the like). "
            "Relative to the configuration file.",
    )
    log_level: str = attr(
        "level", "info", element="log", comment="debug, info, warning, error or critical.",
        kind=Choice(LOG_LEVELS, "'level' on <log> must be one of {hint}", lower=True),
        doc="`debug`, `info`, `warning`, `error` or `critical` (case-insensitive). Applies "
            "live on reload.",
    )

    log_file: Path | None = attr(
        "file", None, kind=PathKind(), element="log", default_doc="standard error",
        doc="Write the log to this file (appended; relative to the configuration file) "
            "instead of standard error, which is what journald collects under systemd. "
            "SIGUSR1 makes the server reopen it after logrotate moved it away. Needs a "
            "restart to change.",
    )

    def __post_init__(self) -> None:
        Frozen.__post_init__(self)
        if isinstance(self.module_options, dict):
            object.__setattr__(self, "module_options", MappingProxyType(dict(self.module_options)))
