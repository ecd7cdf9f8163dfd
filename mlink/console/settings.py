"""The console's server configuration page: the form, built from the
configuration schema, and the change it makes to the configuration's XML.

The form is the schema walked as `mlink.config_doc` walks it: every
attribute of a single top-level section (`<limits>`, `<caches>`,
`<profiles>`, `<log>`…) is one field, named `section.attribute` (or
`section.element.attribute` for an attribute of a single child element).
Repeated sections (listeners, domains, modules, components) and nested
sections are not edited here: the page lists them read-only and points to
the file and `mlink config export|import`. Settings whose change could
lock the administrator out or cannot apply without a restart (the TLS
paths, the directory, the configuration source, the console itself, the
data directory) and every path are shown read-only.

Secrets (a `Raw` kind, or an attribute named like a password or secret)
are never shown: the page says "set" or "not set", and an empty field
keeps the value.

Why each changed field is checked with its own kind first: a `ConfigError`
names one problem in a file, while a form must show every bad field's own
message next to it. The whole file is then loaded by the server's own
loader for what only it can check (cross-field rules, module options), and
that message goes at the top of the form.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, SubElement, TreeBuilder, tostring

from defusedxml.ElementTree import DefusedXMLParser

from mlink.config_model import Config
from mlink.config_schema import Invalid, Kind, ParseEnv, PathKind, Raw, setting_of

# Sections shown but not editable: a wrong value here could cut the
# console off (its own listener, the TLS certificate it serves, the
# directory it logs in against) and all of them need a restart anyway.
READ_ONLY_SECTIONS = frozenset({"tls", "configuration", "directory", "console", "data",
                                "components"})
# Attribute names that hold secrets whatever their kind.
_SECRET_RE = re.compile(r"password|secret", re.IGNORECASE)
# Longest value accepted in one field: a form is small, and no setting
# needs more (a DN or URL is well below it).
MAX_VALUE_CHARS = 2000
# Where the temporary candidate file lives while it is checked: beside the
# file, so relative paths resolve alike and os.replace is atomic.
CANDIDATE_PREFIX = ".mlink-console-"


@dataclass(frozen=True, slots=True)
class SettingField:
    """One field of the form."""

    key: str             # "limits.stanza-bytes": the form field's name
    section: str         # the element under <mlink>
    element: str | None  # a child element of the section holding the attribute
    xml: str             # the attribute
    doc: str
    kind: Kind
    value: str           # the current value as the file writes it ("" when unset)
    editable: bool
    secret: bool


@dataclass(frozen=True, slots=True)
class SettingsForm:
    fields: tuple[SettingField, ...]
    # Parts of the configuration not edited here: (element, why).
    other: tuple[tuple[str, str], ...]

    def by_section(self) -> list[tuple[str, list[SettingField]]]:
        out: dict[str, list[SettingField]] = {}
        for f in self.fields:
            out.setdefault(f.section, []).append(f)
        return list(out.items())


class SettingsInvalid(Exception):
    """Bad values: field key (or "" for the whole file) -> message."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        super().__init__("; ".join(errors.values()))
        self.errors = dict(errors)


def _render(kind: Kind, value: Any, base: Path) -> str:
    if value is None:
        return ""
    if isinstance(value, (tuple, list, frozenset)):
        return " ".join(str(v) for v in value)
    return kind.render(value, base)


def _attr_fields(obj: Any, section: str, base: Path, read_only: bool) -> list[SettingField]:
    out = []
    for f in dataclasses.fields(obj):
        s = setting_of(f)
        if s is None or s.where != "attr" or s.xml is None or s.kind is None:
            continue
        element = s.element
        if obj.__class__ is Config:
            # Top-level attributes sit on a child element of <mlink>: that
            # element is their section (<log level>, <data dir>).
            if element is None:
                continue
            section, element = element, None
        secret = isinstance(s.kind, Raw) or bool(_SECRET_RE.search(s.xml))
        value = getattr(obj, f.name)
        editable = not (read_only or section in READ_ONLY_SECTIONS
                        or isinstance(s.kind, PathKind)
                        or isinstance(value, (tuple, list, frozenset)))
        shown = ("set" if value else "not set") if secret else _render(s.kind, value, base)
        key = ".".join(p for p in (section, element, s.xml) if p)
        out.append(SettingField(key, section, element, s.xml, " ".join(s.doc.split()),
                                s.kind, shown, editable, secret))
    return out


