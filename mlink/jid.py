"""JIDs (RFC 7622): parse, prepare and compare.

Localparts use the PRECIS UsernameCaseMapped profile, resourceparts the
OpaqueString profile and domainparts IDNA-style lowercase, so two spellings
of one address compare equal everywhere in the server.

Every JID a client sends (stream `to`, bind resource, stanza `to`/`from`,
SASL user names) is prepared here, on the shard's event loop, before the
client has proved anything. So preparation must cost time linear in a
bounded input: each part is refused on its length before any PRECIS or IDNA
work, and the PRECIS string-class check (with its RFC 5892 context rules) is
done by `_PrecisProfile`, not by precis-i18n's `BaseClass.enforce`, which
rescans the whole string for every KATAKANA MIDDLE DOT or Arabic-Indic digit
(quadratic: 9 KB of them stalled a shard for seconds; see
bench/jid_stall.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

import precis_i18n
from precis_i18n.baseclass import raise_error
from precis_i18n.context import context_rule_error
from precis_i18n.derived import CONTEXTJ, CONTEXTO, FREE_PVAL, PVALID, derived_property
from precis_i18n.unicode import UnicodeData

# RFC 7622 §3.1: each part is at most 1023 octets once prepared.
MAX_PART_BYTES = 1023
# How many times smaller (in UTF-8 octets) preparation can make a part, at
# most, rounded up. The PRECIS mappings shrink single code points at most
# 3:1 (fullwidth ASCII U+FF01..FF5E, KELVIN SIGN and IDEOGRAPHIC SPACE are 3
# octets and become 1), and NFC then composes: FULLWIDTH U (3 octets) +
# U+0308 + U+0304 (2 + 2) become U+01D6 (2 octets), 3.5:1, the worst case
# over all of Unicode (tests/test_jid.py recomputes it). A 3x bound would
# refuse valid JIDs; 4x never does. Nothing in these profiles maps a code
# point to nothing, so there is no unbounded shrink.
MAX_PREP_SHRINK = 4
# A part longer than this (UTF-8 octets, before preparation) cannot be
# 1023 octets or less after it, so it is refused before any PRECIS work.
MAX_PART_INPUT_BYTES = MAX_PREP_SHRINK * MAX_PART_BYTES
# RFC 5890 §2.3.2.1 / RFC 1035 §2.3.4: a DNS label (its ACE form for an
# internationalised one) is at most 63 octets; Python's idna codec enforces
# this, but only after nameprep and Punycode, and Punycode costs time
# quadratic in a label's distinct code points (1,364 CJK: 0.3 s).
MAX_LABEL_BYTES = 63
# Most code points one prepared character comes from: NFC composes at most 4
# code points into one (the longest canonical decomposition, e.g. U+1FAF).
# A longer label cannot fit in MAX_LABEL_BYTES once prepared, unless it
# relies on IDNA2003 mapping characters to nothing (soft hyphens, variation
# selectors), which the IDNA2008 rules RFC 7622 §3.2 requires forbid.
MAX_COMPOSED_CODE_POINTS = 4
MAX_LABEL_INPUT_CHARS = MAX_COMPOSED_CODE_POINTS * MAX_LABEL_BYTES
# The label separators of IDNA2003 (RFC 3490 §3.1), as the idna codec splits.
_IDNA_DOTS = re.compile("[.\u3002\uff0e\uff61]")
# RFC 7622 §3.3.1: characters a localpart may never contain.
_LOCAL_FORBIDDEN = set("\"&'/:<>@")
# parse_jid's cache: distinct JIDs kept (least recently used dropped first),
# and the longest text cached. A real JID is well under 256 characters; at
# ~0.45 KiB per entry the cache stays under ~16 MiB per shard even when an
# attacker fills it, and a long JID (at most a few milliseconds to prepare)
# cannot pin kilobytes per entry.
JID_CACHE_ENTRIES = 16384
JID_CACHE_MAX_CHARS = 256

# RFC 5892 Appendix A.1: ZERO WIDTH NON-JOINER, the one context rule that
# looks beyond a neighbouring character.
_ZWNJ = 0x200C
# Joining types (Unicode ArabicShaping.txt) as precis-i18n names them.
_JOIN_TRANSPARENT = "T"
_JOIN_LEFT = ("L", "D")
_JOIN_RIGHT = ("R", "D")


class InvalidJID(ValueError):
    """Not a valid JID; stanza error `jid-malformed`."""


class _Context:
    """The RFC 5892 Appendix A context rules for one string, in linear time.

    precis-i18n evaluates the whole-string rules (A.7 KATAKANA MIDDLE DOT,
    A.8 ARABIC-INDIC DIGITS, A.9 EXTENDED ARABIC-INDIC DIGITS) by scanning
    the string again for every such character, and A.1 (ZERO WIDTH
    NON-JOINER) by copying the string on each side of every ZWNJ. Here each
    whole-string fact is computed once, on first need, and a ZWNJ's joining
    context is walked in place. The other rules look only at a neighbour
    and are left to the library. The answers are the library's (the rule
    names too): tests/test_jid.py compares both on random strings.
    """

    def __init__(self, value: str, ucd: UnicodeData) -> None:
        self._value = value
        self._ucd = ucd
        self._has_hkh: bool | None = None
        self._has_arabic_indic: bool | None = None
        self._has_extended_arabic_indic: bool | None = None
        # precis-i18n has no public name for a code point's joining type.
        self._join_type: Callable[[int], str | None] = ucd._join_type  # type: ignore[attr-defined]

    def error(self, offset: int) -> str:
        """'' when the context rule for `value[offset]` holds, else its name."""
        ucd = self._ucd
        cp = ord(self._value[offset])
        if ucd.arabic_indic(cp):
            if self._has_extended_arabic_indic is None:
                self._has_extended_arabic_indic = any(
                    ucd.extended_arabic_indic(ord(ch)) for ch in self._value)
            return "arabic_indic" if self._has_extended_arabic_indic else ""
        if ucd.extended_arabic_indic(cp):
            if self._has_arabic_indic is None:
                self._has_arabic_indic = any(ucd.arabic_indic(ord(ch)) for ch in self._value)
            return "extended_arabic_indic" if self._has_arabic_indic else ""
        if cp == 0x30FB:
            if self._has_hkh is None:
                self._has_hkh = any(
                    ucd.hiragana_katakana_han_script(ord(ch)) for ch in self._value)
            return "" if self._has_hkh else "katakana_middle_dot"
        if cp == _ZWNJ:
            return "" if self._zwnj_ok(offset) else "zero_width_nonjoiner"
        return context_rule_error(self._value, offset, ucd)

    def _zwnj_ok(self, offset: int) -> bool:
        # A.1: after a virama, or (Joining_Type:{L,D})(Joining_Type:T)*
        # before it and (Joining_Type:T)*(Joining_Type:{R,D}) after it.
        # Each walk passes only transparent characters and a ZWNJ is not
        # one, so a run of them is walked by at most the ZWNJ just before it
        # and the one just after it: linear over the string.
        value = self._value
        if offset > 0 and self._ucd.combining_virama(ord(value[offset - 1])):
            return True
        return self._joins(range(offset - 1, -1, -1), _JOIN_LEFT) and self._joins(
            range(offset + 1, len(value)), _JOIN_RIGHT)

    def _joins(self, walk: range, wanted: tuple[str, ...]) -> bool:
        """Whether the first non-transparent character along `walk` has a
        joining type in `wanted` (False when there is none)."""
        for i in walk:
            join_type = self._join_type(ord(self._value[i]))
            if join_type != _JOIN_TRANSPARENT:
                return join_type in wanted
        return False


class _PrecisProfile:
    """A precis-i18n profile whose string-class check is linear in the input.

    The five mapping rules and the idempotence check are the library's (all
    linear); only `BaseClass.enforce` is redone, with `_Context` for the
    context rules, so results and error texts stay the library's.
    """

    def __init__(self, name: str, allowed: frozenset[str]) -> None:
        self._profile = precis_i18n.get_profile(name)
        self._ucd: UnicodeData = self._profile.base.ucd
        self._allowed = allowed
        self.name: str = self._profile.name

    def enforce(self, value: str) -> str:
        """Prepare `value`; UnicodeEncodeError when the profile refuses it."""
        profile = self._profile
        temp = profile.idempotence_check(profile.apply_five_rules(value))
        if not temp:
            raise_error(self.name, value, -1, "empty")
        context: _Context | None = None
        for i, char in enumerate(temp):
            prop, kind = derived_property(ord(char), self._ucd)
            if prop in self._allowed:
                continue
            if prop in (CONTEXTJ, CONTEXTO):
                if context is None:
                    context = _Context(temp, self._ucd)
                kind = context.error(i)
                if not kind:
                    continue
            raise_error(self.name, temp, i, kind)
        return temp


# RFC 8264 §9.1 and §9.2: what each string class lets through without context.
_USERNAME = _PrecisProfile("UsernameCaseMapped", frozenset({PVALID}))  # IdentifierClass
_OPAQUE = _PrecisProfile("OpaqueString", frozenset({PVALID, FREE_PVAL}))  # FreeformClass


def _too_long(part: str, limit: int = MAX_PART_INPUT_BYTES) -> bool:
    """Whether `part` is over `limit` UTF-8 octets, cheaply for long strings."""
    if len(part) > limit:  # every code point is at least one octet
        return True
    return len(part.encode("utf-8", "surrogatepass")) > limit


def _refusal(part: str, exc: UnicodeError) -> str:
    """What the PRECIS profile refused, in words a user can act on: the
    character, its code point and the rule ("bad localpart: ' ' (U+0020)
    is not allowed: spaces"), not the codec's internals."""
    if isinstance(exc, UnicodeEncodeError) and 0 <= exc.start < len(exc.object):
        char = exc.object[exc.start]
        rule = exc.reason.rsplit("/", 1)[-1].replace("_", " ").lower()
        return f"bad {part}: {char!r} (U+{ord(char):04X}) is not allowed: {rule}"
    if isinstance(exc, UnicodeEncodeError) and exc.reason.endswith("empty"):
        return f"empty {part}"
    return f"bad {part}"


def prep_localpart(local: str) -> str:
    """RFC 7622 §3.3: the localpart, prepared (UsernameCaseMapped)."""
    if _too_long(local):
        raise InvalidJID("localpart too long")
    try:
        out = _USERNAME.enforce(local)
    except UnicodeError as exc:
        raise InvalidJID(_refusal("localpart", exc)) from None
    forbidden = sorted(_LOCAL_FORBIDDEN & set(out))
    if forbidden:
        raise InvalidJID(f"bad localpart: {forbidden[0]!r} is not allowed in a localpart "
                         "(RFC 7622 §3.3.1)")
    if not out or len(out.encode()) > MAX_PART_BYTES:
        raise InvalidJID("bad localpart")
    return out


def prep_resource(resource: str) -> str:
    """RFC 7622 §3.4: the resourcepart, prepared (OpaqueString)."""
    if _too_long(resource):
        raise InvalidJID("resourcepart too long")
    try:
        out = _OPAQUE.enforce(resource)
    except UnicodeError as exc:
        raise InvalidJID(_refusal("resourcepart", exc)) from None
    if not out or len(out.encode()) > MAX_PART_BYTES:
        raise InvalidJID("bad resourcepart")
    return out


def prep_domain(domain: str) -> str:
    """RFC 7622 §3.2: the domainpart, lowercased (IDNA for non-ASCII)."""
    domain = domain.rstrip(".")
    if not domain:
        raise InvalidJID("empty domainpart")
    if _too_long(domain):
        raise InvalidJID("domainpart too long")
    if not domain.isascii() and any(
        len(label) > MAX_LABEL_INPUT_CHARS for label in _IDNA_DOTS.split(domain)
    ):
        raise InvalidJID("domain label too long")
    try:
        out = (
            domain.encode("idna").decode("ascii").lower()
            if not domain.isascii()
            else domain.lower()
        )
    except UnicodeError as exc:
        raise InvalidJID(f"bad domainpart: {exc}") from None
    forbidden = [c for c in " /@<>'\"&" if c in out]
    if forbidden:
        raise InvalidJID(f"bad domainpart: {forbidden[0]!r} is not allowed in a domain")
    if len(out) > MAX_PART_BYTES or ".." in out:
        raise InvalidJID("bad domainpart")
    return out


class JID(NamedTuple):
    local: str
    domain: str
    resource: str

    @property
    def bare(self) -> JID:
        # A bare JID is its own bare JID (tuples are immutable): no new
        # object for the several bare-JID checks each stanza goes through.
        if not self.resource:
            return self
        return JID(self.local, self.domain, "")

    def __str__(self) -> str:
        out = f"{self.local}@{self.domain}" if self.local else self.domain
        return f"{out}/{self.resource}" if self.resource else out


def parse_jid(text: str) -> JID:
    """Parse and prepare `text`; InvalidJID when it cannot be a JID.

    Short texts (all real JIDs) go through a bounded LRU cache: the router
    parses the same few addresses for every stanza.
    """
    if len(text) <= JID_CACHE_MAX_CHARS:
        return _parse_cached(text)
    return _parse(text)


def _parse(text: str) -> JID:
    rest, slash, resource = text.partition("/")
    if slash and not resource:
        raise InvalidJID("empty resourcepart")
    local, at, domain = rest.rpartition("@")
    if at and not local:
        raise InvalidJID("empty localpart")
    return JID(
        prep_localpart(local) if at else "",
        prep_domain(domain),
        prep_resource(resource) if slash else "",
    )


_parse_cached = lru_cache(maxsize=JID_CACHE_ENTRIES)(_parse)


def set_cache_size(entries: int) -> None:
    """Resize the JID cache (the server does at start, from `<caches>`)."""
    global _parse_cached
    if entries != _parse_cached.cache_info().maxsize:
        _parse_cached = lru_cache(maxsize=entries)(_parse)


def cache_size() -> tuple[int, int]:
    """(entries now, bound) of the JID cache, for `mlink status`."""
    info = _parse_cached.cache_info()
    return info.currsize, info.maxsize or 0
