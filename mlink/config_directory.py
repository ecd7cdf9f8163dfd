"""The configuration held in the directory: a server entry and its children.

With `<configuration source="directory" entry="DN"/>` in mlink.xml, the
file only says how to reach the directory (`<directory>`), where the data
lives (`<data>`) and which server entry to read; everything else is read
from that entry's subtree. Several servers may name one entry (a cluster)
or each its own.

The mapping is the XML file's, element for element, so there is ONE
configuration model and one loader (`mlink.config`), and every check the
file gets the directory gets too:

    <mlink>                 the server entry (mlinkServer, cn=<any>)
      XML attribute a="v"   attribute mlinkCfg<A>: v   (mlink.config_dirschema)
      <domain>x</domain>    a value of mlinkCfgDomain (text children, repeated)
      <limits .../>         child entry cn=limits (mlinkConfigElement)
      <listen/> <listen/>   child entries cn=listen-1, cn=listen-2 (order by number)
      <log level="debug"/>  child entry cn=log, mlinkCfgLevel: debug
      <modules><module name="muc"><max-occupants>50</max-occupants>...
                            cn=modules, below it cn=module-1 with mlinkCfgName: muc
                            and mlinkCfgMaxOccupants: 50

Reading turns the subtree into the element tree the file would have given
and runs the file's loader on it; a problem in an element that came from
the directory is reported as `<directory URL>/<entry DN>: <attribute>:
<problem>`, the directory's `file:line`. Writing (`mlink config import`)
renders the Config as the file would be written (`mlink.config_render`)
and turns that tree into entries; `mlink config export` is the reverse.

Relative paths in the directory are taken from the bootstrap file's
directory, as they would be in that file.

Live changes: the supervisor reads the subtree every `changes-seconds`
(`watch_configuration`) and reloads when it differs from the last read.
A poll of one small subtree rather than the change feed because an LDAP
feed polls `modifyTimestamp` and cannot see a deleted entry, and a
listener removed with `ldapdelete` must be noticed too.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import ChainMap
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from xml.etree.ElementTree import Element, SubElement, fromstring

import trio

from mlink.config import MAX_CONFIG_BYTES, ConfigError, _Loader
from mlink.config_dirschema import ELEMENT_CLASS, SERVER_CLASS, ldap_name, xml_name
from mlink.config_model import (
    Config,
    ConfigurationSourceConfig,
    DirectoryConfig,
    ModuleEntry,
)
from mlink.config_schema import Invalid, ParseEnv, Setting, setting_of
from mlink.directory.base import DirectoryError
from mlink.directory.ldif import Entry
from mlink.directory.names import normalize_dn, parent_key, rdn_value
from mlink.directory.port import (
    Add,
    Delete,
    DirectoryPort,
    Modification,
    Modify,
    NoSuchEntry,
    Operation,
    Scope,
)

log = logging.getLogger(__name__)

# What stays in the bootstrap file with source="directory": how to reach
# the directory, where the data lives, and the source itself. The rest
# would be a second, silently ignored copy of the directory's settings.
BOOTSTRAP_ELEMENTS = ("configuration", "directory", "data")
# Attributes of configuration entries that are not settings: naming,
# classes, and a free-text note an administrator may leave.
NON_SETTINGS = frozenset({"objectclass", "cn", "description"})
# A configuration is a few dozen entries; more under the server entry is
# a wrong DN (a whole directory), not a configuration.
MAX_CONFIG_ENTRIES = 1000
# And a few kilobytes: the file's own bound (MAX_CONFIG_BYTES, 1 MiB) applies
# to the values read, so a huge value pasted into an entry is refused
# before any of it is parsed.
# A child entry's RDN: cn=<element> or cn=<element>-<n> (repeated elements,
# ordered by n).
_RDN_RE = re.compile(r"^([a-z][a-z0-9-]*?)(?:-([0-9]{1,6}))?$")


# -- the element shapes, from the schema walk ---------------------------------------


@dataclass(frozen=True, slots=True)
class _Shapes:
    """Per element tag: its XML attributes, its repeated text children,
    and which of its child elements appear once (cn=<tag>)."""

    attributes: dict[str, frozenset[str]]
    texts: dict[str, frozenset[str]]
    single: dict[str, frozenset[str]]


def _shapes() -> _Shapes:
    attributes: dict[str, set[str]] = {}
    texts: dict[str, set[str]] = {}
    single: dict[str, set[str]] = {}

    def walk(cls: Any, tag: str) -> None:
        attributes.setdefault(tag, set()).update(e.xml for e in cls.XML.extra)
        texts.setdefault(tag, set())
        single.setdefault(tag, set())
        for f in dataclasses.fields(cls):
            s = setting_of(f)
            if s is None or s.xml is None:
                continue
            if s.where == "attr" and s.element is None:
                attributes[tag].add(s.xml)
            elif s.where == "attr" and s.element is not None:
                attributes.setdefault(s.element, set()).add(s.xml)
                single[tag].add(s.element)
            elif s.where == "texts":
                texts[tag].add(s.xml)
            elif s.where == "section" and s.cls is not None:
                single[tag].add(s.xml)
                walk(s.cls, s.xml)
            elif s.where == "sections" and s.cls is not None:
                walk(s.cls, s.xml)
            elif s.where == "custom" and s.xml == "modules":
                single[tag].add("modules")
                walk(ModuleEntry, "module")

    walk(Config, "mlink")
    return _Shapes({k: frozenset(v) for k, v in attributes.items()},
                   {k: frozenset(v) for k, v in texts.items()},
                   {k: frozenset(v) for k, v in single.items()})


SHAPES = _shapes()


def _is_text_child(parent: str, tag: str) -> bool:
    """Module options are text children of <module>, as are the schema's
    repeated texts (<domain>, <server>, <origin>...)."""
    return parent == "module" or tag in SHAPES.texts.get(parent, frozenset())


# -- Config -> entries ----------------------------------------------------------------


def config_entries(config: Config, dn: str, base: Path) -> list[Entry]:
    """The entries holding `config` at server entry `dn` (bootstrap
    elements left out), parents before children. Paths are written
    relative to `base`, the bootstrap file's directory, where they lie
    inside it."""
    from mlink.config_render import render_config

    text = render_config(dataclasses.replace(config, configuration=ConfigurationSourceConfig()),
                         base)
    root = fromstring(text)  # comments are dropped
    for child in list(root):
        if child.tag in BOOTSTRAP_ELEMENTS:
            root.remove(child)
    out: list[Entry] = []
    _element_entries(root, dn, SERVER_CLASS, out)
    return out


def _element_entries(elem: Element, dn: str, cls: str, out: list[Entry]) -> None:
    entry = Entry(dn, {"objectClass": ["top", cls], "cn": [rdn_value(dn)]})
    for name, value in elem.attrib.items():
        entry.attrs[ldap_name(name)] = [value]
    out.append(entry)
    counts: dict[str, int] = {}
    children: list[tuple[Element, str]] = []
    for child in elem:
        if _is_text_child(elem.tag, child.tag):
            entry.attrs.setdefault(ldap_name(child.tag), []).append(child.text or "")
            continue
        if child.tag in SHAPES.single.get(elem.tag, frozenset()):
            rdn = child.tag
        else:
            counts[child.tag] = counts.get(child.tag, 0) + 1
            rdn = f"{child.tag}-{counts[child.tag]}"
        children.append((child, f"cn={rdn},{dn}"))
    for child, child_dn in children:
        _element_entries(child, child_dn, ELEMENT_CLASS, out)


# -- entries -> element tree ----------------------------------------------------------


class Places:
    """Where each element of the built tree came from: (entry DN, LDAP
    attribute or None for the entry itself)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.by_id: dict[int, tuple[str, str | None]] = {}

    def error(self, dn: str, attribute: str | None, problem: str) -> ConfigError:
        where = f"{attribute}: {problem}" if attribute else problem
        return ConfigError(f"{self.source}/{dn}", None, where)

    def fail(self, dn: str, attribute: str | None, problem: str) -> NoReturn:
        raise self.error(dn, attribute, problem)


