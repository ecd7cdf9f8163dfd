"""The directory: users and credentials (see `mlink.directory.base`).

One implementation (`mlink.directory.core.PortDirectory`) on one port of
LDAP operations (`mlink.directory.port`). `open_directory(cfg)` picks the
port named by the configuration: `embedded` (an LDIF file,
`mlink.directory.embedded`) or `ldap` (`mlink.directory.ldap`, which needs
bonsai).
"""

from __future__ import annotations

from mlink.config_model import DirectoryConfig
from mlink.directory.base import (
    Directory,
    DirectoryError,
    DirectoryUnavailable,
    NoSuchUser,
    UserExists,
)

__all__ = [
    "Directory",
    "DirectoryError",
    "DirectoryUnavailable",
    "NoSuchUser",
    "UserExists",
    "open_directory",
]


def open_directory(cfg: DirectoryConfig) -> Directory:
    """A `Directory` for `cfg.backend`; DirectoryError for an unknown one.

    Nothing is connected or read here: the first request does that, so this
    is safe to call before `trio.run`.
    """
    backend = cfg.backend.lower()
    if backend == "embedded":
        from mlink.directory.embedded import EmbeddedDirectory

        return EmbeddedDirectory(cfg.embedded, cfg.changes_seconds)
    if backend == "ldap":
        from mlink.directory.ldap import LDAPDirectory

        return LDAPDirectory(cfg.ldap, cfg.changes_seconds)
    raise DirectoryError(f"unknown directory backend {cfg.backend!r} (embedded or ldap)")
