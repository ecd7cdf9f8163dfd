"""The one door to user data: an async interface with two backends.

Modules and the stream layer never talk LDAP or read files themselves; they
ask a `Directory`. Every method takes bare JIDs already normalised by the
caller (`mlink.jid`), so backends only map them to entries.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable

from mlink.sasl.secrets import ScramSecret

# PBKDF2 in hashlib releases the GIL, so a few threads derive secrets in
# parallel; more than the cores buys nothing.
DERIVE_THREADS = max(1, min(8, os.cpu_count() or 1))


class DirectoryError(Exception):
    """A request the directory refused (bad JID, existing user, ...)."""


class DirectoryUnavailable(DirectoryError):
    """The directory could not be reached or timed out.

    Authentication maps this to SASL `temporary-auth-failure`: the user's
    credentials may be fine, we just cannot tell now.
    """


class UserExists(DirectoryError):
    pass


class NoSuchUser(DirectoryError):
    pass


class Directory(abc.ABC):
    """Users and their credentials, wherever they live."""

    @abc.abstractmethod
    async def check_password(self, jid: str, password: str) -> bool:
        """True when `password` is right for `jid`; False for a wrong
        password or an unknown user (the caller must not tell them apart).
        Raises DirectoryUnavailable when it cannot decide."""

    @abc.abstractmethod
    async def scram_secret(self, jid: str, mechanism: str) -> ScramSecret | None:
        """The stored secret for `mechanism` ("SCRAM-SHA-1"/"SCRAM-SHA-256"),
        or None when the user is unknown or has no such secret."""

    @abc.abstractmethod
    async def user_exists(self, jid: str) -> bool: ...

    @abc.abstractmethod
    async def add_user(self, jid: str, password: str) -> None:
        """Create the user; UserExists if present."""

    @abc.abstractmethod
    async def set_password(self, jid: str, password: str) -> None:
        """Replace the password and every SCRAM secret; NoSuchUser if absent."""

    @abc.abstractmethod
    async def delete_user(self, jid: str) -> None:
        """NoSuchUser if absent."""

    @abc.abstractmethod
    async def list_users(self) -> list[str]:
        """Bare JIDs of every user, sorted."""

    @abc.abstractmethod
    async def import_users(self, pairs: Iterable[tuple[str, str]]) -> int:
        """Add or update many (jid, password) pairs in one pass; returns the
        count. Must scale to thousands of users in seconds."""

    async def ping(self) -> None:
        """Raise DirectoryUnavailable unless the directory answers."""
        return None

    async def aclose(self) -> None:
        """Release connections and files."""
        return None
