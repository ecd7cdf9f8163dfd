"""The vocabulary of mlink's configuration schema: field metadata and value kinds.

The configuration is described once, as frozen dataclasses in
`mlink.config_model` whose fields carry a `Setting` in their metadata
(where the value sits in mlink.xml, how it is parsed, its documentation,
and why its default is what it is) and whose classes carry an
`ElementSpec` (the element's tag, documentation and cross-field checks).
From that one description come the loader (`mlink.config`), the file
`mlink init` writes (`mlink.config_render`) and the reference in
docs/configuration.md (`mlink.config_doc`).

Why dataclasses with metadata rather than pydantic: the standard library
is enough (no new dependency in a server that otherwise pins few), frozen
slotted dataclasses cost a few hundred bytes per snapshot on every shard,
and the hard part — one-line `file:line: problem` errors pointing at the
XML element — is ours to write either way, since pydantic knows nothing of
XML line numbers.

Module options use the same conventions: a module may define `OPTIONS`, a
dataclass type whose fields use `option(...)` (or plain typed fields with
defaults); each field is a child element of `<module>` holding text.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

if TYPE_CHECKING:
    from xml.etree.ElementTree import Element

# The key under which a field's Setting is kept in dataclasses.field metadata.
META = "mlink"

# RFC 1035 §2.3.4 / RFC 7622 §3.2: a DNS label is at most 63 octets and a
# whole name at most 253 in text form (255 on the wire).
MAX_LABEL_LENGTH = 63
MAX_DOMAIN_LENGTH = 253

_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
_UINT_RE = re.compile(r"^[0-9]+$")
_UFLOAT_RE = re.compile(r"^[0-9]+(?:\.[0-9]+)?$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
# XEP-0154 field names: lower case words joined by underscores.
_FIELD_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# An LDAP attribute description without options (RFC 4512 §2.5): a name
# (letter, then letters, digits, hyphens) or a numeric OID.
_ATTRIBUTE_RE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+)$")
# A WebSocket page's Origin (RFC 6454 §6.2): scheme://host[:port], nothing more.
_ORIGIN_RE = re.compile(r"^[a-z][a-z0-9+.-]*://(?:[a-z0-9.-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?$")
# Where RFC 7395 §3.6.1 lets a server send clients: another WebSocket
# endpoint, or a BOSH one.
SEE_OTHER_URI_SCHEMES = ("ws://", "wss://", "http://", "https://")
LDAP_URL_SCHEMES = ("ldap://", "ldaps://", "ldapi://")


# -- helpers shared with the loader and the CLI ---------------------------------


def absolute_path(path: Path) -> Path:
    """`path` made absolute and normalised without following symlinks:
    certificate paths such as Let's Encrypt's live/ links must stay links,
    or a renewed certificate would never be picked up."""
    return Path(os.path.abspath(path))


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


def fmt_number(value: float) -> str:
    """A number as the file writes it: `60`, not `60.0`."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# -- value kinds ---------------------------------------------------------------------


class Invalid(Exception):
    """A raw value a kind refuses.

    `problem` follows the subject ("'port' on <listen>" or "<server>")
    after `sep`; with `whole`, it is the entire message, for kinds whose
    established message names the setting its own way.
    """

    def __init__(self, problem: str, *, whole: bool = False, sep: str = " ") -> None:
        super().__init__(problem)
        self.problem = problem
        self.whole = whole
        self.sep = sep

    def message(self, subject: str) -> str:
        return self.problem if self.whole else f"{subject}{self.sep}{self.problem}"


@dataclass(frozen=True, slots=True)
class ParseEnv:
    """What a kind may need besides the raw text: the configuration file's
    directory (relative paths) and the values already read (messages that
    name a sibling setting)."""

    base: Path
    values: Mapping[str, Any]


class Kind:
    """How one value is read from text and written back. `doc` names the
    type in the generated reference."""

    doc = "text"

    def parse(self, raw: str, env: ParseEnv) -> Any:
        raise NotImplementedError

    def render(self, value: Any, base: Path) -> str:
        return str(value)


class Str(Kind):
    """Text with surrounding whitespace removed; empty is refused."""

    def parse(self, raw: str, env: ParseEnv) -> str:
        value = raw.strip()
        if not value:
            raise Invalid("is empty")
        return value


class Raw(Kind):
    """Text taken exactly as written (passwords, literal profile values)."""

    def parse(self, raw: str, env: ParseEnv) -> str:
        return raw