def build_form(config: Config) -> SettingsForm:
    """The form for `config`: its scalar settings, current values filled in."""
    base = config.path.parent if config.path else Path(".")
    fields: list[SettingField] = []
    other: list[tuple[str, str]] = []
    for f in dataclasses.fields(Config):
        s = setting_of(f)
        if s is None:
            continue
        if s.where == "section" and s.cls is not None and s.xml is not None:
            obj = getattr(config, f.name)
            fields += _attr_fields(obj, s.xml, base, read_only=False)
            for inner in dataclasses.fields(s.cls):
                si = setting_of(inner)
                if si is not None and si.where in ("section", "sections", "texts", "custom"):
                    other.append((f"<{s.xml}><{si.xml}>", "nested in a section"))
        elif s.where in ("sections", "texts", "custom") and s.xml is not None:
            other.append((f"<{s.xml}>", "repeated or structured"))
    fields += _attr_fields(config, "", base, read_only=False)
    return SettingsForm(tuple(fields), tuple(other))


def changes(form: SettingsForm, submitted: Mapping[str, str]) -> dict[str, str]:
    """The editable fields whose submitted value differs from the current
    one: key -> raw value ("" puts the setting back to its default). A
    field the form did not send is unchanged; an empty secret keeps its
    value."""
    out: dict[str, str] = {}
    for f in form.fields:
        if not f.editable or f.key not in submitted:
            continue
        raw = submitted[f.key].strip()
        if f.secret:
            if raw:
                out[f.key] = raw
        elif raw != f.value:
            out[f.key] = raw
    return out


def check_fields(form: SettingsForm, changed: Mapping[str, str], base: Path) -> dict[str, str]:
    """Each changed value checked with its field's kind: key -> message."""
    errors: dict[str, str] = {}
    by_key = {f.key: f for f in form.fields}
    for key, raw in changed.items():
        f = by_key[key]
        where = f"<{f.element}>" if f.element else f"<{f.section}>"
        if len(raw) > MAX_VALUE_CHARS:
            errors[key] = f"At most {MAX_VALUE_CHARS} characters."
            continue
        if any(ord(c) < 32 for c in raw):
            errors[key] = "Control characters are not allowed."
            continue
        if not raw:
            continue  # back to the default; the whole-file load decides
        try:
            f.kind.parse(raw, ParseEnv(base, {}))
        except Invalid as exc:
            errors[key] = exc.message(f"'{f.xml}' on {where}")
        except (KeyError, IndexError):
            pass  # a message naming sibling values: the whole-file load says it
    return errors


def parse_tree(text: bytes) -> Element:
    """The file's XML, comments kept (they are the administrator's notes)."""
    parser = DefusedXMLParser(target=TreeBuilder(insert_comments=True), forbid_dtd=True,
                              forbid_entities=True, forbid_external=True)
    parser.feed(text)
    root: Element = parser.close()
    return root


def apply_changes(root: Element, form: SettingsForm, changed: Mapping[str, str]) -> None:
    """Set the changed attributes in `root` (an empty value removes the
    attribute: the default applies), creating missing elements."""
    by_key = {f.key: f for f in form.fields}
    for key, raw in changed.items():
        f = by_key[key]
        elem = root.find(f.section)
        if elem is None:
            if not raw:
                continue
            elem = _append(root, f.section)
        if f.element:
            child = elem.find(f.element)
            if child is None:
                if not raw:
                    continue
                child = _append(elem, f.element)
            elem = child
        if raw:
            elem.set(f.xml, raw)
        else:
            elem.attrib.pop(f.xml, None)


def _append(parent: Element, tag: str) -> Element:
    """A new last child, indented like the one before it."""
    last = parent[-1] if len(parent) else None
    elem = SubElement(parent, tag)
    if last is not None:
        # The new element takes the closing tail; the one before it gets
        # the indentation a sibling has.
        elem.tail = last.tail
        last.tail = parent.text if parent.text and parent.text.strip() == "" else "\n"
    return elem


def serialise(root: Element) -> bytes:
    body: bytes = tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + body + b"\n"


def write_candidate(directory: Path, data: bytes, mode: int) -> Path:
    """`data` in a new file beside the configuration, with `mode` (the
    configuration file's, so a 0600 file stays 0600), synced."""
    fd, name = tempfile.mkstemp(prefix=CANDIDATE_PREFIX, suffix=".xml", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def field_of_problem(form: SettingsForm, changed: Mapping[str, str], problem: str
                     ) -> str | None:
    """The changed field a whole-file problem names ("'x' on <y>"), if any."""
    for key in changed:
        f = next(x for x in form.fields if x.key == key)
        tag = f.element or f.section
        if f"'{f.xml}' on <{tag}>" in problem:
            return key
    return None
