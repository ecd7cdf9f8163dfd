"""The configuration as the server sees it, whatever file it came from.

`mlink.config.load_config(path)` fills these from the XML file; tests and
tools may build them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# RFC 6120 §13.12 asks servers to accept stanzas of at least 10,000 bytes;
# 256 KiB leaves room for avatars in vCards and large forms while bounding
# the memory one connection can pin.
DEFAULT_MAX_STANZA_BYTES = 256 * 1024
# Real stanzas nest a dozen levels at most (forms in pubsub in iq); 64 stops
# a deep-nesting attack long before it costs anything.
DEFAULT_MAX_DEPTH = 64
# An unauthenticated connection has this long to finish SASL and bind, as
# Prosody's c2s_timeout: long enough for a slow mobile link, short enough
# that idle sockets cannot pile up.
DEFAULT_AUTH_TIMEOUT = 60.0
# Messages stored per user while offline (XEP-0160), as Prosody's default:
# enough for a weekend away, small enough that one spammer cannot fill the
# store for a user; past it, senders get service-unavailable.
DEFAULT_MAX_OFFLINE_MESSAGES = 100


@dataclass(slots=True)
class ListenerConfig:
    # "c2s" (STARTTLS), "tls" (direct TLS, XEP-0368), "websocket" (RFC 7395
    # over plain HTTP) or "websocket-tls" (RFC 7395 over HTTPS: wss://)
    kind: str
    port: int
    address: str = "0.0.0.0"


@dataclass(slots=True)
class TLSConfig:
    certificate: Path | None = None
    key: Path | None = None
    # RFC 6120 §5.3.1: servers should require TLS before SASL.
    required: bool = True


@dataclass(slots=True)
class WebSocketConfig:
    """XMPP over WebSocket (RFC 7395) settings shared by the websocket listeners."""

    # Origin values (scheme://host[:port], lower case) whose pages may open
    # the endpoint; empty allows every origin.
    origins: list[str] = field(default_factory=list)
    # Addresses or networks of TLS-terminating reverse proxies: a plain ws://
    # stream from them counts as encrypted, as one from loopback does.
    trusted_proxies: list[str] = field(default_factory=list)
    # RFC 7395 §3.6.1: when set, every stream is redirected here.
    see_other_uri: str | None = None


@dataclass(slots=True)
class LDAPConfig:
    servers: list[str] = field(default_factory=lambda: ["ldap://127.0.0.1:389"])
    base_dn: str = ""
    bind_dn: str = ""
    bind_password: str = ""
    users_dn: str = ""  # defaults to ou=People,<base_dn> when empty
    jid_attribute: str = "mail"
    user_filter: str = "(objectClass=inetOrgPerson)"
    scram_attribute: str = "authPassword"
    pool_size: int = 8
    timeout: float = 5.0


@dataclass(slots=True)
class EmbeddedConfig:
    file: Path = Path("directory.ldif")
    base_dn: str = "dc=localhost"


@dataclass(slots=True)
class DirectoryConfig:
    backend: str = "embedded"  # "embedded" or "ldap"
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)
    ldap: LDAPConfig = field(default_factory=LDAPConfig)


@dataclass(slots=True)
class LimitsConfig:
    max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES
    max_depth: int = DEFAULT_MAX_DEPTH
    auth_timeout: float = DEFAULT_AUTH_TIMEOUT
    max_offline_messages: int = DEFAULT_MAX_OFFLINE_MESSAGES


@dataclass(slots=True)
class Config:
    path: Path | None
    domains: list[str]
    listeners: list[ListenerConfig]
    tls: TLSConfig = field(default_factory=TLSConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    data_dir: Path = Path(".")
    log_level: str = "info"