def entries_tree(entries: Sequence[Entry], server_dn: str, places: Places) -> Element:
    """The `<mlink>` element tree the entries under `server_dn` stand for."""
    size = sum(len(v) for e in entries for vals in e.attrs.values() for v in vals
               if isinstance(v, str | bytes))
    if size > MAX_CONFIG_BYTES:
        places.fail(server_dn, None, f"its entries hold more than {MAX_CONFIG_BYTES} bytes: "
                                     "not a configuration?")
    root_key = normalize_dn(server_dn)
    by_parent: dict[str, list[Entry]] = {}
    root_entry: Entry | None = None
    for entry in entries:
        key = normalize_dn(entry.dn)
        if key == root_key:
            root_entry = entry
        else:
            by_parent.setdefault(parent_key(key), []).append(entry)
    if root_entry is None:
        places.fail(server_dn, None, "no such entry: write a configuration there with "
                                     "`mlink config import FILE`")
    root = Element("mlink")
    _fill(root, root_entry, places)
    _children(root, root_key, by_parent, places)
    return root


def _children(elem: Element, key: str, by_parent: dict[str, list[Entry]],
              places: Places) -> None:
    found: list[tuple[str, int, Entry]] = []
    for entry in by_parent.get(key, []):
        rdn_type = entry.dn.strip().split("=", 1)[0].strip().lower()
        match = _RDN_RE.match(rdn_value(entry.dn).strip().lower())
        if rdn_type != "cn" or match is None:
            places.fail(entry.dn, None, f"not a configuration entry of <{elem.tag}> "
                                        "(its RDN must be cn=<element> or cn=<element>-<n>)")
        tag, number = match.group(1), match.group(2)
        if number is not None and tag in SHAPES.single.get(elem.tag, frozenset()):
            places.fail(entry.dn, None, f"<{tag}> appears once in <{elem.tag}>: name the entry "
                                        f"cn={tag}")
        if number is None and tag not in SHAPES.single.get(elem.tag, frozenset()):
            # A repeated element written without a number, or an unknown
            # one: the loader names what <elem> allows.
            number = "0"
        found.append((tag, int(number or 0), entry))
    found.sort(key=lambda t: (t[0], t[1]))
    for tag, _, entry in found:
        child = SubElement(elem, tag)
        _fill(child, entry, places)
        _children(child, normalize_dn(entry.dn), by_parent, places)


