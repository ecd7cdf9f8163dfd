"""Write mlink's XML configuration file from the schema (reading it is
`mlink.config`).

The text is commented for a human reader (each element's `comment` in the
schema) and loads back (`load_config`) to an equal `Config`. Sections left
at their defaults are written as commented examples, so the options are
discoverable from the file itself. The format is described in
docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, cast
from xml.sax.saxutils import escape, quoteattr

from mlink.config_model import DEFAULT_MODULES, Config
from mlink.config_schema import PathKind, Setting, option_setting, setting_of

__all__ = ["render_config", "write_config"]

# Attributes go on one line up to this width, then one per line, aligned.
MAX_LINE = 100
INDENT = "  "


def _comment(text: str, indent: str) -> list[str]:
    lines = text.splitlines()
    if not lines:
        return []
    pad = indent + " " * len("<!-- ")
    out = [f"{indent}<!-- {lines[0]}"] + [f"{pad}{line}" for line in lines[1:]]
    out[-1] += " -->"
    return out


def _commented(example: str, indent: str) -> list[str]:
    return [f"{indent}<!--"] + [f"{indent}{line}" for line in example.splitlines()] + \
        [f"{indent}-->"]


def _settings(cls: type) -> list[tuple[dataclasses.Field[Any], Setting]]:
    return [(f, s) for f in dataclasses.fields(cls) if (s := setting_of(f)) is not None]


def _file_references(obj: Any) -> dict[str, Path]:
    """The `X-file` attributes `obj` was read with, by X: a secret that
    came from a file is written as that file's name, so a written-out
    configuration (`mlink config import|export`) never holds it in clear.
    The loader keeps the path in the field named after the attribute
    (`secret-file` -> `secret_file`)."""
    spec = getattr(type(obj), "XML", None)
    out: dict[str, Path] = {}
    for extra in getattr(spec, "extra", ()):
        if extra.xml.endswith("-file"):
            path = getattr(obj, extra.xml.replace("-", "_"), None)
            if path is not None:
                out[extra.xml[: -len("-file")]] = path
    return out


def _attrs(obj: Any, base: Path, element: str | None = None) -> list[str]:
    out = []
    files = _file_references(obj) if element is None else {}
    for f, s in _settings(type(obj)):
        if s.where != "attr" or s.element != element or s.kind is None:
            continue
        if s.xml in files:
            path = PathKind().render(files[s.xml], base)
            out.append(f"{s.xml}-file={quoteattr(path)}")
            continue
        value = getattr(obj, f.name)
        if value is None or value == "":
            continue
        if s.hide_default and value == f.default:
            continue
        out.append(f"{s.xml}={quoteattr(s.kind.render(value, base))}")
    return out


def _open_tag(tag: str, attrs: list[str], indent: str, empty: bool) -> list[str]:
    end = "/>" if empty else ">"
    one = f"{indent}<{tag}{''.join(' ' + a for a in attrs)}{end}"
    if len(one) <= MAX_LINE or len(attrs) < 2:
        return [one]
    pad = indent + " " * (len(tag) + 2)
    lines = [f"{indent}<{tag} {attrs[0]}"] + [f"{pad}{a}" for a in attrs[1:]]
    lines[-1] += end
    return lines


def _element(obj: Any, tag: str, base: Path, indent: str) -> list[str]:
    body = _children(obj, base, indent + INDENT, top=False)
    attrs = _attrs(obj, base)
    if not body:
        return _open_tag(tag, attrs, indent, empty=True)
    return _open_tag(tag, attrs, indent, empty=False) + body + [f"{indent}</{tag}>"]


def _is_default(obj: Any) -> bool:
    try:
        return bool(obj == type(obj)())
    except TypeError:
        return False


def _children(obj: Any, base: Path, indent: str, top: bool) -> list[str]:
    out: list[str] = []
    done_elements: set[str] = set()
    for f, s in _settings(type(obj)):
        value = getattr(obj, f.name)
        lines: list[str] = []
        comment = s.comment
        if s.where == "attr" and s.element is not None and s.element not in done_elements:
            done_elements.add(s.element)
            lines = [f"{indent}<{s.element} {' '.join(_attrs(obj, base, s.element))}/>"]
        elif s.where == "texts":
            lines = [f"{indent}<{s.xml}>{escape(str(v))}</{s.xml}>" for v in value]
        elif s.where == "sections" and s.cls is not None and s.xml is not None:
            comment = comment or cast(Any, s.cls).XML.comment
            for item in value:
                lines += _element(item, s.xml, base, indent)
        elif s.where == "section" and s.cls is not None and s.xml is not None:
            spec = cast(Any, s.cls).XML
            comment = comment or spec.comment
            if s.only_if is not None and not s.only_if({**_values(obj), f.name: value}):
                continue
            if s.hide_default and _is_default(value):
                continue  # an advanced section: written only when set
            if spec.example and spec.example_when is None and _is_default(value):
                lines = _commented(spec.example, indent)
            else:
                lines = _element(value, s.xml, base, indent)
                if spec.example and spec.example_when is not None and spec.example_when(value):
                    lines += _commented(spec.example, indent)
        elif s.where == "custom" and f.name == "modules":
            comment = "Feature modules: all defaults run unless turned off here."
            lines = _render_modules(obj, base, indent)
        if not lines:
            continue
        if top:
            out.append("")
        out += _comment(comment, indent) + lines
    return out


def _values(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _render_modules(cfg: Config, base: Path, indent: str) -> list[str]:
    """<modules> when the list or any option differs from the defaults;
    otherwise a commented example."""
    inner = indent + INDENT
    body: list[str] = []
    for name in DEFAULT_MODULES:
        if name not in cfg.modules:
            body.append(f'{inner}<module name={quoteattr(name)} enabled="false"/>')
    extra = [m for m in cfg.modules if m not in DEFAULT_MODULES]
    for name in [m for m in cfg.modules if m in DEFAULT_MODULES] + extra:
        options = _options(cfg.module_options.get(name), base, inner + INDENT)
        if options:
            body += [f"{inner}<module name={quoteattr(name)}>", *options, f"{inner}</module>"]
        elif name in extra:
            body.append(f"{inner}<module name={quoteattr(name)}/>")
    if not body:
        from mlink.config_model import _MODULES_EXAMPLE

        return _commented(_MODULES_EXAMPLE, indent)
    return [f"{indent}<modules>", *body, f"{indent}</modules>"]


def _options(options: object, base: Path, indent: str) -> list[str]:
    """The options that differ from their defaults, one element each."""
    if options is None or not dataclasses.is_dataclass(options):
        return []
    out = []
    for f in dataclasses.fields(options):
        if not f.init:
            continue
        s = option_setting(f)
        value = getattr(options, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        assert s.kind is not None
        out.append(f"{indent}<{s.xml}>{escape(s.kind.render(value, base))}</{s.xml}>")
    return out


def render_config(cfg: Config, base_dir: Path) -> str:
    """The configuration file text for `cfg`, commented for a human reader.

    Paths are written relative to `base_dir` (where the file will live) when
    they lie inside it. Loading the result gives back an equal `Config`.
    """
    out: list[str] = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        "<!-- mlink configuration. Every element and attribute is described in",
        "     docs/configuration.md. Relative paths are taken from this file's",
        "     directory. Unknown elements or attributes are errors. -->",
        "<mlink>",
    ]
    out += _children(cfg, Path(base_dir), INDENT, top=True)[1:]  # no blank line first
    out += ["</mlink>", ""]
    return "\n".join(out)


def write_config(cfg: Config, path: Path, *, overwrite: bool = False) -> None:
    """Write `cfg` to `path` in the documented format.

    Refuses (FileExistsError) to replace an existing file unless
    `overwrite`, using exclusive creation so two `mlink init` runs cannot
    clobber each other. A file holding an LDAP password is made
    owner-only.
    """
    path = Path(path)
    text = render_config(cfg, path.parent)
    has_secret = cfg.directory.backend == "ldap" and bool(cfg.directory.ldap.bind_password)
    mode = 0o600 if has_secret else 0o644
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
