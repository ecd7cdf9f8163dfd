"""SASLprep (RFC 4013): the RFC's own examples plus the rules they do not cover.

Why: a SASLprep bug silently locks users out (their stored keys were derived
from a differently prepared password) or lets spoofable names in.
"""

from __future__ import annotations

import pytest

from mlink.sasl.saslprep import SASLprepError, saslprep


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("I\u00adX", "IX"),  # 1: SOFT HYPHEN mapped to nothing
        ("user", "user"),  # 2: no transformation
        ("USER", "USER"),  # 3: case preserved
        ("\u00aa", "a"),  # 4: output is NFKC
        ("\u2168", "IX"),  # 5: ROMAN NUMERAL NINE, NFKC
    ],
)
def test_rfc4013_section3_examples(given: str, expected: str) -> None:
    assert saslprep(given) == expected


@pytest.mark.parametrize(
    "given",
    [
        "\u0007",  # 6: prohibited control character
        "\u0627\u0031",  # 7: bidi check: RandALCat not at the end
    ],
)
def test_rfc4013_section3_errors(given: str) -> None:
    with pytest.raises(SASLprepError):
        saslprep(given)


def test_error_is_a_value_error() -> None:
    assert issubclass(SASLprepError, ValueError)


def test_non_ascii_space_maps_to_space() -> None:
    assert saslprep("a\u00a0b\u3000c") == "a b c"


def test_ascii_space_is_kept() -> None:
    assert saslprep("correct horse") == "correct horse"


def test_zero_width_mapped_to_nothing() -> None:
    assert saslprep("pa\u200bss\ufeffword") == "password"


@pytest.mark.parametrize(
    "given",
    [
        "a\x00b",  # C.2.1 NUL
        "a\x7fb",  # C.2.1 DEL
        "a\u0085b",  # C.2.2
        "a\ue000b",  # C.3 private use
        "a\ufffeb",  # C.4 non-character
        "a\ufff9b",  # C.6
        "a\u2ff0b",  # C.7
        "a\u200eb",  # C.8 LRM
        "a\U000e0001b",  # C.9 language tag
    ],
)
def test_prohibited_characters(given: str) -> None:
    with pytest.raises(SASLprepError):
        saslprep(given)


def test_unassigned_rejected_for_stored_strings_allowed_for_queries() -> None:
    unassigned = "a\u0221b"  # unassigned in Unicode 3.2 (table A.1)
    with pytest.raises(SASLprepError, match="unassigned"):
        saslprep(unassigned)
    assert saslprep(unassigned, allow_unassigned=True) == unassigned


def test_bidi_rules() -> None:
    assert saslprep("\u0627\u0628") == "\u0627\u0628"  # all RandALCat
    assert saslprep("\u0627\u0031\u0628") == "\u0627\u0031\u0628"  # neutral inside
    with pytest.raises(SASLprepError, match="mixes"):
        saslprep("\u0627a\u0628")  # LCat with RandALCat


def test_empty_string() -> None:
    assert saslprep("") == ""
    assert saslprep("\u00ad") == ""
