"""The `userPassword` hashes mlink writes and checks itself.

Only the embedded directory hashes passwords in mlink: an LDAP server hashes
what it is given through RFC 3062 with its own scheme (see docs/ldap.md for
slapd's `{ARGON2}`). The embedded LDIF file is a file: copied with a backup,
left readable, it must not give the passwords up to a fast offline guess.
`{SSHA}` (one salted SHA-1) falls to billions of guesses per second on a
GPU; Argon2id makes every guess cost memory and time. The encoded form is
the one slapd's argon2 module verifies, so an embedded directory's users
keep their passwords when the LDIF is loaded into slapd.

Hashes written before (`{SSHA}` and friends) still verify, and are
replaced at the user's next successful password login (`is_outdated`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argon2

# OWASP's minimum for Argon2id (19 MiB, 2 passes, 1 lane): ~45 ms on one
# core here. More memory would make each guess dearer, but every new
# password and every import pays it too, and a login storm of users with no
# SCRAM secret verifies in worker threads at this cost each.
ARGON2_MEMORY_KIB = 19456
ARGON2_PASSES = 2
ARGON2_LANES = 1
ARGON2_PREFIX = "{ARGON2}"

_HASHER: argon2.PasswordHasher | None = None


def _hasher() -> argon2.PasswordHasher:
    """The Argon2id hasher, made (and argon2-cffi imported) on first use:
    a shard that never checks a password against a hash would otherwise
    carry the library and its C bindings from its start (issue 14)."""
    global _HASHER
    if _HASHER is None:
        import argon2

        _HASHER = argon2.PasswordHasher(
            time_cost=ARGON2_PASSES, memory_cost=ARGON2_MEMORY_KIB,
            parallelism=ARGON2_LANES, type=argon2.Type.ID,
        )
    return _HASHER

# The salted SHA family slapd writes by default (and mlink wrote before):
# accepted, never written.
LEGACY_SCHEMES = {"{SSHA}": "sha1", "{SHA}": "sha1", "{SSHA256}": "sha256",
                  "{SSHA512}": "sha512"}


def hash_password(password: str) -> str:
    """A new `{ARGON2}` userPassword value (slow: call it in a worker thread)."""
    return ARGON2_PREFIX + _hasher().hash(password)


def verify_password(stored: str, password: str) -> bool:
    """Whether `password` matches the `userPassword` value `stored`:
    `{ARGON2}` (any Argon2 variant) or the legacy salted SHA family. Clear
    text and unknown schemes are refused. Slow for Argon2: worker thread."""
    if stored[: len(ARGON2_PREFIX)].upper() == ARGON2_PREFIX:
        hasher = _hasher()
        import argon2

        try:
            return hasher.verify(stored[len(ARGON2_PREFIX):], password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
    for prefix, hash_name in LEGACY_SCHEMES.items():
        if stored[: len(prefix)].upper() == prefix:
            try:
                raw = base64.b64decode(stored[len(prefix):], validate=True)
            except ValueError:
                return False
            size = hashlib.new(hash_name).digest_size
            digest, salt = raw[:size], raw[size:]
            if prefix == "{SHA}" and salt:
                return False
            mine = hashlib.new(hash_name, password.encode("utf-8") + salt).digest()
            return hmac.compare_digest(mine, digest)
    return False


def is_outdated(stored: str) -> bool:
    """Whether `stored` should be replaced by a fresh `hash_password` at
    the next login: any scheme but Argon2id, or Argon2 parameters weaker
    than today's."""
    if stored[: len(ARGON2_PREFIX)].upper() != ARGON2_PREFIX:
        return True
    hasher = _hasher()
    import argon2

    try:
        return hasher.check_needs_rehash(stored[len(ARGON2_PREFIX):])
    except argon2.exceptions.InvalidHashError:
        return True


def scheme_of(stored: str) -> str:
    """The `{SCHEME}` of a userPassword value ('' for clear text), for logs
    and `mlink check`."""
    if stored.startswith("{") and "}" in stored:
        return stored[: stored.index("}") + 1].upper()
    return ""