class Int(Kind):
    doc = "whole number"

    def __init__(self, minimum: int = 1, maximum: int | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def parse(self, raw: str, env: ParseEnv) -> int:
        raw = raw.strip()
        if not _UINT_RE.match(raw):
            raise Invalid(f"must be a whole number, not {raw!r}")
        value = int(raw)
        if value < self.minimum or (self.maximum is not None and value > self.maximum):
            bounds = (f"{self.minimum}..{self.maximum}" if self.maximum is not None
                      else f"at least {self.minimum}")
            raise Invalid(f"must be {bounds}, not {value}")
        return value


class FloatAtLeast(Kind):
    doc = "number"

    def __init__(self, minimum: float) -> None:
        self.minimum = minimum
        self.doc = f"number, at least {fmt_number(minimum)}"

    def parse(self, raw: str, env: ParseEnv) -> float:
        raw = raw.strip()
        if not _UFLOAT_RE.match(raw):
            raise Invalid(f"must be a number, not {raw!r}")
        if float(raw) < self.minimum:
            raise Invalid(f"must be at least {fmt_number(self.minimum)}, not {raw}")
        return float(raw)

    def render(self, value: Any, base: Path) -> str:
        return fmt_number(value)


class PositiveFloat(Kind):
    doc = "positive number"

    def parse(self, raw: str, env: ParseEnv) -> float:
        raw = raw.strip()
        if not _UFLOAT_RE.match(raw) or float(raw) <= 0:
            raise Invalid(f"must be a positive number, not {raw!r}")
        return float(raw)

    def render(self, value: Any, base: Path) -> str:
        return fmt_number(value)


class Bool(Kind):
    doc = "true or false"

    def parse(self, raw: str, env: ParseEnv) -> bool:
        if raw.strip() == "true":
            return True
        if raw.strip() == "false":
            return False
        raise Invalid(f"must be true or false, not {raw!r}")

    def render(self, value: Any, base: Path) -> str:
        return "true" if value else "false"


class PathKind(Kind):
    """A path, relative to the configuration file's directory; `~` expanded."""

    doc = "path"

    def __init__(self, must_exist: bool = False) -> None:
        self.must_exist = must_exist

    def parse(self, raw: str, env: ParseEnv) -> Path:
        if not raw.strip():
            raise Invalid("is empty")
        path = absolute_path(env.base / Path(raw.strip()).expanduser())
        if self.must_exist:
            try:
                found = path.is_file()
            except OSError as exc:  # a name too long, say: one line, not a traceback
                raise Invalid(f"cannot use {str(path)[:200]!r}: {exc.strerror or exc}",
                              sep=": ") from None
            if not found:
                raise Invalid(f"file {str(path)!r} does not exist", sep=": ")
        return path

    def render(self, value: Any, base: Path) -> str:
        """Relative to the config directory when inside it, so a setup
        directory can be moved or copied as a whole; absolute otherwise."""
        try:
            return (Path(os.path.abspath(value)).relative_to(os.path.abspath(base)).as_posix()
                    or ".")
        except ValueError:
            return str(value)


class Choice(Kind):
    """One of a fixed set of words; `message` (with {value}, {hint} and the
    sibling values) is the whole problem when another is given."""

    def __init__(self, values: Sequence[str], message: str, lower: bool = False) -> None:
        self.values = tuple(values)
        self.message = message
        self.lower = lower
        self.doc = " | ".join(self.values)

    def parse(self, raw: str, env: ParseEnv) -> str:
        value = raw.strip()
        if self.lower:
            if not value:
                raise Invalid("is empty")
            value = value.lower()
        if value not in self.values:
            raise Invalid(self.message.format(**{**env.values, "value": value,
                                                 "hint": ", ".join(self.values)}), whole=True)
        return value


class DN(Str):
    doc = "DN"

    def parse(self, raw: str, env: ParseEnv) -> str:
        value = super().parse(raw, env)
        if "=" not in value:
            raise Invalid(f"is not a DN (like dc=example,dc=com): {value!r}")
        return value


class AttributeName(Str):
    doc = "LDAP attribute"

    def parse(self, raw: str, env: ParseEnv) -> str:
        value = super().parse(raw, env)
        if not _ATTRIBUTE_RE.match(value):
            raise Invalid(f"is not an LDAP attribute name: {value!r}")
        return value


class FieldName(Str):
    doc = "profile field name"

    def parse(self, raw: str, env: ParseEnv) -> str:
        value = super().parse(raw, env)
        if not _FIELD_NAME_RE.match(value):
            raise Invalid(f"is not a profile field name: {value!r}")
        return value


class Domain(Kind):
    doc = "domain"

    def parse(self, raw: str, env: ParseEnv) -> str:
        if not raw.strip():
            raise Invalid("is empty")
        try:
            return normalise_domain(raw.strip())
        except ValueError as exc:
            raise Invalid(str(exc), whole=True) from None


class Host(Str):
    """An IP address or a host name to bind."""

    def parse(self, raw: str, env: ParseEnv) -> str:
        value = super().parse(raw, env)
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not _HOSTNAME_RE.match(value):
                raise Invalid(f"is not an IP address or host name: {value!r}") from None
        return value


class LDAPURL(Str):
    def parse(self, raw: str, env: ParseEnv) -> str:
        url = super().parse(raw, env)
        if not url.lower().startswith(LDAP_URL_SCHEMES):
            raise Invalid(f"must be an ldap://, ldaps:// or ldapi:// URL: {url!r}")
        return url


class SimpleFilter(Str):
    """A parenthesised LDAP filter, checked for balance only (the user
    filter is passed to the server as written)."""

    def parse(self, raw: str, env: ParseEnv) -> str:
        value = super().parse(raw, env)
        if not (value.startswith("(") and value.endswith(")")
                and value.count("(") == value.count(")")):
            raise Invalid(f"is not an LDAP filter: {value!r}")
        return value


class Filter(Str):
    """An RFC 4515 filter, parsed as mlink's embedded directory will."""

    def parse(self, raw: str, env: ParseEnv) -> str:
        from mlink.directory.filters import FilterError, parse_filter

        value = super().parse(raw, env)
        try:
            parse_filter(value)
        except FilterError as exc:
            raise Invalid(f"is not an LDAP filter: {exc}") from None
        return value


class Origin(Str):
    def parse(self, raw: str, env: ParseEnv) -> str:
        origin = super().parse(raw, env).lower().rstrip("/")
        if not _ORIGIN_RE.match(origin):
            raise Invalid(f"must be scheme://host[:port] as browsers send it, not {origin!r}")
        return origin


class Network(Str):
    def parse(self, raw: str, env: ParseEnv) -> str:
        value = super().parse(raw, env)
        try:
            return str(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise Invalid(f"must be an IP address or network, not {value!r}") from None


class RedirectURI(Str):
    def parse(self, raw: str, env: ParseEnv) -> str:
        uri = super().parse(raw, env)
        if not uri.lower().startswith(SEE_OTHER_URI_SCHEMES) or any(
            c.isspace() or c in "<>'\"" for c in uri
        ):
            raise Invalid(f"must be a ws://, wss:// or http(s):// URI: {uri!r}")
        return uri


class WebSocketURL(Str):
    """A ws:// or wss:// URL that clients are told to use (host-meta)."""

    def parse(self, raw: str, env: ParseEnv) -> str:
        url = super().parse(raw, env)
        scheme, sep, rest = url.partition("://")
        if scheme.lower() not in ("ws", "wss") or not sep or not rest.strip("/") or any(
                c.isspace() or c in "<>'\"\\{}" for c in url):
            raise Invalid(f"must be a ws:// or wss:// URL: {url!r}")
        return url


def kind_for_type(annotation: Any) -> Kind:
    """The kind of a plain typed field (module options without `option()`)."""
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    name = name.replace(" ", "")
    table: dict[str, Kind] = {
        "int": Int(0), "float": PositiveFloat(), "bool": Bool(), "str": Str(), "Path": PathKind(),
    }
    if name in table:
        return table[name]
    raise TypeError(f"no configuration kind for type {annotation!r}; use option(kind=...)")


# -- field metadata --------------------------------------------------------------


class Checker(Protocol):
    """What cross-field checks may use of the loader."""

    base: Path

    def fail(self, elem: Element | None, problem: str) -> NoReturn: ...

    def line(self, elem: Element) -> int | None: ...


@dataclass(frozen=True, slots=True)
class Setting:
    """Where one field of the configuration lives in mlink.xml and what it means.

    where: "attr" (an attribute of the element, or of its child `element`),
    "text" (one child element holding text), "texts" (repeated child
    elements holding text), "section" (one child element, another schema
    class), "sections" (repeated), "custom" (parsed by `parse`), or "none"
    (not read from the file).
    """

    where: str
    xml: str | None = None
    doc: str = ""
    why: str = ""
    kind: Kind | None = None
    # For where="attr": the attribute sits on this single child element.
    element: str | None = None
    # How the docs show the default when it is not a plain value.
    default_doc: str | None = None
    # Message when the value is missing (formatted with sibling values); None: optional.
    required: str | None = None
    # Required only when this is true of the sibling values read so far.
    required_if: Callable[[Mapping[str, Any]], bool] | None = None
    # A default computed from the values read so far (parent's included).
    default_from: Callable[[Checker, Mapping[str, Any]], Any] | None = None
    # For sections: may the element be given at all? If not, `not_applicable`.
    only_if: Callable[[Mapping[str, Any]], bool] | None = None
    not_applicable: str = ""
    # Checks across the items of texts/sections: (checker, [(element, value)]).
    check: Callable[[Checker, list[tuple[Element, Any]]], None] | None = None
    # Written by `mlink init` only when different from the default.
    hide_default: bool = False
    # For where="section"/"sections": the schema class.
    cls: type | None = None
    # For where="custom": (checker, element or None, values so far) -> value.
    parse: Callable[..., Any] | None = None
    # How many times the element may appear, for the docs.
    cardinality: str = ""
    # For where="custom": a commented example `mlink init` writes.
    example: str = ""
    # The comment above it in the file `mlink init` writes.
    comment: str = ""


def _field(setting: Setting, default: Any = MISSING, factory: Any = MISSING) -> Any:
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata={META: setting})
    if default is MISSING:
        return dataclasses.field(metadata={META: setting})
    return dataclasses.field(default=default, metadata={META: setting})


def attr(xml: str, default: Any = MISSING, *, kind: Kind, doc: str, why: str = "",
         **more: Any) -> Any:
    """A field read from attribute `xml`."""
    return _field(Setting("attr", xml, doc, why, kind, **more), default)


def option(default: Any = MISSING, *, xml: str | None = None, kind: Kind | None = None,
           doc: str = "", why: str = "", **more: Any) -> Any:
    """A module option: a child element of `<module>` holding text. `xml`
    defaults to the field name with hyphens; `kind` to one for its type."""
    return _field(Setting("text", xml, doc, why, kind, **more), default)


def texts(xml: str, *, kind: Kind, doc: str, why: str = "", **more: Any) -> Any:
    """A tuple read from repeated `<xml>text</xml>` children."""
    return _field(Setting("texts", xml, doc, why, kind, **more), ())


def section(cls: type, xml: str, *, doc: str = "", **more: Any) -> Any:
    """A sub-object read from the one `<xml>` child (defaults when absent)."""
    return _field(Setting("section", xml, doc, cls=cls, **more), factory=cls)


def sections(cls: type, xml: str, *, doc: str = "", **more: Any) -> Any:
    """A tuple of sub-objects read from repeated `<xml>` children."""
    return _field(Setting("sections", xml, doc, cls=cls, **more), ())


def custom(xml: str, default: Any = MISSING, *, parse: Callable[..., Any], doc: str = "",
           factory: Any = MISSING, **more: Any) -> Any:
    return _field(Setting("custom", xml, doc, parse=parse, **more), default, factory)


def not_in_file(default: Any = MISSING, **more: Any) -> Any:
    return _field(Setting("none", **more), default)


@dataclass(frozen=True, slots=True)
class ExtraAttribute:
    """An attribute that feeds another field (bind-password-file), documented
    in the element's table and checked by its `finish`."""

    xml: str
    default_doc: str
    doc: str


@dataclass(frozen=True, slots=True)
class ElementSpec:
    """Class-level schema of one XML element."""

    tag: str
    # Heading note in the docs: "at most once", "inside <ldap>, one or more".
    title: str
    doc: str = ""
    # Paragraphs after the attribute table in the docs.
    notes: str = ""
    # The comment above the element in the file `mlink init` writes.
    comment: str = ""
    # A commented example `mlink init` writes when the section is all
    # defaults; with `example_when`, written after the element when that
    # is true of the value instead.
    example: str = ""
    example_when: Callable[[Any], bool] | None = None
    extra: tuple[ExtraAttribute, ...] = ()
    # Cross-field checks and contextual values once the fields are read:
    # (checker, element or None, parent element, object, values so far) -> object.
    finish: Callable[..., Any] | None = None


def setting_of(f: dataclasses.Field[Any]) -> Setting | None:
    meta = f.metadata.get(META)
    return meta if isinstance(meta, Setting) else None


def option_setting(f: dataclasses.Field[Any]) -> Setting:
    """The Setting of a module option field, defaults filled in: plain
    typed fields are options too."""
    s = setting_of(f) or Setting("text")
    xml = s.xml or f.name.replace("_", "-")
    kind = s.kind or kind_for_type(f.type)
    return dataclasses.replace(s, where="text", xml=xml, kind=kind)


class Frozen:
    """Base of the schema classes: lists given by callers become tuples,
    so a snapshot cannot be changed through a list it shares."""

    __slots__ = ()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
