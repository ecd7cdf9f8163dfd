"""The LDAP schema of mlink's configuration, generated from the configuration schema.

The configuration held in the directory (`mlink.config_directory`) is
another serialisation of the one model in `mlink.config_model`, as the
XML file is: every XML attribute, text child and module option becomes
one LDAP attribute named `mlinkCfg` + its XML name in camel case
(`stanza-bytes` -> `mlinkCfgStanzaBytes`), every element one entry. The
attribute types are found by walking the schema (`schema_attributes`), so
a setting added to the model is an attribute here as soon as the schema
files are regenerated, and `--check` (run by tests/test_config_directory.py)
fails while they are stale: the two cannot drift.

Why plain Directory String values rather than INTEGER or BOOLEAN syntaxes:
mlink checks every value with the same kinds that check the file, and a
bad value edited with `ldapmodify` must reach mlink to be refused with a
line naming the entry and attribute (slapd's own refusal would name no
setting and leave the administrator guessing what is allowed).

OIDs: the arc 1.3.6.1.4.1.32473.1.3 (under mlink's documentation arc, see
conf/mlink-schema.ldif): .1.N attribute types, .2.N object classes. A
name keeps its number for good: the generator reads the numbers already in
conf/mlink-config.schema and gives new names the next ones, so an
attribute never changes OID when others are added.

    python -m mlink.config_dirschema          # rewrite the two files
    python -m mlink.config_dirschema --check  # exit 1 if they are stale
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlink.config_model import Config, ModuleEntry
from mlink.config_schema import option_setting, setting_of

CONF_DIR = Path(__file__).resolve().parent / "conf"
SCHEMA_FILE = CONF_DIR / "mlink-config.schema"
LDIF_FILE = CONF_DIR / "mlink-config.ldif"

# The prefix of every configuration attribute (`mlinkCfgStanzaBytes`).
PREFIX = "mlinkCfg"
# The server entry's structural class, and its children's.
SERVER_CLASS = "mlinkServer"
ELEMENT_CLASS = "mlinkConfigElement"
# mlink's documentation arc (conf/mlink-schema.ldif), configuration branch.
OID_ARC = "1.3.6.1.4.1.32473.1.3"
# RFC 4517 Directory String: UTF-8 text, checked by mlink, not by slapd.
DIRECTORY_STRING = "1.3.6.1.4.1.1466.115.121.1.15"

_OID_RE = re.compile(r"\(\s*" + re.escape(OID_ARC) + r"\.(1|2)\.([0-9]+)\s+NAME\s+'([^']+)'")


def ldap_name(xml: str) -> str:
    """The LDAP attribute for XML name `xml`: `stanza-bytes` -> mlinkCfgStanzaBytes."""
    return PREFIX + "".join(part[:1].upper() + part[1:] for part in re.split(r"[-_]", xml))


def xml_name(ldap: str) -> str | None:
    """The XML name of configuration attribute `ldap` (any case), None when
    it is not one: mlinkCfgStanzaBytes -> stanza-bytes. Case is lost in
    LDAP, so this reads the canonical name from the attribute table."""
    canonical = attribute_names().get(ldap.lower())
    if canonical is None:
        return None
    return re.sub(r"(?<!^)(?=[A-Z])", "-", canonical[len(PREFIX):]).lower()


@dataclass(slots=True)
class SchemaAttribute:
    """One configuration attribute type: its XML name, where it appears
    (for DESC), and whether any place takes several values."""

    xml: str
    places: list[str]
    multi: bool = False


def _module_options_classes() -> list[tuple[str, type]]:
    """(name, OPTIONS) of every module shipped in mlink.modules."""
    import mlink.modules as package

    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "util":
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        options = getattr(module, "OPTIONS", None)
        if isinstance(options, type) and dataclasses.is_dataclass(options):
            found.append((info.name, options))
    return found


def schema_attributes() -> dict[str, SchemaAttribute]:
    """Every configuration attribute, by LDAP name, from a walk of the
    configuration schema and the shipped modules' OPTIONS."""
    out: dict[str, SchemaAttribute] = {}

    def add(xml: str, place: str, multi: bool = False) -> None:
        name = ldap_name(xml)
        item = out.setdefault(name, SchemaAttribute(xml, []))
        if item.xml != xml:
            raise ValueError(f"{xml!r} and {item.xml!r} both map to {name}")
        if place not in item.places:
            item.places.append(place)
        item.multi = item.multi or multi

    def walk(cls: Any, tag: str) -> None:
        for extra in cls.XML.extra:
            add(extra.xml, f"<{tag}>")
        for f in dataclasses.fields(cls):
            s = setting_of(f)
            if s is None or s.xml is None:
                continue
            if s.where == "attr":
                add(s.xml, f"<{s.element or tag}>")
            elif s.where == "texts":
                add(s.xml, f"<{tag}>", multi=True)
            elif s.where in ("section", "sections") and s.cls is not None:
                walk(s.cls, s.xml)
            elif s.where == "custom" and s.xml == "modules":
                walk(ModuleEntry, "module")
                for name, options in _module_options_classes():
                    for opt in dataclasses.fields(options):
                        if opt.init:
                            xml = option_setting(opt).xml
                            assert xml is not None
                            add(xml, f"module {name}")

    walk(Config, "mlink")
    return dict(sorted(out.items(), key=lambda kv: kv[0].lower()))


