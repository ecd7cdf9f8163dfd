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


# How often the directory's change feed looks for changes (static rosters
# and group memberships edited in the directory reach online users within
# it): a few seconds; one indexed LDAP search per poll and shard.
# (Kept equal to mlink.directory.port.DEFAULT_CHANGES_SECONDS.)
DEFAULT_DIRECTORY_CHANGES_SECONDS = 3.0


@dataclass(slots=True)
class DirectoryConfig:
    backend: str = "embedded"  # "embedded" or "ldap"
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)
    ldap: LDAPConfig = field(default_factory=LDAPConfig)
    changes_seconds: float = DEFAULT_DIRECTORY_CHANGES_SECONDS


@dataclass(slots=True)
class LimitsConfig:
    max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES
    max_depth: int = DEFAULT_MAX_DEPTH
    auth_timeout: float = DEFAULT_AUTH_TIMEOUT
    max_offline_messages: int = DEFAULT_MAX_OFFLINE_MESSAGES


@dataclass(slots=True)
class ProfileFieldConfig:
    """One profile field's source (white paper, "Operational Model")."""

    name: str  # XEP-0154 field name, e.g. "display_name", "mobile", "nickname"
    policy: str  # "directory" | "update" | "static" | "local"
    attribute: str | None = None  # LDAP attribute (directory/update)
    value: str | None = None  # the one value for every user (static)


# How long a profile read from the directory is served from memory before
# the directory is asked again: changes made directly in the directory show
# within a minute, while a busy roster's vCard fetches hit LDAP rarely.
DEFAULT_PROFILE_CACHE_SECONDS = 60.0
# jpegPhoto values are avatars, not photo albums: 192 KiB fits any sensible
# avatar and, base64-encoded (x4/3), still fits the default 256 KiB stanza.
DEFAULT_MAX_PHOTO_BYTES = 192 * 1024


@dataclass(slots=True)
class ProfilesConfig:
    """Per-field mapping and policy; fields not listed take the defaults of
    `mlink.profile.fields` (XEP-0154's LDAP mapping, local where none)."""

    fields: list[ProfileFieldConfig] = field(default_factory=list)
    cache_seconds: float = DEFAULT_PROFILE_CACHE_SECONDS
    max_photo_bytes: int = DEFAULT_MAX_PHOTO_BYTES


# How often directory groups are read again so that membership changes
# reach online users: five minutes, as a change of department is not urgent
# and a 5,000-member group costs a few paged searches.
DEFAULT_GROUP_REFRESH_SECONDS = 300.0


@dataclass(slots=True)
class RosterGroupConfig:
    """A directory group (or every group a filter finds) whose members all
    see each other in their rosters (roster pre-population)."""

    dn: str | None = None  # one group entry
    filter: str | None = None  # or every group matching this under `base`
    base: str | None = None  # search base for `filter` (default ou=Groups,<base>)
    name_attribute: str = "cn"  # where the roster group name comes from
    name: str | None = None  # or this literal name


@dataclass(slots=True)
class RostersConfig:
    groups: list[RosterGroupConfig] = field(default_factory=list)
    refresh_seconds: float = DEFAULT_GROUP_REFRESH_SECONDS
    # Static rosters: keep each user's personal roster in their directory
    # entry (this attribute) instead of mlink's store; None = the store.
    static_attribute: str | None = None


@dataclass(slots=True)
class Config:
    path: Path | None
    domains: list[str]
    listeners: list[ListenerConfig]
    tls: TLSConfig = field(default_factory=TLSConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    profiles: ProfilesConfig = field(default_factory=ProfilesConfig)
    rosters: RostersConfig = field(default_factory=RostersConfig)
    data_dir: Path = Path(".")
    log_level: str = "info"
