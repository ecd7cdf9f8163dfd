"""JID preparation (mlink/jid.py): RFC 7622 answers, the length bounds taken
before any PRECIS work, and the linear context rules, which must give
precis-i18n's own answers (its `Profile.enforce` is the reference)."""

from __future__ import annotations

import random
import unicodedata

import precis_i18n
import pytest

from mlink import jid
from mlink.jid import (
    JID,
    JID_CACHE_ENTRIES,
    JID_CACHE_MAX_CHARS,
    MAX_COMPOSED_CODE_POINTS,
    MAX_LABEL_INPUT_CHARS,
    MAX_PART_BYTES,
    MAX_PART_INPUT_BYTES,
    MAX_PREP_SHRINK,
    InvalidJID,
    parse_jid,
    prep_domain,
    prep_localpart,
    prep_resource,
)

# -- valid JIDs keep their prepared form --------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("alice@example.com", JID("alice", "example.com", "")),
    ("Alice@Example.COM/Phone", JID("alice", "example.com", "Phone")),
    ("example.com", JID("", "example.com", "")),
    ("example.com.", JID("", "example.com", "")),
    ("example.com/a/b@c", JID("", "example.com", "a/b@c")),
    ("\uff21lice@example.com", JID("alice", "example.com", "")),  # fullwidth A
    ("\u212aelvin@example.com", JID("kelvin", "example.com", "")),  # KELVIN SIGN
    ("jose\u0301@example.com", JID("jos\u00e9", "example.com", "")),  # NFC
    ("\u00c9milie@b\u00fccher.example", JID("\u00e9milie", "xn--bcher-kva.example", "")),
    ("u@example.com/a\u3000b", JID("u", "example.com", "a b")),  # IDEOGRAPHIC SPACE
    ("\u4e00\u30fb\u4e8c@example.com", JID("\u4e00\u30fb\u4e8c", "example.com", "")),
    ("\u0628\u0661\u0662@example.com/\u06f1\u06f2",
     JID("\u0628\u0661\u0662", "example.com", "\u06f1\u06f2")),
    ("l\u00b7l@example.com", JID("l\u00b7l", "example.com", "")),
    ("a@example.com/\u0628\u200c\u0628", JID("a", "example.com", "\u0628\u200c\u0628")),
    ("a@example.com/\u0915\u094d\u200c", JID("a", "example.com", "\u0915\u094d\u200c")),
])
def test_valid_jids_are_prepared(text, expected):
    assert parse_jid(text) == expected


@pytest.mark.parametrize("text", [
    "", "@example.com", "a@", "a@example.com/", "a\"b@example.com",
    "\u30fb@example.com",  # A.7: no Hiragana, Katakana or Han beside it
    "\u0661\u06f1@example.com",  # A.8/A.9: the two digit sets mixed
    "example.com/\u0661\u06f1",
    "a\u200cb@example.com",  # A.1: no joining context
    "a\u00b7b@example.com",  # A.3: not between two l
    "a@exa mple.com",
])
def test_invalid_jids_are_refused(text):
    with pytest.raises(InvalidJID):
        parse_jid(text)


# -- the same answers as precis-i18n -------------------------------------------------

# Code points the context rules look at, and their neighbours: Han, Hiragana,
# Katakana, both Arabic-Indic digit sets, the joiners, a virama and its
# letters, joining types D, R, L (U+A872, PHAGS-PA) and T, MIDDLE DOT and l,
# the Greek KERAIA and Hebrew GERESH/GERSHAYIM with their scripts, spaces,
# case and width mappings, combining marks, an RTL letter for the bidi rule,
# and a few DISALLOWED characters.
ALPHABET = (
    "\u30fb\u4e00\u3042\u30a2\u0660\u0664\u0669\u06f0\u06f4\u06f9\u200c\u200d"
    "\u094d\u0915\u0628\u0627\ua872\u064b\u0300\u00b7l\u0375\u03b1\u05f3\u05f4\u05d0"
    " \u3000Aa\uff21\u212a\u0308\u0301\u00e9\u0001\u2028\ufffe1"
)
SAMPLES = 4000


def _outcome(enforce, value: str) -> tuple[str, object]:
    try:
        return "ok", enforce(value)
    except UnicodeEncodeError as exc:
        return "refused", (exc.reason, exc.start, exc.end, exc.object)


@pytest.mark.parametrize("profile", ["UsernameCaseMapped", "OpaqueString"])
def test_linear_context_rules_match_the_library(profile):
    ours = {"UsernameCaseMapped": jid._USERNAME, "OpaqueString": jid._OPAQUE}[profile]
    reference = precis_i18n.get_profile(profile)
    rng = random.Random(7622)
    accepted = 0
    for _ in range(SAMPLES):
        value = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 9)))
        expected = _outcome(reference.enforce, value)
        assert _outcome(ours.enforce, value) == expected, ascii(value)
        accepted += expected[0] == "ok"
    # The sample exercises both answers, not just refusals.
    assert SAMPLES // 20 < accepted < SAMPLES - SAMPLES // 20, accepted


