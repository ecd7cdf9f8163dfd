"""The persistent key behind SCRAM's believable salts for unknown users.

An unknown user must look like a real one: the same salt on every attempt
(`mlink.sasl.scram`). With several shard processes, or across a restart, a
per-process key would show two different salts for one missing name while a
real account's salt never changes — a way to probe for accounts. So the key
lives in the data directory, created once, readable only by the server.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

MOCK_SALT_KEY_FILE = "scram-mock-salt.key"
# 256 bits: an HMAC-SHA-256 key of the hash's own size.
MOCK_SALT_KEY_BYTES = 32


def load_mock_salt_key(data_dir: Path) -> bytes:
    """The key in `data_dir`, created on first use. Several shards starting
    at once agree: each writes a private temporary file and links it into
    place; the first link wins, and the others read the winner's key."""
    path = data_dir / MOCK_SALT_KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        return _read(path)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / f".{MOCK_SALT_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(MOCK_SALT_KEY_BYTES))
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return _read(path)


def _read(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) != MOCK_SALT_KEY_BYTES:
        raise ValueError(f"{path}: expected {MOCK_SALT_KEY_BYTES} bytes, found {len(key)}")
    return key
