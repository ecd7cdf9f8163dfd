"""Read and check mlink's XML configuration file against the schema.

The schema is `mlink.config_model` (see `mlink.config_schema` for its
vocabulary); this module walks the file with it. Writing the file is
`mlink.config_render`; `render_config` and `write_config` are re-exported
here so callers have one module for the file format (imported on first use:
a running server never writes the file, and the writer's imports cost a
shard several MiB).

The file is read with defusedxml and DTDs are refused outright, so a
configuration copied from an untrusted place cannot expand entities
("billion laughs") or make the server read other files (external
entities). Validation is strict: an unknown element or attribute is an
error rather than being ignored, because a silently ignored typo such as
`requried="true"` would leave the server running with a setting the
administrator believes is off. Every error names the file and the line of
the offending element, on one line, so it can be shown as-is by the CLI
and logged as-is by a server refusing a reload.

The format is described in docs/configuration.md (generated from the
schema by `python -m mlink.config_doc`).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections import ChainMap
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any, NoReturn
from xml.etree.ElementTree import Element, ParseError, TreeBuilder

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser

from mlink.config_model import (
    DEFAULT_MODULES,
    LISTENER_DEFAULT_PORTS,
    LOG_LEVELS,
    MAX_PORT,
    Config,
    ModuleEntry,
)
from mlink.config_schema import (
    ElementSpec,
    Invalid,
    ParseEnv,
    Setting,
    absolute_path,
    base_dn_for_domain,
    normalise_domain,
    option_setting,
    setting_of,
)

__all__ = [
    "ConfigError",
    "LISTENER_DEFAULT_PORTS",
    "LOG_LEVELS",
    "MAX_PORT",
    "absolute_path",
    "base_dn_for_domain",
    "data_dir_hint",
    "load_config",
    "module_path",
    "normalise_domain",
    "render_config",
    "write_config",
]

if TYPE_CHECKING:
    from mlink.config_render import render_config, write_config


def __getattr__(name: str) -> Any:
    # `render_config` and `write_config`, from mlink.config_render on first use.
    if name in ("render_config", "write_config"):
        from mlink import config_render

        return getattr(config_render, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# A real configuration is a few kilobytes; refusing anything bigger keeps a
# wrong path (a log file, a disk image) from being read into memory whole.
MAX_CONFIG_BYTES = 1024 * 1024
# Where plain module names live: "carbons" is mlink.modules.carbons.
MODULES_PACKAGE = "mlink.modules"
# SASL EXTERNAL (XEP-0178): enabled by <tls><client-ca>, not a default.
EXTERNAL_MODULE = "sasl_external"


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


def module_path(name: str) -> str:
    """The import path of module `name` as <module name=...> gives it: a
    plain name is one of mlink's own, a dotted one is taken as is."""
    return name if "." in name else f"{MODULES_PACKAGE}.{name}"


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
    """Turns the parsed tree into a `Config` by walking the schema."""

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

    def value(self, s: Setting, raw: str, subject: str, where: Element,
              values: Mapping[str, Any]) -> Any:
        assert s.kind is not None
        try:
            return s.kind.parse(raw, ParseEnv(self.base, values))
        except Invalid as exc:
            self.fail(where, exc.message(subject))

    # -- the schema walk --------------------------------------------------

    def load(self) -> Config:
        root = self.root
        if root.tag != "mlink":
            self.fail(root, f"the root element must be <mlink>, not <{root.tag}>")
        config: Config = self.build(Config, root, root, ChainMap())
        return dataclasses.replace(config, path=absolute_path(self.path))

    def build(self, cls: Any, elem: Element | None, parent: Element,
              outer: ChainMap[str, Any]) -> Any:
        """An instance of schema class `cls` from `elem` (None: absent, so
        every field takes its default, contextual ones included)."""
        spec: ElementSpec = cls.XML
        settings = [(f, s) for f in dataclasses.fields(cls) if (s := setting_of(f)) is not None]
        if elem is not None:
            attrs = [s.xml for _, s in settings if s.where == "attr" and s.element is None]
            attrs += [extra.xml for extra in spec.extra]
            children = [s.element or s.xml for _, s in settings
                        if s.where != "none" and (s.where != "attr" or s.element)]
            self.check_shape(elem, [a for a in attrs if a], [c for c in children if c])
        values: dict[str, Any] = {}
        scope = outer.new_child(values)
        where = elem if elem is not None else parent
        sub_elements: dict[str, Element | None] = {}
        for f, s in settings:
            if s.where == "attr":
                host = elem
                if s.element is not None:
                    if s.element not in sub_elements:
                        sub = self.single(elem, s.element) if elem is not None else None
                        if sub is not None:
                            self.check_shape(sub, [t.xml for _, t in settings
                                                   if t.element == s.element and t.xml])
                        sub_elements[s.element] = sub
                    host = sub_elements[s.element]
                self.attribute(f, s, host, where, scope, values)
            elif s.where == "texts":
                self.texts(f, s, elem, where, scope, values)
            elif s.where == "section":
                assert s.xml is not None and s.cls is not None
                child = self.single(elem, s.xml) if elem is not None else None
                applies = s.only_if is None or s.only_if(scope)
                if child is not None and not applies:
                    self.fail(child, s.not_applicable.format(**scope))
                if child is None and s.required and s.required_if is not None \
                        and s.required_if(scope):
                    self.fail(where, s.required.format(**scope))
                values[f.name] = self.build(s.cls, child, where, scope) if applies \
                    else s.cls()
            elif s.where == "sections":
                assert s.xml is not None and s.cls is not None
                items = [(child, self.build(s.cls, child, where, scope))
                         for child in (elem.findall(s.xml) if elem is not None else [])]
                if not items and s.required:
                    self.fail(where, s.required.format(**scope))
                if s.check is not None:
                    s.check(self, items)
                values[f.name] = tuple(obj for _, obj in items)
            elif s.where == "none":
                # Not from the file (Config.path): the caller sets it.
                values[f.name] = None if f.default is dataclasses.MISSING else f.default
            elif s.where == "custom":
                assert s.parse is not None and s.xml is not None
                child = self.single(elem, s.xml) if elem is not None else None
                values.update(s.parse(self, child, scope))
        obj = cls(**values)
        if spec.finish is not None:
            obj = spec.finish(self, elem, parent, obj, scope)
        return obj

    def attribute(self, f: dataclasses.Field[Any], s: Setting, host: Element | None,
                  where: Element, scope: Mapping[str, Any], values: dict[str, Any]) -> None:
        assert s.xml is not None
        raw = host.get(s.xml) if host is not None else None
        if raw is None:
            if s.required and (s.required_if is None or s.required_if(scope)):
                self.fail(host if host is not None else where, s.required.format(**scope))
            if s.default_from is not None:
                values[f.name] = s.default_from(self, scope)
            elif f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            return
        assert host is not None
        values[f.name] = self.value(s, raw, f"{s.xml!r} on <{host.tag}>", host, scope)

    def texts(self, f: dataclasses.Field[Any], s: Setting, elem: Element | None,
              where: Element, scope: Mapping[str, Any], values: dict[str, Any]) -> None:
        assert s.xml is not None
        items: list[tuple[Element, Any]] = []
        for child in elem.findall(s.xml) if elem is not None else []:
            self.check_shape(child, (), text=True)
            items.append((child, self.value(s, child.text or "", f"<{child.tag}>", child, scope)))
        if not items and s.required:
            self.fail(where, s.required.format(**scope))
        if s.check is not None:
            s.check(self, items)
        values[f.name] = tuple(value for _, value in items)

    # -- <modules> --------------------------------------------------------------

    def modules(self, elem: Element | None) -> dict[str, Any]:
        """Config.modules and Config.module_options from <modules>: the
        default set minus the disabled ones, then the listed others in file
        order; each enabled module imported and its options parsed."""
        entries: list[tuple[Element, ModuleEntry]] = []
        first_line: dict[str, int | None] = {}
        if elem is not None:
            self.check_shape(elem, (), ("module",))
            for child in elem.findall("module"):
                self.check_shape(child, ("name", "enabled"),
                                 [c.tag for c in child], text=False)
                entry = self.build_entry(child)
                if entry.name in first_line:
                    self.fail(child, f"module {entry.name!r} given twice (first at line "
                                     f"{first_line[entry.name]})")
                first_line[entry.name] = self.line(child)
                entries.append((child, entry))
        listed = {entry.name: (child, entry) for child, entry in entries}
        disabled = {name for name, (_, entry) in listed.items() if not entry.enabled}
        order = [name for name in DEFAULT_MODULES if name not in disabled]
        order += [entry.name for _, entry in entries
                  if entry.enabled and entry.name not in DEFAULT_MODULES]
        # Client certificates are of no use without SASL EXTERNAL, and
        # EXTERNAL none without them: <tls><client-ca> turns the module on
        # (unless it is disabled by name); it is no default otherwise.
        tls = self.root.find("tls")
        if (tls is not None and tls.find("client-ca") is not None
                and EXTERNAL_MODULE not in order and EXTERNAL_MODULE not in disabled):
            order.append(EXTERNAL_MODULE)
        options: dict[str, object] = {}
        for name in order:
            given = listed[name][0] if name in listed else None
            where = given if given is not None else (elem if elem is not None else self.root)
            module = self.import_module(name, where)
            parsed = self.module_options(name, module, given)
            if parsed is not None:
                options[name] = parsed
        for name, (child, entry) in listed.items():
            if not entry.enabled and len(child):
                self.fail(child[0], f"module {name!r} is disabled: its options do not apply")
        return {"modules": tuple(order), "module_options": MappingProxyType(options)}

    def build_entry(self, child: Element) -> ModuleEntry:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(ModuleEntry):
            s = setting_of(f)
            assert s is not None
            self.attribute(f, s, child, child, values, values)
        return ModuleEntry(**values)

    def import_module(self, name: str, where: Element) -> ModuleType:
        target = module_path(name)
        try:
            return importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (target == exc.name
                                         or target.startswith(exc.name + ".")):
                self.fail(where, f"unknown module {name!r}")
            self.fail(where, f"module {name!r} cannot be imported: {exc}")
        except Exception as exc:  # a module's own import-time failure, as one line
            self.fail(where, f"module {name!r} cannot be imported: {type(exc).__name__}: {exc}")

    def module_options(self, name: str, module: ModuleType, child: Element | None) -> object:
        """The module's OPTIONS instance from the children of its <module>,
        or None when the module declares no OPTIONS."""
        options_cls = getattr(module, "OPTIONS", None)
        given = list(child) if child is not None else []
        if options_cls is None:
            if given:
                self.fail(given[0], f"module {name!r} takes no options, found <{given[0].tag}>")
            return None
        assert child is not None or not given
        if not (isinstance(options_cls, type) and dataclasses.is_dataclass(options_cls)):
            self.fail(child if child is not None else self.root,
                      f"module {name!r}: OPTIONS is not a dataclass type")
        settings = {f.name: option_setting(f) for f in dataclasses.fields(options_cls)
                    if f.init}
        if child is not None:
            allowed = {s.xml for s in settings.values() if s.xml}
            for opt in given:
                if opt.tag not in allowed:
                    hint = ", ".join(f"<{a}>" for a in sorted(allowed)) or "none"
                    self.fail(opt, f"unknown option <{opt.tag}> for module {name!r} "
                                   f"(allowed: {hint})")
        values: dict[str, Any] = {}
        for field_name, s in settings.items():
            assert s.xml is not None
            opt_elem = self.single(child, s.xml) if child is not None else None
            if opt_elem is None:
                continue
            self.check_shape(opt_elem, (), text=True)
            values[field_name] = self.value(s, opt_elem.text or "",
                                            f"<{s.xml}> of module {name!r}", opt_elem, values)
        try:
            return options_cls(**values)
        except (TypeError, ValueError) as exc:
            # A missing required option, or the class's own check refusing
            # a combination (raised from __post_init__).
            self.fail(child if child is not None else self.root,
                      f"module {name!r}: {' '.join(str(exc).split())}")