def _fill(elem: Element, entry: Entry, places: Places) -> None:
    places.by_id[id(elem)] = (entry.dn, None)
    allowed = SHAPES.attributes.get(elem.tag, frozenset())
    for name, values in entry.attrs.items():
        if name.lower() in NON_SETTINGS:
            continue
        xml = xml_name(name)
        if xml is None:
            places.fail(entry.dn, name, "not an mlink configuration attribute "
                                        "(conf/mlink-config.schema)")
        texts: list[str] = []
        for value in values:
            if isinstance(value, bytes):
                places.fail(entry.dn, name, "value is not UTF-8 text")
            texts.append(_text(value))
        if xml in allowed:
            if len(texts) != 1:
                places.fail(entry.dn, name, f"takes one value, found {len(texts)}")
            elem.set(xml, texts[0])
        else:
            for text in texts:
                child = SubElement(elem, xml)
                child.text = text
                places.by_id[id(child)] = (entry.dn, name)


def _text(value: object) -> str:
    """A value as text: bonsai hands out numbers and TRUE/FALSE as int and
    bool (the file's spelling, `true`, is what mlink's kinds read)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _DirectoryLoader(_Loader):
    """The file's loader, reporting elements that came from the directory
    as `<url>/<dn>: <attribute>: problem`."""

    def __init__(self, path: Path, root: Element, lines: dict[int, int],
                 places: Places) -> None:
        super().__init__(path, root, lines)
        self.places = places
        self._attribute: str | None = None

    def fail(self, elem: Element | None, problem: str) -> NoReturn:
        if elem is not None and id(elem) in self.places.by_id:
            dn, attribute = self.places.by_id[id(elem)]
            self.places.fail(dn, attribute or self._attribute, problem)
        super().fail(elem, problem)

    def value(self, s: Setting, raw: str, subject: str, where: Element,
              values: Any) -> Any:
        assert s.kind is not None and s.xml is not None
        try:
            return s.kind.parse(raw, ParseEnv(self.base, values))
        except Invalid as exc:
            self._attribute = ldap_name(s.xml)
            try:
                self.fail(where, exc.message(subject))
            finally:
                self._attribute = None


# -- the bootstrap file ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """What mlink.xml says with source="directory"."""

    path: Path
    root: Element
    lines: dict[int, int]
    source: ConfigurationSourceConfig
    directory: DirectoryConfig

    @property
    def url(self) -> str:
        """How errors name the directory: its first LDAP URL, or the
        embedded directory's file."""
        if self.directory.backend == "ldap":
            return self.directory.ldap.servers[0].rstrip("/")
        return f"embedded:{self.directory.embedded.file}"