@pytest.mark.parametrize("value", [
    "\u30fb" * 50 + "\u4e00",  # every dot legal thanks to the last character
    "\u30fb" * 50,
    "\u0664" * 50,
    "\u0664" * 50 + "\u06f4",
    "\u06f4" * 50,
    "\u0628\u200c" * 30 + "\u0628",
    "\u0628" + "\u064b" * 20 + "\u200c" + "\u064b" * 20 + "\u0627",
    "\u0628" + "\u064b" * 20 + "\u200c" + "\u064b" * 20,
    "\u200c\u0628",
    "\u0915\u094d\u200c" * 10,
    "\u0915\u094d\u200d" * 10,
    "l\u00b7l\u00b7l",
    "\u0375\u03b1\u0375",
    "\u05d0\u05f3\u05f4",
])
def test_tricky_strings_match_the_library(value):
    for name, ours in (("UsernameCaseMapped", jid._USERNAME), ("OpaqueString", jid._OPAQUE)):
        reference = precis_i18n.get_profile(name)
        assert _outcome(ours.enforce, value) == _outcome(reference.enforce, value), name


# -- lengths are checked first ------------------------------------------------------


def test_worst_shrink_still_fits_the_input_bound():
    """FULLWIDTH U + two combining marks (7 octets) prepare to U+01D6 (2): a
    localpart of 3.5 x 1023 input octets is valid, so the bound must be
    above 3 x 1023."""
    value = "\uff35\u0308\u0304" * (MAX_PART_BYTES // 2)
    assert len(value.encode()) > 3 * MAX_PART_BYTES
    assert len(value.encode()) <= MAX_PART_INPUT_BYTES
    assert prep_localpart(value) == "\u01d6" * (MAX_PART_BYTES // 2)


def test_no_preparation_shrinks_more_than_the_bound_allows():
    """Recompute, over all of Unicode, the most octets that can become one
    prepared character: single code points through the profile mappings,
    and each NFC composite from its decomposition, each of whose code
    points may itself come from the longest input that maps to it."""
    profiles = [precis_i18n.get_profile(n) for n in ("UsernameCaseMapped", "OpaqueString")]

    def mapped(profile, char: str) -> str:
        temp = profile.width_mapping_rule(char)
        return profile.case_mapping_rule(profile.additional_mapping_rule(temp))

    longest_source: dict[str, int] = {}  # prepared code point -> most input octets
    worst = 1.0
    chars = [chr(cp) for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF
             and unicodedata.category(chr(cp)) != "Cn"]
    for char in chars:
        for profile in profiles:
            out = mapped(profile, char)
            size = len(char.encode())
            worst = max(worst, size / len(out.encode()))
            if len(out) == 1:
                longest_source[out] = max(longest_source.get(out, 0), size)
    longest_decomposition = 1
    for char in chars:
        parts = unicodedata.normalize("NFD", char)
        if parts == char or unicodedata.normalize("NFC", parts) != char:
            continue
        longest_decomposition = max(longest_decomposition, len(parts))
        source = sum(max(longest_source.get(p, 0), len(p.encode())) for p in parts)
        worst = max(worst, source / len(char.encode()))
    assert worst < MAX_PREP_SHRINK, worst
    assert longest_decomposition <= MAX_COMPOSED_CODE_POINTS


@pytest.mark.parametrize("prep", [prep_localpart, prep_resource, prep_domain])
def test_a_part_over_the_input_bound_is_refused_before_precis(prep, monkeypatch):
    def no_precis(value: str) -> str:
        raise AssertionError("PRECIS work on an over-long part")

    monkeypatch.setattr(jid._USERNAME, "enforce", no_precis)
    monkeypatch.setattr(jid._OPAQUE, "enforce", no_precis)
    monkeypatch.setattr(jid, "_IDNA_DOTS", None)  # prep_domain never gets that far
    for value in ("\u30fb" * (MAX_PART_INPUT_BYTES // 3 + 1), "a" * (MAX_PART_INPUT_BYTES + 1),
                  "\u30fb" * 22000 + "\u4e00"):
        with pytest.raises(InvalidJID, match="too long"):
            prep(value)


def test_a_part_at_the_input_bound_is_still_prepared():
    value = "A" * MAX_PART_INPUT_BYTES
    with pytest.raises(InvalidJID, match="bad localpart"):  # prepared, then too long
        prep_localpart(value)
    # Shrinks to 1023 octets: valid although its input is at the bound.
    assert prep_resource("\u3000" * (MAX_PART_BYTES - 1) + "x") == " " * (MAX_PART_BYTES - 1) + "x"
    assert prep_domain("a" * MAX_PART_BYTES) == "a" * MAX_PART_BYTES


def test_a_long_internationalised_label_is_refused_before_idna(monkeypatch):
    label = "".join(chr(0x4E00 + i) for i in range(MAX_LABEL_INPUT_CHARS + 1))
    with pytest.raises(InvalidJID, match="label too long"):
        prep_domain(f"{label}.example")
    # At the bound it goes through the codec, which refuses it as too long.
    with pytest.raises(InvalidJID, match="bad domainpart"):
        prep_domain(f"{label[:-1]}.example")
    assert prep_domain("b\u00fccher.example") == "xn--bcher-kva.example"


# -- the cache is bounded -------------------------------------------------------------


def test_cache_is_bounded_and_skips_long_texts():
    info = jid._parse_cached.cache_info()
    assert info.maxsize == JID_CACHE_ENTRIES
    long_text = "a@example.com/" + "r" * JID_CACHE_MAX_CHARS
    assert parse_jid(long_text).resource == "r" * JID_CACHE_MAX_CHARS
    assert jid._parse_cached.cache_info().currsize == info.currsize
    parse_jid("cached-once@example.com")
    parse_jid("cached-once@example.com")
    assert jid._parse_cached.cache_info().hits > info.hits
