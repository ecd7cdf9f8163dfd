"""Read and check mlink's XML configuration file.

Writing it is `mlink.config_render`; `render_config` and `write_config` are
re-exported here so callers have one module for the file format.

The file is read with defusedxml and DTDs are refused outright, so a
configuration copied from an untrusted place cannot expand entities
("billion laughs") or make the server read other files (external
entities). Validation is strict: an unknown element or attribute is an
error rather than being ignored, because a silently ignored typo such as
`requried="true"` would leave the server running with a setting the
administrator believes is off. Every error names the file and the line of
the offending element, on one line, so it can be shown as-is by the CLI.

The format is described in docs/configuration.md.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn
from xml.etree.ElementTree import Element, ParseError, TreeBuilder

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser

from mlink.config_model import (
    Config,
    DirectoryConfig,
    EmbeddedConfig,
    LDAPConfig,
    LimitsConfig,
    ListenerConfig,
    ProfileFieldConfig,
    ProfilesConfig,
    RosterGroupConfig,
    RostersConfig,
    TLSConfig,
    WebSocketConfig,
)
from mlink.config_render import render_config, write_config
from mlink.directory.filters import FilterError, parse_filter
from mlink.directory.names import normalize_dn

__all__ = [
    "ConfigError",
    "LISTENER_DEFAULT_PORTS",
    "LOG_LEVELS",
    "absolute_path",
    "base_dn_for_domain",
    "load_config",
    "normalise_domain",
    "render_config",
    "write_config",
]

# A real configuration is a few kilobytes; refusing anything bigger keeps a
# wrong path (a log file, a disk image) from being read into memory whole.
MAX_CONFIG_BYTES = 1024 * 1024
# A password file holds one line; the same reasoning as MAX_CONFIG_BYTES.
MAX_PASSWORD_FILE_BYTES = 64 * 1024
# RFC 6120 §13.12: a server must accept stanzas of at least 10,000 bytes, so
# a lower limit would break conforming clients.
MIN_STANZA_BYTES = 10_000
# Highest TCP port number (ports are 16-bit); 0 asks the OS for a free port,
# which tests use.
MAX_PORT = 65535
# RFC 1035 §2.3.4 / RFC 7622 §3.2: a DNS label is at most 63 octets and a
# whole name at most 253 in text form (255 on the wire).
MAX_LABEL_LENGTH = 63
MAX_DOMAIN_LENGTH = 253
# Each LDAP connection is a socket and a server-side session; a few dozen is
# already more than one mlink process can keep busy, and a typo like
# pool-size="8000" should not open thousands of connections to the
# directory.
MAX_LDAP_POOL_SIZE = 256
# The directory's change feed polls at most this often: a smaller
# `changes-seconds` would only load the directory server.
MIN_DIRECTORY_CHANGES_SECONDS = 0.2

# Default port per listener type: the IANA ports for xmpp-client and
# xmpps-client (XEP-0368), and Prosody/ejabberd's usual HTTP and HTTPS ports.
LISTENER_DEFAULT_PORTS: dict[str, int] = {
    "c2s": 5222, "tls": 5223, "websocket": 5280, "websocket-tls": 5281,
}
_KINDS_HINT = "c2s, tls, websocket or websocket-tls"
# Listener types that need the certificate of <tls>.
TLS_LISTENER_KINDS = ("tls", "websocket-tls")
# A WebSocket page's Origin (RFC 6454 §6.2): scheme://host[:port], nothing more.
_ORIGIN_RE = re.compile(r"^[a-z][a-z0-9+.-]*://(?:[a-z0-9.-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?$")
# Where RFC 7395 §3.6.1 lets a server send clients: another WebSocket
# endpoint, or a BOSH one.
SEE_OTHER_URI_SCHEMES = ("ws://", "wss://", "http://", "https://")
# The names of Python's logging levels, so the value maps directly.
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
BACKENDS = ("embedded", "ldap")
# Who owns a profile field (white paper, "Operational Model"; docs/directory.md).
PROFILE_POLICIES = ("directory", "update", "static", "local")
# base64 turns 3 bytes into 4: a photo larger than 3/4 of the stanza limit
# could never be sent in a vCard or avatar stanza, so the file is refused.
BASE64_RATIO = (3, 4)
LDAP_URL_SCHEMES = ("ldap://", "ldaps://", "ldapi://")

_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
_UINT_RE = re.compile(r"^[0-9]+$")
_UFLOAT_RE = re.compile(r"^[0-9]+(?:\.[0-9]+)?$")
# XEP-0154 field names: lower case words joined by underscores.
_FIELD_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# An LDAP attribute description without options (RFC 4512 §2.5): a name
# (letter, then letters, digits, hyphens) or a numeric OID.
_ATTRIBUTE_RE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+)$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


def absolute_path(path: Path) -> Path:
    """`path` made absolute and normalised without following symlinks:
    certificate paths such as Let's Encrypt's live/ links must stay links,
    or a renewed certificate would never be picked up."""
    return Path(os.path.abspath(path))


class ConfigError(Exception):
    """A configuration file that cannot be used.

    `str()` is one line, `<file>:<line>: <problem>` (or `<file>: <problem>`
    when no line applies), the form compilers use, so editors can jump to
    it and the CLI can print it unchanged.
    """

    def __init__(self, path: Path | str, line: int | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = " ".join(problem.split())  # keep it to one line
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {self.problem}")


def normalise_domain(raw: str) -> str:
    """The canonical form of a server domain, or ValueError.

    RFC 7622 §3.2 domainparts are compared case-insensitively with a
    trailing dot removed; IDNA (here the stdlib's IDNA 2003 codec, which
    applies nameprep) maps internationalised names to one form. The result
    is the lowercase ASCII (A-label) form, the same form `mlink.jid`
    gives domains of incoming JIDs, so they compare equal.
    """
    name = raw.strip()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("empty domain name")
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        pass
    else:
        raise ValueError(f"{raw!r}: an IP address cannot be an XMPP service domain here")
    try:
        ascii_name = name.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise ValueError(f"{raw!r} is not a valid domain name ({exc})") from None
    if len(ascii_name) > MAX_DOMAIN_LENGTH:
        raise ValueError(f"{raw!r} is longer than {MAX_DOMAIN_LENGTH} characters")
    for label in ascii_name.split("."):
        if len(label) > MAX_LABEL_LENGTH or not _LABEL_RE.match(label):
            raise ValueError(
                f"{raw!r} is not a valid domain name (label {label!r}: use letters, "
                "digits and inner hyphens)"
            )
    # The stream layer compares domains of incoming JIDs, prepared by
    # mlink.jid.prep_domain, with these: both must give the same form.
    from mlink.jid import InvalidJID, prep_domain

    try:
        same = prep_domain(ascii_name) == ascii_name
    except InvalidJID:
        same = False
    if not same:
        raise ValueError(f"{raw!r} is not a valid XMPP domain")
    return ascii_name


def base_dn_for_domain(domain: str) -> str:
    """The conventional LDAP base DN for a domain (RFC 2247 dc= components).

    example.com -> dc=example,dc=com; localhost -> dc=localhost. The ASCII
    (A-label) form is used because DN values with non-ASCII need escaping
    that every LDAP tool handles differently.
    """
    ascii_name = normalise_domain(domain).encode("idna").decode("ascii")
    return ",".join(f"dc={label}" for label in ascii_name.split("."))


class _LineRecordingBuilder:
    """A parser target that builds the tree and remembers each element's line.

    ElementTree drops positions; errors must point at the offending element,
    so at each start tag we read expat's current line, which at that moment
    is the line of the start tag.
    """

    def __init__(self) -> None:
        self._builder = TreeBuilder()
        self.lines: dict[int, int] = {}  # id(element) -> line; the tree keeps them alive
        self.parser: DefusedXMLParser | None = None

    def start(self, tag: str, attrib: dict[str, str]) -> Element:
        elem = self._builder.start(tag, attrib)
        if self.parser is not None:
            self.lines[id(elem)] = self.parser.parser.CurrentLineNumber
        return elem

    def end(self, tag: str) -> Element:
        return self._builder.end(tag)

    def data(self, data: str) -> None:
        self._builder.data(data)

    def close(self) -> Element:
        return self._builder.close()


def _parse_xml(path: Path, data: bytes) -> tuple[Element, dict[int, int]]:
    """Parse `data` with DTDs, entities and external references refused."""
    builder = _LineRecordingBuilder()
    parser = DefusedXMLParser(
        target=builder, forbid_dtd=True, forbid_entities=True, forbid_external=True
    )
    builder.parser = parser
    try:
        parser.feed(data)
        root = parser.close()
    except ParseError as exc:
        line = exc.position[0] if exc.position else None
        # expat's message ends with "line N, column M", which the prefix repeats.
        message = re.sub(r":\s*line \d+, column \d+$", "", str(exc))
        raise ConfigError(path, line, f"XML syntax error: {message}") from None
    except DefusedXmlException as exc:
        line = parser.parser.CurrentLineNumber
        what = type(exc).__name__
        reasons = {
            "DTDForbidden": "DOCTYPE declarations are not allowed in the configuration",
            "EntitiesForbidden": "entity declarations are not allowed in the configuration",
            "ExternalReferenceForbidden": "external entity references are not allowed",
        }
        raise ConfigError(
            path, line, reasons.get(what, f"forbidden XML construct ({what})")
        ) from None
    return root, builder.lines


class _Loader:
    """Turns the parsed tree into a `Config`, checking as it goes."""

    def __init__(self, path: Path, root: Element, lines: dict[int, int]) -> None:
        self.path = path
        self.base = path.parent
        self.root = root
        self.lines = lines

    # -- helpers --------------------------------------------------------

    def line(self, elem: Element) -> int | None:
        return self.lines.get(id(elem))

    def fail(self, elem: Element | None, problem: str) -> NoReturn:
        raise ConfigError(self.path, None if elem is None else self.line(elem), problem)

    def check_shape(
        self,
        elem: Element,
        attributes: Iterable[str],
        children: Iterable[str] = (),
        text: bool = False,
    ) -> None:
        """Refuse attributes, children and text the format does not define."""
        allowed_attrs = set(attributes)
        for name in elem.attrib:
            if name not in allowed_attrs:
                hint = ", ".join(sorted(allowed_attrs)) or "none"
                self.fail(elem, f"unknown attribute {name!r} on <{elem.tag}> (allowed: {hint})")
        allowed_children = set(children)
        for child in elem:
            if child.tag not in allowed_children:
                where = f"inside <{elem.tag}>"
                hint = ", ".join(f"<{c}>" for c in sorted(allowed_children)) or "none"
                self.fail(child, f"unknown element <{child.tag}> {where} (allowed: {hint})")
            if child.tail and child.tail.strip():
                self.fail(child, f"unexpected text {child.tail.strip()[:40]!r} after <{child.tag}>")
        if not text and elem.text and elem.text.strip():
            self.fail(elem, f"<{elem.tag}> takes no text, found {elem.text.strip()[:40]!r}")

    def single(self, parent: Element, tag: str) -> Element | None:
        """The one `tag` child of `parent`; a repeat is an error, not an override."""
        found = parent.findall(tag)
        if len(found) > 1:
            self.fail(found[1], f"<{tag}> given twice (first at line {self.line(found[0])})")
        return found[0] if found else None

    def text_of(self, elem: Element) -> str:
        value = (elem.text or "").strip()
        if not value:
            self.fail(elem, f"<{elem.tag}> is empty")
        return value

    def attr_str(self, elem: Element, name: str, default: str) -> str:
        value = elem.get(name)
        if value is None:
            return default
        value = value.strip()
        if not value:
            self.fail(elem, f"{name!r} on <{elem.tag}> is empty")
        return value

    def attr_int(
        self, elem: Element, name: str, default: int, minimum: int = 1, maximum: int | None = None
    ) -> int:
        raw = elem.get(name)
        if raw is None:
            return default
        raw = raw.strip()
        if not _UINT_RE.match(raw):
            self.fail(elem, f"{name!r} on <{elem.tag}> must be a whole number, not {raw!r}")
        value = int(raw)
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"{minimum}..{maximum}" if maximum is not None else f"at least {minimum}"
            self.fail(elem, f"{name!r} on <{elem.tag}> must be {bounds}, not {value}")
        return value

    def attr_float(self, elem: Element, name: str, default: float) -> float:
        raw = elem.get(name)
        if raw is None:
            return default
        raw = raw.strip()
        if not _UFLOAT_RE.match(raw) or float(raw) <= 0:
            self.fail(elem, f"{name!r} on <{elem.tag}> must be a positive number, not {raw!r}")
        return float(raw)

    def attr_bool(self, elem: Element, name: str, default: bool) -> bool:
        raw = elem.get(name)
        if raw is None:
            return default
        if raw.strip() == "true":
            return True
        if raw.strip() == "false":
            return False
        self.fail(elem, f"{name!r} on <{elem.tag}> must be true or false, not {raw!r}")

    def attr_path(self, elem: Element, name: str) -> Path | None:
        raw = elem.get(name)
        if raw is None:
            return None
        if not raw.strip():
            self.fail(elem, f"{name!r} on <{elem.tag}> is empty")
        return absolute_path(self.base / Path(raw.strip()).expanduser())

    def existing_file(self, elem: Element, name: str) -> Path | None:
        path = self.attr_path(elem, name)
        if path is not None and not path.is_file():
            self.fail(elem, f"{name!r} on <{elem.tag}>: file {str(path)!r} does not exist")
        return path

    def dn(self, elem: Element, name: str, default: str, required: bool = False) -> str:
        if required and elem.get(name) is None:
            self.fail(elem, f"<{elem.tag}> needs a {name!r} attribute")
        value = self.attr_str(elem, name, default)
        if value and "=" not in value:
            self.fail(
                elem, f"{name!r} on <{elem.tag}> is not a DN (like dc=example,dc=com): {value!r}"
            )
        return value

    # -- sections -------------------------------------------------------

    def load(self) -> Config:
        root = self.root
        if root.tag != "mlink":
            self.fail(root, f"the root element must be <mlink>, not <{root.tag}>")
        self.check_shape(
            root,
            attributes=(),
            children=(
                "domain", "listen", "tls", "directory", "limits", "websocket", "data", "log",
                "profiles", "rosters",
            ),
        )
        domains = self.domains(root)
        listeners = self.listeners(root)
        tls = self.tls(root, listeners)
        directory = self.directory(root, domains[0])
        limits = self.limits(root)
        websocket = self.websocket(root)
        profiles = self.profiles(root, limits)
        rosters = self.rosters(root)
        data_dir = absolute_path(self.base)
        data = self.single(root, "data")
        if data is not None:
            self.check_shape(data, ("dir",))
            data_dir = self.attr_path(data, "dir") or data_dir
        log_level = "info"
        log = self.single(root, "log")
        if log is not None:
            self.check_shape(log, ("level",))
            log_level = self.attr_str(log, "level", "info").lower()
            if log_level not in LOG_LEVELS:
                self.fail(log, f"'level' on <log> must be one of {', '.join(LOG_LEVELS)}")
        return Config(
            path=absolute_path(self.path),
            domains=domains,
            listeners=listeners,
            tls=tls,
            directory=directory,
            limits=limits,
            websocket=websocket,
            profiles=profiles,
            rosters=rosters,
            data_dir=data_dir,
            log_level=log_level,
        )

    def domains(self, root: Element) -> list[str]:
        domains: list[str] = []
        first_line: dict[str, int | None] = {}
        for elem in root.findall("domain"):
            self.check_shape(elem, (), text=True)
            try:
                domain = normalise_domain(self.text_of(elem))
            except ValueError as exc:
                self.fail(elem, str(exc))
            if domain in first_line:
                self.fail(
                    elem, f"domain {domain!r} given twice (first at line {first_line[domain]})"
                )
            first_line[domain] = self.line(elem)
            domains.append(domain)
        if not domains:
            self.fail(root, "no <domain>: at least one domain must be served")
        return domains

    def listeners(self, root: Element) -> list[ListenerConfig]:
        listeners: list[ListenerConfig] = []
        seen: dict[tuple[str, int], int | None] = {}
        for elem in root.findall("listen"):
            self.check_shape(elem, ("type", "port", "address"))
            kind = elem.get("type")
            if kind is None:
                self.fail(elem, f"<listen> needs a 'type' attribute ({_KINDS_HINT})")
            if kind not in LISTENER_DEFAULT_PORTS:
                self.fail(elem, f"unknown listener type {kind!r} (use {_KINDS_HINT})")
            port = self.attr_int(elem, "port", LISTENER_DEFAULT_PORTS[kind], 0, MAX_PORT)
            address = self.attr_str(elem, "address", "0.0.0.0")
            if not self.valid_address(address):
                self.fail(
                    elem, f"'address' on <listen> is not an IP address or host name: {address!r}"
                )
            if port != 0:
                key = (address, port)
                if key in seen:
                    self.fail(elem, f"{address} port {port} already used at line {seen[key]}")
                seen[key] = self.line(elem)
            listeners.append(ListenerConfig(kind=kind, port=port, address=address))
        if not listeners:
            self.fail(root, "no <listen>: the server would accept no connections")
        return listeners

    @staticmethod
    def valid_address(address: str) -> bool:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            return bool(_HOSTNAME_RE.match(address))
        return True

    def tls(self, root: Element, listeners: list[ListenerConfig]) -> TLSConfig:
        elem = self.single(root, "tls")
        tls = TLSConfig()
        if elem is not None:
            self.check_shape(elem, ("certificate", "key", "required"))
            tls.certificate = self.existing_file(elem, "certificate")
            tls.key = self.existing_file(elem, "key")
            tls.required = self.attr_bool(elem, "required", tls.required)
            if (tls.certificate is None) != (tls.key is None):
                self.fail(elem, "<tls> needs both 'certificate' and 'key', or neither")
        if tls.certificate is None:
            # Without a certificate these settings could never work; say so
            # now rather than when the first client connects.
            where = elem if elem is not None else root
            for listener in listeners:
                if listener.kind in TLS_LISTENER_KINDS:
                    self.fail(
                        where,
                        f'a type="{listener.kind}" listener needs <tls certificate=... key=...>',
                    )
            if tls.required:
                self.fail(
                    where,
                    "TLS is required but no certificate is configured: give <tls certificate=... "
                    'key=...>, or required="false" for local testing only',
                )
        return tls

    def directory(self, root: Element, first_domain: str) -> DirectoryConfig:
        elem = self.single(root, "directory")
        directory = DirectoryConfig(
            embedded=EmbeddedConfig(
                file=absolute_path(self.base / "directory.ldif"),
                base_dn=base_dn_for_domain(first_domain),
            )
        )
        if elem is None:
            return directory
        self.check_shape(elem, ("backend", "changes-seconds"), ("embedded", "ldap"))
        backend = self.attr_str(elem, "backend", "embedded")
        directory.changes_seconds = self.attr_float(elem, "changes-seconds",
                                                    directory.changes_seconds)
        if directory.changes_seconds < MIN_DIRECTORY_CHANGES_SECONDS:
            self.fail(elem, f"'changes-seconds' must be at least "
                            f"{MIN_DIRECTORY_CHANGES_SECONDS}")
        if backend not in BACKENDS:
            self.fail(elem, f"unknown directory backend {backend!r} (use embedded or ldap)")
        directory.backend = backend
        other = "ldap" if backend == "embedded" else "embedded"
        stray = self.single(elem, other)
        if stray is not None:
            self.fail(stray, f'<{other}> does not apply with backend="{backend}"')
        if backend == "embedded":
            embedded = self.single(elem, "embedded")
            if embedded is not None:
                self.check_shape(embedded, ("file", "base"))
                directory.embedded.file = (
                    self.attr_path(embedded, "file") or directory.embedded.file
                )
                directory.embedded.base_dn = self.dn(embedded, "base", directory.embedded.base_dn)
        else:
            ldap = self.single(elem, "ldap")
            if ldap is None:
                self.fail(elem, 'backend="ldap" needs an <ldap> element')
            directory.ldap = self.ldap(ldap)
        return directory

    def ldap(self, elem: Element) -> LDAPConfig:
        self.check_shape(
            elem,
            (
                "base",
                "bind-dn",
                "bind-password",
                "bind-password-file",
                "users",
                "jid-attribute",
                "filter",
                "scram-attribute",
                "pool-size",
                "timeout",
            ),
            ("server",),
        )
        cfg = LDAPConfig()
        cfg.base_dn = self.dn(elem, "base", "", required=True)
        cfg.bind_dn = self.dn(elem, "bind-dn", "")
        if elem.get("bind-password") is not None and elem.get("bind-password-file") is not None:
            self.fail(elem, "give 'bind-password' or 'bind-password-file', not both")
        cfg.bind_password = elem.get("bind-password", "")
        password_file = self.existing_file(elem, "bind-password-file")
        if password_file is not None:
            cfg.bind_password = self.read_password(elem, password_file)
        if cfg.bind_password and not cfg.bind_dn:
            self.fail(elem, "a bind password is given but no 'bind-dn'")
        cfg.users_dn = self.dn(elem, "users", f"ou=People,{cfg.base_dn}")
        cfg.jid_attribute = self.attr_str(elem, "jid-attribute", cfg.jid_attribute)
        cfg.user_filter = self.attr_str(elem, "filter", cfg.user_filter)
        if not (
            cfg.user_filter.startswith("(")
            and cfg.user_filter.endswith(")")
            and cfg.user_filter.count("(") == cfg.user_filter.count(")")
        ):
            self.fail(elem, f"'filter' on <ldap> is not an LDAP filter: {cfg.user_filter!r}")
        cfg.scram_attribute = self.attr_str(elem, "scram-attribute", cfg.scram_attribute)
        cfg.pool_size = self.attr_int(elem, "pool-size", cfg.pool_size, 1, MAX_LDAP_POOL_SIZE)
        cfg.timeout = self.attr_float(elem, "timeout", cfg.timeout)
        servers: list[str] = []
        for server in elem.findall("server"):
            self.check_shape(server, (), text=True)
            url = self.text_of(server)
            if not url.lower().startswith(LDAP_URL_SCHEMES):
                self.fail(server, f"<server> must be an ldap://, ldaps:// or ldapi:// URL: {url!r}")
            servers.append(url)
        if not servers:
            self.fail(elem, "<ldap> needs at least one <server>ldap://host:port</server>")
        cfg.servers = servers
        return cfg

    def read_password(self, elem: Element, path: Path) -> str:
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_PASSWORD_FILE_BYTES + 1)
        except OSError as exc:
            self.fail(elem, f"cannot read bind-password-file {str(path)!r}: {exc.strerror}")
        if len(raw) > MAX_PASSWORD_FILE_BYTES:
            self.fail(elem, f"bind-password-file {str(path)!r} is too large for a password")
        try:
            # Editors add a final newline; it is never part of the password.
            return raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            self.fail(elem, f"bind-password-file {str(path)!r} is not UTF-8")

    def limits(self, root: Element) -> LimitsConfig:
        limits = LimitsConfig()
        elem = self.single(root, "limits")
        if elem is None:
            return limits
        self.check_shape(elem, ("stanza-bytes", "depth", "auth-timeout", "offline-limit"))
        limits.max_stanza_bytes = self.attr_int(
            elem, "stanza-bytes", limits.max_stanza_bytes, MIN_STANZA_BYTES
        )
        limits.max_depth = self.attr_int(elem, "depth", limits.max_depth, 1)
        limits.auth_timeout = self.attr_float(elem, "auth-timeout", limits.auth_timeout)
        # 0 turns offline storage off: messages to offline users bounce.
        limits.max_offline_messages = self.attr_int(
            elem, "offline-limit", limits.max_offline_messages, 0
        )
        return limits

    def websocket(self, root: Element) -> WebSocketConfig:
        ws = WebSocketConfig()
        elem = self.single(root, "websocket")
        if elem is None:
            return ws
        self.check_shape(elem, ("see-other-uri",), children=("origin", "trusted-proxy"))
        uri = elem.get("see-other-uri")
        if uri is not None:
            uri = self.attr_str(elem, "see-other-uri", "")
            if not uri.lower().startswith(SEE_OTHER_URI_SCHEMES) or any(
                c.isspace() or c in "<>'\"" for c in uri
            ):
                self.fail(
                    elem, f"'see-other-uri' must be a ws://, wss:// or http(s):// URI: {uri!r}"
                )
            ws.see_other_uri = uri
        for child in elem.findall("origin"):
            self.check_shape(child, (), text=True)
            origin = self.text_of(child).lower().rstrip("/")
            if not _ORIGIN_RE.match(origin):
                self.fail(
                    child,
                    f"<origin> must be scheme://host[:port] as browsers send it, not {origin!r}",
                )
            ws.origins.append(origin)
        for child in elem.findall("trusted-proxy"):
            self.check_shape(child, (), text=True)
            raw = self.text_of(child)
            try:
                network = ipaddress.ip_network(raw, strict=False)
            except ValueError:
                self.fail(child, f"<trusted-proxy> must be an IP address or network, not {raw!r}")
            ws.trusted_proxies.append(str(network))
        return ws

    def attribute_name(self, elem: Element, name: str) -> str | None:
        """An LDAP attribute name (or OID) given in attribute `name`."""
        value = elem.get(name)
        if value is None:
            return None
        value = self.attr_str(elem, name, "")
        if not _ATTRIBUTE_RE.match(value):
            self.fail(elem, f"{name!r} on <{elem.tag}> is not an LDAP attribute name: {value!r}")
        return value

    def profiles(self, root: Element, limits: LimitsConfig) -> ProfilesConfig:
        """<profiles>: per-field policy. Field names and default mappings
        are checked by mlink.profile at startup (it owns the table); here
        only what the file alone can tell."""
        profiles = ProfilesConfig()
        most, per = BASE64_RATIO
        largest = limits.max_stanza_bytes * most // per
        # A smaller stanza limit lowers the default photo limit with it.
        profiles.max_photo_bytes = min(profiles.max_photo_bytes, largest)
        elem = self.single(root, "profiles")
        if elem is None:
            return profiles
        self.check_shape(elem, ("cache-seconds", "max-photo-bytes"), children=("field",))
        profiles.cache_seconds = self.attr_float(elem, "cache-seconds", profiles.cache_seconds)
        profiles.max_photo_bytes = self.attr_int(
            elem, "max-photo-bytes", profiles.max_photo_bytes, 1
        )
        if profiles.max_photo_bytes > largest:
            self.fail(
                elem,
                f"'max-photo-bytes' {profiles.max_photo_bytes} cannot fit in a stanza once "
                f"base64-encoded: at most {largest} with stanza-bytes="
                f"{limits.max_stanza_bytes} in <limits>",
            )
        first_line: dict[str, int | None] = {}
        for child in elem.findall("field"):
            self.check_shape(child, ("name", "policy", "attribute", "value"))
            name = child.get("name")
            if name is None:
                self.fail(child, "<field> needs a 'name' attribute (an XEP-0154 field name)")
            name = name.strip()
            if not _FIELD_NAME_RE.match(name):
                self.fail(child, f"'name' on <field> is not a profile field name: {name!r}")
            if name in first_line:
                self.fail(child, f"field {name!r} given twice (first at line {first_line[name]})")
            first_line[name] = self.line(child)
            policy = child.get("policy")
            if policy is None:
                self.fail(child, f"<field name={name!r}> needs a 'policy' "
                                 f"({', '.join(PROFILE_POLICIES)})")
            policy = policy.strip()
            if policy not in PROFILE_POLICIES:
                self.fail(child, f"unknown policy {policy!r} for field {name!r} "
                                 f"(use {', '.join(PROFILE_POLICIES)})")
            attribute = self.attribute_name(child, "attribute")
            value = child.get("value")
            if policy == "static":
                if value is None:
                    self.fail(child, f"static field {name!r} needs a 'value'")
                if attribute is not None:
                    self.fail(child, f"static field {name!r} is not read from the directory: "
                                     "'attribute' does not apply")
            elif value is not None:
                self.fail(child, f"'value' applies only to policy=\"static\", not {policy!r}")
            if policy == "local" and attribute is not None:
                self.fail(child, f"local field {name!r} is never sent to the directory: "
                                 "'attribute' does not apply")
            profiles.fields.append(
                ProfileFieldConfig(name=name, policy=policy, attribute=attribute, value=value)
            )
        return profiles

    def rosters(self, root: Element) -> RostersConfig:
        """<rosters>: directory groups for roster pre-population, and the
        attribute holding static rosters."""
        rosters = RostersConfig()
        elem = self.single(root, "rosters")
        if elem is None:
            return rosters
        self.check_shape(elem, ("refresh-seconds", "static-attribute"), children=("group",))
        rosters.refresh_seconds = self.attr_float(elem, "refresh-seconds", rosters.refresh_seconds)
        rosters.static_attribute = self.attribute_name(elem, "static-attribute")
        first_line: dict[tuple[str, str, str], int | None] = {}
        for child in elem.findall("group"):
            self.check_shape(child, ("dn", "filter", "base", "name-attribute", "name"))
            spec = RosterGroupConfig()
            if (child.get("dn") is None) == (child.get("filter") is None):
                self.fail(child, "<group> needs either 'dn' (one group) or 'filter' "
                                 "(every group it finds), not both")
            if child.get("dn") is not None:
                spec.dn = self.dn(child, "dn", "")
                if child.get("base") is not None:
                    self.fail(child, "'base' applies to a <group filter=...>, not to one dn")
            else:
                spec.filter = self.attr_str(child, "filter", "")
                try:
                    parse_filter(spec.filter)
                except FilterError as exc:
                    self.fail(child, f"'filter' on <group> is not an LDAP filter: {exc}")
                if child.get("base") is not None:
                    spec.base = self.dn(child, "base", "")
            if child.get("name") is not None and child.get("name-attribute") is not None:
                self.fail(child, "give 'name' (a literal roster group name) or "
                                 "'name-attribute', not both")
            spec.name_attribute = self.attribute_name(child, "name-attribute") or "cn"
            if child.get("name") is not None:
                spec.name = self.attr_str(child, "name", "")
            key = (normalize_dn(spec.dn or ""), spec.filter or "", normalize_dn(spec.base or ""))
            if key in first_line:
                self.fail(child, f"the same <group> is given twice (first at line "
                                 f"{first_line[key]})")
            first_line[key] = self.line(child)
            rosters.groups.append(spec)
        return rosters


def load_config(path: Path) -> Config:
    """Read, check and return the configuration in `path`.

    Raises ConfigError (one-line message, `file:line: problem`) on anything
    wrong, so the server never starts on a half-understood file. Relative
    paths in the file are taken from the file's own directory, so the
    server behaves the same whatever directory it was started from.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(path, None, f"larger than {MAX_CONFIG_BYTES} bytes: not a config file?")
    root, lines = _parse_xml(path, data)
    return _Loader(path, root, lines).load()