def is_directory_source(root: Element) -> bool:
    from mlink.config import _directory_source

    return _directory_source(root)


def read_bootstrap(path: Path, root: Element, lines: dict[int, int]) -> Bootstrap:
    """Check the bootstrap file and read its directory settings."""
    loader = _Loader(path, root, lines)
    if root.tag != "mlink":
        loader.fail(root, f"the root element must be <mlink>, not <{root.tag}>")
    loader.check_shape(root, (), BOOTSTRAP_ELEMENTS + tuple(
        c.tag for c in root if c.tag not in BOOTSTRAP_ELEMENTS))
    for child in root:
        if child.tag not in BOOTSTRAP_ELEMENTS:
            loader.fail(child, f'<{child.tag}> is read from the directory with '
                               f'<configuration source="directory">: remove it from this file '
                               f"(this file holds only "
                               f"{', '.join(f'<{t}>' for t in BOOTSTRAP_ELEMENTS)})")
    scope: ChainMap[str, Any] = ChainMap({"domains": ("localhost",)})
    source = loader.build(ConfigurationSourceConfig, loader.single(root, "configuration"),
                          root, scope)
    dir_elem = loader.single(root, "directory")
    if dir_elem is None or dir_elem.get("backend", "embedded").strip() == "embedded":
        embedded = dir_elem.find("embedded") if dir_elem is not None else None
        if embedded is None or not embedded.get("base", "").strip():
            loader.fail(embedded if embedded is not None else (dir_elem or root),
                        'with <configuration source="directory"> the embedded directory '
                        "needs <embedded base=\"...\">: no domain is known before the "
                        "directory is read")
    directory = loader.build(DirectoryConfig, dir_elem, root, scope)
    return Bootstrap(Path(path), root, lines, source, directory)


# -- reading ---------------------------------------------------------------------------------


async def read_subtree(port: DirectoryPort, dn: str) -> list[Entry]:
    """Every entry under `dn` (itself included); [] when it does not exist."""
    try:
        return await port.search(dn, Scope.SUBTREE, "(objectClass=*)",
                                  size_limit=MAX_CONFIG_ENTRIES)
    except NoSuchEntry:
        return []


async def fetch_entries(boot: Bootstrap) -> list[Entry]:
    """The server entry's subtree; ConfigError (one line) when the
    directory cannot be read."""
    from mlink.directory import open_directory

    directory = open_directory(boot.directory)
    try:
        return await read_subtree(directory.port, boot.source.entry)  # type: ignore[attr-defined]
    except DirectoryError as exc:
        raise ConfigError(f"{boot.url}/{boot.source.entry}", None,
                          f"cannot read the configuration: {exc}") from None
    finally:
        await directory.aclose()


def build_config(boot: Bootstrap, entries: Sequence[Entry]) -> Config:
    """The Config the bootstrap file and the server entry's subtree give."""
    places = Places(boot.url)
    tree = entries_tree(entries, boot.source.entry, places)
    for child in tree:
        if child.tag in BOOTSTRAP_ELEMENTS:
            dn, _ = places.by_id.get(id(child), (boot.source.entry, None))
            places.fail(dn, None, f"<{child.tag}> belongs in the bootstrap file {boot.path}, "
                                  "not in the directory")
    for child in boot.root:
        tree.append(child)
    return _DirectoryLoader(boot.path, tree, boot.lines, places).load()


def load_directory_source(path: Path, root: Element, lines: dict[int, int]) -> Config:
    """`load_config` for a bootstrap file (called outside Trio: the CLI,
    a shard before it starts its loop)."""
    boot = read_bootstrap(path, root, lines)
    entries = trio.run(fetch_entries, boot)
    return build_config(boot, entries)


async def load_directory_source_async(path: Path) -> Config:
    """`load_config` for a bootstrap file, from inside a Trio loop (the
    supervisor's and the shards' reloads): the directory is read without
    blocking the loop."""
    from mlink.config import _parse_xml, _read

    root, lines = _parse_xml(Path(path), _read(Path(path)))
    boot = read_bootstrap(Path(path), root, lines)
    return build_config(boot, await fetch_entries(boot))


