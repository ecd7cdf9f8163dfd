"""SCRAM secrets (RFC 5802) and their stored form (RFC 5803).

The directory keeps only these derived keys, never a clear password: a SCRAM
exchange needs StoredKey and ServerKey, and PLAIN can be checked against them
too, by deriving StoredKey from the offered password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

# RFC 7677 asks for at least 4096 iterations; OWASP (2023) asks far more for
# PBKDF2 at rest. 4096 keeps a SCRAM login cheap enough for thousands of
# logins per second per core while matching what Prosody and ejabberd store.
DEFAULT_ITERATIONS = 4096
# RFC 5802 leaves the salt length free; 16 bytes matches common servers.
SALT_BYTES = 16

HASHES: dict[str, str] = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}


@dataclass(frozen=True, slots=True)
class ScramSecret:
    """What a server must hold to run one SCRAM mechanism for one user."""

    mechanism: str  # "SCRAM-SHA-1" or "SCRAM-SHA-256" (never a -PLUS name)
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @property
    def hash_name(self) -> str:
        return HASHES[self.mechanism]

    def to_auth_password(self) -> str:
        """The RFC 5803 `authPassword` value: scheme$iter:salt$stored:server."""
        b64 = base64.b64encode
        return (
            f"{self.mechanism}${self.iterations}:{b64(self.salt).decode()}"
            f"${b64(self.stored_key).decode()}:{b64(self.server_key).decode()}"
        )

    @classmethod
    def from_auth_password(cls, value: str) -> ScramSecret | None:
        """Parse an RFC 5803 value; None for another scheme or a damaged value."""
        try:
            scheme, info, keys = value.strip().split("$")
            if scheme not in HASHES:
                return None
            iterations, salt = info.split(":")
            stored, server = keys.split(":")
            return cls(
                scheme,
                int(iterations),
                base64.b64decode(salt, validate=True),
                base64.b64decode(stored, validate=True),
                base64.b64decode(server, validate=True),
            )
        except ValueError:
            return None

    def matches_password(self, password: str) -> bool:
        """True when `password` derives this secret's StoredKey (for PLAIN)."""
        other = derive_secret(self.mechanism, password, self.salt, self.iterations)
        return hmac.compare_digest(other.stored_key, self.stored_key)


def derive_secret(
    mechanism: str,
    password: str,
    salt: bytes | None = None,
    iterations: int = DEFAULT_ITERATIONS,
) -> ScramSecret:
    """Derive the stored SCRAM keys of a password (RFC 5802 §3).

    The password should already be SASLprep-ed by the caller where that
    matters; mlink applies `saslprep` from `mlink.sasl.saslprep` first.
    """
    hash_name = HASHES[mechanism]
    if salt is None:
        salt = os.urandom(SALT_BYTES)
    salted = hashlib.pbkdf2_hmac(hash_name, password.encode("utf-8"), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    stored_key = hashlib.new(hash_name, client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", hash_name)
    return ScramSecret(mechanism, iterations, salt, stored_key, server_key)


def derive_all(password: str, iterations: int = DEFAULT_ITERATIONS) -> list[ScramSecret]:
    """One secret per supported SCRAM hash, each with its own salt."""
    return [derive_secret(m, password, None, iterations) for m in HASHES]
