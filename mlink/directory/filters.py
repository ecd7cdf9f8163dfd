"""LDAP search filters (RFC 4515): a parser, and a matcher for the embedded
directory.

The configuration checks every `<group filter=...>` with `parse_filter`, so
a typo is a `file:line` error at startup rather than a failed search at
every refresh (libldap reports a bad filter as a client-side error, which
looks like a lost connection). The embedded directory evaluates the same
filters over its entries with `matches`, so one configuration works on both
backends.

Matching is simplified, and says so: every comparison ignores case (true of
the attributes groups are selected by: objectClass, cn, ou, description),
`~=` is equality, `>=`/`<=` compare strings, and extensible matches (`:=`)
are refused at parse time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# A configured filter is a line or two; deeper nesting than this is a
# mistake, and the recursive parser must not be driven into Python's limit.
MAX_FILTER_DEPTH = 32
# Room for a certificate assertion (SASL EXTERNAL's directory mapping):
# three characters (\\XX) per byte of a DER certificate of up to 5 KB.
MAX_FILTER_LENGTH = 16384

Value = str | bytes


class FilterError(ValueError):
    """Not an RFC 4515 filter this module understands; the message says where."""


@dataclass(frozen=True, slots=True)
class Filter:
    """A parsed filter: `op` is one of & | ! = ~= >= <= present substring."""

    op: str
    attribute: str = ""
    value: str = ""
    parts: tuple[Filter, ...] = ()
    # substring: initial, any..., final ("" when absent)
    initial: str = ""
    middle: tuple[str, ...] = ()
    final: str = ""


def _unescape(text: str, where: int) -> str:
    """Decode `\\XX` escapes of an assertion value (bytes, then UTF-8)."""
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
                raise FilterError(f"bad escape at offset {where + i}: use \\XX (two hex digits)")
            out.append(int(pair, 16))
            i += 3
            continue
        if ch in "()*\0":
            raise FilterError(f"unescaped {ch!r} in a value at offset {where + i}")
        out += ch.encode("utf-8")
        i += 1
    return out.decode("utf-8", "replace")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, problem: str) -> FilterError:
        return FilterError(f"{problem} at offset {self.pos}")

    def filter(self, depth: int) -> Filter:
        if depth > MAX_FILTER_DEPTH:
            raise self.fail(f"nested deeper than {MAX_FILTER_DEPTH}")
        if self.pos >= len(self.text) or self.text[self.pos] != "(":
            raise self.fail("expected '('")
        self.pos += 1
        if self.pos >= len(self.text):
            raise self.fail("unexpected end")
        ch = self.text[self.pos]
        if ch in "&|":
            self.pos += 1
            parts = []
            while self.pos < len(self.text) and self.text[self.pos] == "(":
                parts.append(self.filter(depth + 1))
            if not parts:
                raise self.fail(f"'{ch}' needs at least one filter")
            result = Filter(ch, parts=tuple(parts))
        elif ch == "!":
            self.pos += 1
            result = Filter("!", parts=(self.filter(depth + 1),))
        else:
            result = self.item()
        if self.pos >= len(self.text) or self.text[self.pos] != ")":
            raise self.fail("expected ')'")
        self.pos += 1
        return result

    def item(self) -> Filter:
        end = self.text.find(")", self.pos)
        if end < 0:
            raise self.fail("expected ')'")
        body = self.text[self.pos : end]
        start = self.pos
        self.pos = end
        eq = body.find("=")
        if eq <= 0:
            raise FilterError(f"expected attribute=value at offset {start}")
        op = "="
        attribute = body[:eq]
        if attribute[-1] in "~<>":
            op = attribute[-1] + "="
            attribute = attribute[:-1]
        if ":" in attribute:
            raise FilterError(f"extensible matches (':=') are not supported, at offset {start}")
        # Options (RFC 4512 §2.5: `userCertificate;binary`) are part of the name.
        if not attribute or not all(c.isalnum() or c in "-.;" for c in attribute):
            raise FilterError(f"bad attribute name {attribute!r} at offset {start}")
        raw = body[eq + 1 :]
        where = start + eq + 1
        if op == "=" and raw == "*":
            return Filter("present", attribute=attribute)
        if op == "=" and "*" in raw:
            pieces = raw.split("*")
            return Filter(
                "substring",
                attribute=attribute,
                initial=_unescape(pieces[0], where),
                middle=tuple(_unescape(p, where) for p in pieces[1:-1] if p),
                final=_unescape(pieces[-1], where),
            )
        return Filter(op, attribute=attribute, value=_unescape(raw, where))


def parse_filter(text: str) -> Filter:
    """Parse an RFC 4515 filter; FilterError (with an offset) if it is not one."""
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterError(f"longer than {MAX_FILTER_LENGTH} characters")
    text = text.strip()
    parser = _Parser(text)
    result = parser.filter(0)
    if parser.pos != len(text):
        raise parser.fail("unexpected text after the filter")
    return result


def _fold(value: Value) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return " ".join(value.lower().split())


def matches(flt: Filter, get: Callable[[str], Sequence[Value]]) -> bool:
    """Whether an entry matches; `get(name)` gives an attribute's values
    (names compared without case by the caller)."""
    if flt.op == "&":
        return all(matches(p, get) for p in flt.parts)
    if flt.op == "|":
        return any(matches(p, get) for p in flt.parts)
    if flt.op == "!":
        return not matches(flt.parts[0], get)
    values = [_fold(v) for v in get(flt.attribute)]
    if flt.op == "present":
        return bool(values)
    if flt.op == "substring":
        initial, final = _fold(flt.initial), _fold(flt.final)
        middle = [_fold(m) for m in flt.middle]
        for value in values:
            if not value.startswith(initial):
                continue
            pos = len(initial)
            ok = True
            for piece in middle:
                found = value.find(piece, pos)
                if found < 0:
                    ok = False
                    break
                pos = found + len(piece)
            if ok and len(value) - pos >= len(final) and value.endswith(final):
                return True
        return False
    wanted = _fold(flt.value)
    if flt.op in ("=", "~="):
        return wanted in values
    if flt.op == ">=":
        return any(v >= wanted for v in values)
    return any(v <= wanted for v in values)  # "<="