def bootstrap_of(path: Path) -> Bootstrap:
    from mlink.config import _parse_xml, _read

    root, lines = _parse_xml(Path(path), _read(Path(path)))
    if not is_directory_source(root):
        raise ConfigError(path, None, 'this is no bootstrap file: it needs <configuration '
                                      'source="directory" entry="DN"/> (see docs/directory.md)')
    return read_bootstrap(Path(path), root, lines)


# -- writing -------------------------------------------------------------------------------


def plan_import(old: Sequence[Entry], new: Sequence[Entry]) -> list[Operation]:
    """The operations that turn subtree `old` into `new`: adds (parents
    first), modifications of entries in both, deletes (children first)."""
    old_by = {normalize_dn(e.dn): e for e in old}
    new_by = {normalize_dn(e.dn): e for e in new}
    ops: list[Operation] = []
    for key, entry in new_by.items():
        if key not in old_by:
            ops.append(Add(entry))
    for key, entry in new_by.items():
        before = old_by.get(key)
        if before is None:
            continue
        changes = []
        names = {k.lower(): k for k in [*before.attrs, *entry.attrs]}
        for low, name in sorted(names.items()):
            if low in ("objectclass", "cn"):
                continue
            want = entry.get(name)
            if [_text(v) for v in before.get(name)] != [_text(v) for v in want]:
                changes.append(Modification("replace", name, tuple(want)))
        if changes:
            ops.append(Modify(entry.dn, tuple(changes)))
    gone = [e for key, e in old_by.items() if key not in new_by]
    gone.sort(key=lambda e: -normalize_dn(e.dn).count(","))
    ops += [Delete(e.dn) for e in gone]
    return ops


async def write_entries(port: DirectoryPort, dn: str, entries: Sequence[Entry]) -> int:
    """Make the subtree at `dn` hold exactly `entries`; the number of
    operations. The embedded directory applies them as one atomic file
    write; LDAP has no multi-entry transaction, so they go one by one in
    an order that keeps the tree whole (a running server may read a
    mix of old and new meanwhile, and reads again after the last)."""
    from mlink.directory.embedded import EmbeddedPort

    ops = plan_import(await read_subtree(port, dn), entries)
    if not ops:
        return 0
    if isinstance(port, EmbeddedPort):
        await port.write(ops)
    else:
        for op in ops:
            await port.write([op])
    return len(ops)


# -- live changes ------------------------------------------------------------------------------


def _fingerprint(entries: Iterable[Entry]) -> list[tuple[str, list[tuple[str, list[str]]]]]:
    return sorted((normalize_dn(e.dn), sorted((k.lower(), [_text(v) for v in vals])
                                              for k, vals in e.attrs.items()))
                  for e in entries)


def _is_running(config: Config, entries: Sequence[Entry]) -> bool:
    """Whether `entries` give `config`: the first read compares with the
    configuration the server started with, so a change made between the
    start and that read is not missed."""
    if config.path is None:
        return True
    try:
        return build_config(bootstrap_of(config.path), entries) == config
    except ConfigError:
        return False  # the reload logs why


async def watch_configuration(config: Config, reload: Callable[[], Awaitable[Any]],
                              interval: float | None = None) -> None:
    """Read the server entry's subtree every `changes-seconds` and call
    `reload` when it differs from the last read. Runs until cancelled;
    an unreachable directory is logged once per outage."""
    from mlink.directory import open_directory

    entry = config.configuration.entry
    period = interval if interval is not None else config.directory.changes_seconds
    directory = open_directory(config.directory)
    port: DirectoryPort = directory.port  # type: ignore[attr-defined]
    last: list[Any] | None = None
    failing = False
    try:
        while True:
            try:
                entries = await read_subtree(port, entry)
                now = _fingerprint(entries)
            except DirectoryError as exc:
                if not failing:
                    log.warning("configuration entry %s: cannot read the directory: %s; "
                                "retrying every %.1f s", entry, exc, period)
                failing = True
            else:
                if failing:
                    log.info("configuration entry %s: directory reachable again", entry)
                failing = False
                if (now != last if last is not None
                        else not _is_running(config, entries)):
                    log.info("configuration entry %s changed in the directory: reloading",
                             entry)
                    await reload()
                last = now
            await trio.sleep(period)
    finally:
        with trio.CancelScope(shield=True):
            await directory.aclose()