_names_cache: dict[str, str] | None = None


def attribute_names() -> dict[str, str]:
    """lower-case name -> canonical name of every configuration attribute,
    read from the shipped schema file (cheap: no module is imported)."""
    global _names_cache
    if _names_cache is None:
        text = SCHEMA_FILE.read_text(encoding="utf-8")
        _names_cache = {name.lower(): name for kind, _, name in _OID_RE.findall(text)
                        if kind == "1"}
    return _names_cache


def _numbers(text: str) -> dict[tuple[str, str], int]:
    return {(kind, name): int(number) for kind, number, name in _OID_RE.findall(text)}


def _desc(item: SchemaAttribute) -> str:
    text = f"mlink configuration: {item.xml} of {', '.join(item.places)}"
    return text.replace("'", "").replace("\\", "")[:200]


def render(previous: str) -> tuple[str, str]:
    """(slapd.conf text, cn=config LDIF text), keeping the numbers in `previous`."""
    numbers = _numbers(previous)
    attributes = schema_attributes()

    def number(kind: str, name: str) -> int:
        if (kind, name) not in numbers:
            numbers[(kind, name)] = max([n for (k, _), n in numbers.items() if k == kind],
                                        default=0) + 1
        return numbers[(kind, name)]

    attr_defs = []
    for name, item in attributes.items():
        single = "" if item.multi else " SINGLE-VALUE"
        attr_defs.append(f"( {OID_ARC}.1.{number('1', name)} NAME '{name}' "
                         f"DESC '{_desc(item)}' EQUALITY caseExactMatch "
                         f"SYNTAX {DIRECTORY_STRING}{single} )")
    may = " $ ".join(["description", *attributes])
    class_defs = [
        f"( {OID_ARC}.2.{number('2', SERVER_CLASS)} NAME '{SERVER_CLASS}' "
        f"DESC 'an mlink server configuration entry (the <mlink> element)' SUP top "
        f"STRUCTURAL MUST cn MAY ( {may} ) )",
        f"( {OID_ARC}.2.{number('2', ELEMENT_CLASS)} NAME '{ELEMENT_CLASS}' "
        f"DESC 'one element of an mlink server configuration, below its mlinkServer' "
        f"SUP top STRUCTURAL MUST cn MAY ( {may} ) )",
    ]
    header = (
        "mlink configuration schema, GENERATED by `python -m mlink.config_dirschema` from\n"
        "mlink/config_model.py and the modules' OPTIONS: do not edit. See docs/directory.md.\n"
        f"OIDs: {OID_ARC}.1.N attribute types, {OID_ARC}.2.N object classes\n"
        "(1.3.6.1.4.1.32473 is RFC 5612's documentation number: a PLACEHOLDER, see\n"
        "conf/mlink-schema.ldif). Values are Directory Strings that mlink checks itself.\n"
    )
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    conf = comment + "\n" + "".join(f"attributetype {d}\n\n" for d in attr_defs) + \
        "".join(f"objectclass {d}\n\n" for d in class_defs)
    ldif = (comment + "# Load with: ldapadd -Y EXTERNAL -H ldapi:/// -f mlink-config.ldif\n"
            "dn: cn=mlink-config,cn=schema,cn=config\nobjectClass: olcSchemaConfig\n"
            "cn: mlink-config\n"
            + "".join(f"olcAttributeTypes: {{{i}}}{d}\n" for i, d in enumerate(attr_defs))
            + "".join(f"olcObjectClasses: {{{i}}}{d}\n" for i, d in enumerate(class_defs)))
    return conf, ldif


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    previous = SCHEMA_FILE.read_text(encoding="utf-8") if SCHEMA_FILE.exists() else ""
    conf, ldif = render(previous)
    if "--check" in args:
        stale = [p.name for p, text in ((SCHEMA_FILE, conf), (LDIF_FILE, ldif))
                 if not p.exists() or p.read_text(encoding="utf-8") != text]
        if stale:
            print(f"{', '.join(stale)} stale: run python -m mlink.config_dirschema",
                  file=sys.stderr)
            return 1
        return 0
    SCHEMA_FILE.write_text(conf, encoding="utf-8")
    LDIF_FILE.write_text(ldif, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