def load_config(path: Path) -> Config:
    """Read, check and return the configuration in `path`.

    Raises ConfigError (one-line message, `file:line: problem`) on anything
    wrong, so the server never starts on a half-understood file. Relative
    paths in the file are taken from the file's own directory, so the
    server behaves the same whatever directory it was started from.
    """
    path = Path(path)
    root, lines = _parse_xml(path, _read(path))
    if _directory_source(root):
        # <configuration source="directory">: this file is only the
        # bootstrap; the settings are in the directory.
        from mlink.config_directory import load_directory_source

        return load_directory_source(path, root, lines)
    return _Loader(path, root, lines).load()


def _directory_source(root: Element) -> bool:
    elem = root.find("configuration")
    return elem is not None and elem.get("source", "").strip() == "directory"


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(path, None, f"larger than {MAX_CONFIG_BYTES} bytes: not a config file?")
    return data


def data_dir_hint(path: Path) -> Path:
    """The data directory `path` names, read leniently: the file may be
    broken elsewhere. `mlink reload` uses it to find the running server
    (whose control socket lives there) even when the new file is refused."""
    path = Path(path)
    try:
        root, _ = _parse_xml(path, _read(path))
    except ConfigError:
        return absolute_path(path.parent)
    data = root.find("data")
    raw = data.get("dir") if data is not None else None
    if not raw or not raw.strip():
        return absolute_path(path.parent)
    return absolute_path(path.parent / Path(raw.strip()).expanduser())
