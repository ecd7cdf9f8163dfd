"""A small LDIF (RFC 2849) reader and writer for content records.

Enough for the embedded directory and for files `slapadd` loads: `dn:` and
attribute lines, base64 (`::`) values, folded lines, comments and the
`version:` line. Change records (`changetype:`) and URL values (`:<`) are
refused: the embedded directory never writes them, and silently dropping
them would lose data.

Values are `str` when they are valid UTF-8 and `bytes` otherwise (a
`jpegPhoto`, say), so a file read and written back is unchanged in content.
"""

from __future__ import annotations

import base64
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

Value = str | bytes

# RFC 2849 suggests lines of at most 76 characters; readers must unfold.
FOLD_WIDTH = 76


class LDIFError(ValueError):
    """The text is not LDIF this module understands."""


@dataclass(slots=True)
class Entry:
    """One LDIF content record: a DN and its attributes in file order.

    Attribute names keep their spelling; `get`/`set` compare them without
    case, as LDAP does.
    """

    dn: str
    attrs: dict[str, list[Value]] = field(default_factory=dict)

    def _key(self, name: str) -> str | None:
        if name in self.attrs:
            return name  # spelt as stored (no two keys differ only in case)
        low = name.lower()
        for key in self.attrs:
            if key.lower() == low:
                return key
        return None

    def get(self, name: str) -> list[Value]:
        key = self._key(name)
        return list(self.attrs[key]) if key is not None else []

    def first(self, name: str) -> Value | None:
        values = self.get(name)
        return values[0] if values else None

    def set(self, name: str, values: Iterable[Value]) -> None:
        values = list(values)
        key = self._key(name)
        if key is not None and not values:
            del self.attrs[key]
        elif key is not None:
            self.attrs[key] = values
        elif values:
            self.attrs[name] = values

    def copy(self) -> Entry:
        return Entry(self.dn, {k: list(v) for k, v in self.attrs.items()})


# --- writing -------------------------------------------------------------

_SAFE_INIT_EXCLUDED = {0x00, 0x0A, 0x0D, 0x20, 0x3A, 0x3C}  # NUL LF CR SP : <


def _is_safe_string(data: bytes) -> bool:
    """RFC 2849 SAFE-STRING: ASCII without NUL/CR/LF, not starting with
    space, colon or '<'. We also refuse a trailing space, which many tools
    would strip."""
    if not data:
        return True
    if data[0] in _SAFE_INIT_EXCLUDED or data[-1] == 0x20:
        return False
    return all(0 < b < 0x80 and b not in (0x0A, 0x0D) for b in data)


def _fold(line: str) -> str:
    if len(line) <= FOLD_WIDTH:
        return line
    parts = [line[:FOLD_WIDTH]]
    rest = line[FOLD_WIDTH:]
    while rest:
        parts.append(" " + rest[: FOLD_WIDTH - 1])
        rest = rest[FOLD_WIDTH - 1 :]
    return "\n".join(parts)


def format_line(name: str, value: Value) -> str:
    """One `name: value` (or `name:: base64`) line, folded."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    if _is_safe_string(data):
        line = f"{name}: {data.decode('ascii')}" if data else f"{name}:"
    else:
        line = f"{name}:: {base64.b64encode(data).decode('ascii')}"
    return _fold(line)


def format_entry(entry: Entry) -> str:
    lines = [format_line("dn", entry.dn)]
    for name, values in entry.attrs.items():
        lines.extend(format_line(name, v) for v in values)
    return "\n".join(lines) + "\n"


def dumps(entries: Iterable[Entry], header: str | None = None) -> str:
    """LDIF text for `entries`, in order (parents must come first for
    slapadd). `header` becomes leading comment lines. No `version: 1` line:
    it is optional (RFC 2849) and OpenLDAP 2.5's slapadd refuses it."""
    out: list[str] = []
    if header:
        out.extend(f"# {line}".rstrip() for line in header.splitlines())
        out.append("")
    for entry in entries:
        out.append(format_entry(entry))
    return "\n".join(out)


# --- reading -------------------------------------------------------------


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Unfold continuation lines; yields (line number, line); '' between
    records. Comments (and their continuations) are dropped."""
    current: str | None = None
    current_no = 0
    in_comment = False
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.startswith(" "):
            if in_comment:
                continue
            if current is None:
                raise LDIFError(f"line {number}: continuation line without a line to continue")
            current += raw[1:]
            continue
        if current is not None:
            yield current_no, current
            current = None
        in_comment = False
        if raw.startswith("#"):
            in_comment = True
            continue
        if raw.strip() == "":
            yield number, ""
            continue
        current, current_no = raw, number
    if current is not None:
        yield current_no, current


def _parse_line(number: int, line: str) -> tuple[str, Value]:
    name, sep, rest = line.partition(":")
    if not sep or not name:
        raise LDIFError(f"line {number}: expected 'attribute: value'")
    if rest.startswith(":"):
        try:
            data = base64.b64decode(rest[1:].strip(), validate=True)
        except ValueError as exc:
            raise LDIFError(f"line {number}: bad base64 value") from exc
        try:
            return name, data.decode("utf-8")
        except UnicodeDecodeError:
            return name, data
    if rest.startswith("<"):
        raise LDIFError(f"line {number}: URL values (':<') are not supported")
    return name, rest.lstrip(" ")


def parse(text: str) -> list[Entry]:
    """Content records of an LDIF text, in file order."""
    entries: list[Entry] = []
    current: Entry | None = None
    first = True
    for number, line in _logical_lines(text):
        if line == "":
            current = None
            continue
        name, value = _parse_line(number, line)
        lname = name.lower()
        if current is None:
            if first and lname == "version":
                first = False
                if value != "1":
                    raise LDIFError(f"line {number}: unsupported LDIF version {value!r}")
                continue
            first = False
            if lname != "dn":
                raise LDIFError(f"line {number}: a record must start with 'dn:'")
            if not isinstance(value, str):
                raise LDIFError(f"line {number}: DN is not UTF-8")
            current = Entry(value)
            entries.append(current)
            continue
        if lname in ("changetype", "control"):
            raise LDIFError(f"line {number}: change records are not supported")
        if lname == "dn":
            raise LDIFError(f"line {number}: 'dn:' inside a record (missing blank line?)")
        key = current._key(name)
        if key is None:
            # Every entry spells the same few attribute names, and most
            # share their objectClass values: one string object each for
            # the whole directory, not one per entry (the embedded
            # directory is held in every shard's memory).
            current.attrs[sys.intern(name)] = [
                sys.intern(value) if lname == "objectclass" and isinstance(value, str)
                else value]
        else:
            current.attrs[key].append(
                sys.intern(value) if lname == "objectclass" and isinstance(value, str)
                else value)
    return entries
