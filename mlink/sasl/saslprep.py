"""SASLprep (RFC 4013), the stringprep (RFC 3454) profile for user names and passwords.

Why it exists: the same password typed on two keyboards can reach us as two
different code point sequences (a no-break space, a compatibility ligature, a
soft hyphen). SASLprep folds those into one canonical form before the string
is hashed or compared, and rejects strings that could be spoofed or are
unprintable. Python's `stringprep` module supplies the RFC 3454 tables, all
pinned to Unicode 3.2, so normalisation here uses `unicodedata.ucd_3_2_0` too:
a newer Unicode would change the result for some strings and lock users out.

Sans-IO and dependency free: this module is imported by `mlink.sasl`, which
must never import trio.
"""

from __future__ import annotations

import stringprep
import unicodedata
from collections.abc import Callable

__all__ = ["SASLprepError", "saslprep"]

# RFC 4013 §2.1: non-ASCII space characters (table C.1.2) map to U+0020.
_SPACE = " "

# RFC 4013 §2.3: every table whose characters may not appear in the output.
# C.1.1 (ASCII space) is deliberately absent: passwords may contain spaces.
_PROHIBITED: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("non-ASCII space (C.1.2)", stringprep.in_table_c12),
    ("ASCII control character (C.2.1)", stringprep.in_table_c21),
    ("non-ASCII control character (C.2.2)", stringprep.in_table_c22),
    ("private use character (C.3)", stringprep.in_table_c3),
    ("non-character code point (C.4)", stringprep.in_table_c4),
    ("surrogate code point (C.5)", stringprep.in_table_c5),
    ("character inappropriate for plain text (C.6)", stringprep.in_table_c6),
    ("character inappropriate for canonical representation (C.7)", stringprep.in_table_c7),
    ("change display property or deprecated character (C.8)", stringprep.in_table_c8),
    ("tagging character (C.9)", stringprep.in_table_c9),
)


class SASLprepError(ValueError):
    """The string cannot be prepared: it holds a prohibited or unassigned
    character, or breaks the bidirectional rules. Callers turn this into a
    SASL failure; the message says which rule failed, for the server log."""


def saslprep(value: str, *, allow_unassigned: bool = False) -> str:
    """Prepare `value` per RFC 4013 and return the canonical string.

    `allow_unassigned` selects the RFC 3454 §7 mode: False for "stored
    strings" (anything we are about to persist, e.g. a new password), True for
    "queries" (strings a client sends to be compared against stored data,
    as RFC 5802 and RFC 4616 ask for user names and passwords at login).
    Raises SASLprepError when the string is not acceptable.
    """
    # Step 1, mapping (RFC 4013 §2.1): B.1 "commonly mapped to nothing" is
    # dropped, C.1.2 non-ASCII spaces become a plain space.
    mapped = "".join(
        _SPACE if stringprep.in_table_c12(ch) else ch
        for ch in value
        if not stringprep.in_table_b1(ch)
    )
    # Step 2, normalisation (RFC 4013 §2.2): Unicode 3.2 NFKC, see module doc.
    normalized = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    if not normalized:
        return normalized

    for ch in normalized:
        # Step 3, prohibited output (RFC 4013 §2.3).
        for description, in_table in _PROHIBITED:
            if in_table(ch):
                raise SASLprepError(f"prohibited {description}: U+{ord(ch):04X}")
        # Unassigned code points (RFC 4013 §2.5, RFC 3454 §7): a later Unicode
        # version could assign and normalise them differently, so a stored
        # string must not contain them.
        if not allow_unassigned and stringprep.in_table_a1(ch):
            raise SASLprepError(f"unassigned code point: U+{ord(ch):04X}")

    # Step 4, bidirectional characters (RFC 4013 §2.4, RFC 3454 §6).
    _check_bidi(normalized)
    return normalized


def _check_bidi(value: str) -> None:
    """RFC 3454 §6: a string with right-to-left characters must be wholly
    right-to-left at both ends and contain no left-to-right characters, so
    that it displays the same way everywhere (no visual spoofing)."""
    has_randal = any(stringprep.in_table_d1(ch) for ch in value)
    if not has_randal:
        return
    if any(stringprep.in_table_d2(ch) for ch in value):
        raise SASLprepError("mixes right-to-left and left-to-right characters")
    if not (stringprep.in_table_d1(value[0]) and stringprep.in_table_d1(value[-1])):
        raise SASLprepError("right-to-left string must start and end with a RandALCat character")
