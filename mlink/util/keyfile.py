"""A random secret key kept in a file of its own, created on first use.

Several shards start at once and must agree on the key: each writes its
own candidate to a private temporary file (mode 0600 from the start, never
readable by others even for a moment), fsyncs it and links it into place;
the first link wins and everyone reads the winner's key.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def load_or_create_key(path: Path, size: int) -> bytes:
    """The `size`-byte key in `path`, created if missing. ValueError when
    the file holds something else (a truncated or foreign file must not be
    used as a key, nor silently replaced)."""
    with contextlib.suppress(FileNotFoundError):
        return _read(path, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(size))
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return _read(path, size)


def _read(path: Path, size: int) -> bytes:
    key = path.read_bytes()
    if len(key) != size:
        raise ValueError(f"{path}: expected {size} bytes, found {len(key)}")
    return key
