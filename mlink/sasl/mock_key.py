"""The persistent key behind SCRAM's believable salts for unknown users.

An unknown user must look like a real one: the same salt on every attempt
(`mlink.sasl.scram`). With several shard processes, or across a restart, a
per-process key would show two different salts for one missing name while a
real account's salt never changes — a way to probe for accounts. So the key
lives in the data directory, created once, readable only by the server.
"""

from __future__ import annotations

from pathlib import Path

from mlink.util.keyfile import load_or_create_key

MOCK_SALT_KEY_FILE = "scram-mock-salt.key"
# 256 bits: an HMAC-SHA-256 key of the hash's own size.
MOCK_SALT_KEY_BYTES = 32


def load_mock_salt_key(data_dir: Path) -> bytes:
    """The key in `data_dir`, created on first use; several shards starting
    at once agree (mlink.util.keyfile)."""
    return load_or_create_key(data_dir / MOCK_SALT_KEY_FILE, MOCK_SALT_KEY_BYTES)
