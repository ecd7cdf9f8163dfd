"""The directory port: the few LDAP operations everything else is built on.

Accounts, groups, profile attributes and static rosters
(`mlink.directory.core`) are written once, against this interface; a
backend only has to speak it. Two do: `mlink.directory.ldap.LDAPPort`
(bonsai, a pool of connections to slapd or any LDAP server) and
`mlink.directory.embedded.EmbeddedPort` (an LDIF file read and written in
process, behaving like slapd where mlink can tell). Rooms or server
configuration held in the directory are then a schema and a mapping on the
same port, not a third pair of implementations.

Entries travel as `mlink.directory.ldif.Entry` (a DN and attributes whose
names compare without case; values `str` when UTF-8, else `bytes`), the same
type the LDIF file is made of, so both backends hand out the same thing.

Errors: `NoSuchEntry` (noSuchObject), `EntryExists` (entryAlreadyExists),
`SizeLimitExceeded`, `DirectoryRefused` (the server answered no: schema,
constraint, access), `DirectoryUnavailable` (it could not be reached or
timed out, which authentication reports as a temporary failure).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mlink.directory.base import DirectoryError
from mlink.directory.ldif import Entry, Value
from mlink.directory.names import normalize_dn
from mlink.directory.policy import Verdict

__all__ = [
    "Add",
    "Change",
    "ChangeKind",
    "Delete",
    "DirectoryPort",
    "EntryExists",
    "Entry",
    "Modification",
    "Modify",
    "NoSuchEntry",
    "Operation",
    "PasswordModify",
    "Scope",
    "SizeLimitExceeded",
]

# How often the change feed looks for changes unless told otherwise: a few
# seconds, so a group membership or a static roster edited with
# `ldapmodify` reaches online users about as fast as a person notices,
# while a poll is one indexed search (see LDAPPort.changes).
DEFAULT_CHANGES_SECONDS = 3.0
# The feed never polls faster than this, whatever the configuration says.
MIN_CHANGES_SECONDS = 0.2


class NoSuchEntry(DirectoryError):
    """The DN (or a search base) does not exist."""


class EntryExists(DirectoryError):
    """An add found an entry with that DN already there."""


class SizeLimitExceeded(DirectoryError):
    """More entries matched than the search's size limit allows."""


class Scope(enum.Enum):
    BASE = "base"
    ONELEVEL = "one"
    SUBTREE = "sub"


@dataclass(frozen=True, slots=True)
class Modification:
    """One change of an attribute (RFC 4511 §4.6). `replace` with no
    values deletes the attribute (no error when absent); `delete` with no
    values deletes it too (an error when absent); `add` adds values (an
    error when one is already there)."""

    op: Literal["add", "delete", "replace"]
    attribute: str
    values: tuple[Value, ...] = ()


@dataclass(frozen=True, slots=True)
class Add:
    entry: Entry


@dataclass(frozen=True, slots=True)
class Modify:
    """Applied atomically: every modification of the entry, or none."""

    dn: str
    changes: tuple[Modification, ...]


@dataclass(frozen=True, slots=True)
class Delete:
    dn: str


@dataclass(frozen=True, slots=True)
class PasswordModify:
    """RFC 3062: the server sets `userPassword`, hashed by its own policy,
    so mlink never writes a clear or mlink-chosen hash into slapd."""

    dn: str
    password: str


Operation = Add | Modify | Delete | PasswordModify

ChangeKind = Literal["add", "modify", "delete"]


@dataclass(frozen=True, slots=True)
class Change:
    """One entry that changed, as the feed saw it.

    `entry` is the entry after the change (user attributes), None for a
    delete. `user` is the bare JID when the entry is a user mlink knows
    (filled in by `mlink.directory.core`, which knows the user layout); a
    disabled account shows as a `modify` of its entry, a removed one as a
    `delete` where the backend can see deletions."""

    kind: ChangeKind
    dn: str
    entry: Entry | None = None
    user: str | None = None
    key: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", normalize_dn(self.dn))


class DirectoryPort(abc.ABC):
    """LDAP operations, on whatever holds the entries.

    Every method may raise DirectoryUnavailable; none blocks the Trio loop
    for longer than the backend's timeout (a dead or black-holed server
    included)."""

    base_dn: str

    @abc.abstractmethod
    async def bind(self, dn: str, password: str) -> bool:
        """Simple bind as `dn`: True when the server accepts the password,
        False for a wrong one, an unknown DN or a policy refusal (locked,
        expired). An empty password is False without asking (RFC 4513
        §5.1.2: an unauthenticated bind would "succeed")."""

    async def bind_outcome(self, dn: str, password: str) -> tuple[bool, Verdict]:
        """`bind`, with the directory's reason or warning where it has a
        password policy to give one (LDAP's ppolicy control)."""
        return await self.bind(dn, password), Verdict()

    @abc.abstractmethod
    async def search(
        self,
        base: str,
        scope: Scope,
        filter: str,
        attributes: Sequence[str] = (),
        *,
        size_limit: int = 0,
        paged: bool = False,
        timeout_factor: float = 1.0,
    ) -> list[Entry]:
        """Entries under `base` matching `filter`, with `attributes` (none
        asked: all user attributes; `["1.1"]`: none). `paged` reads every
        page (RFC 2696) so a server size limit does not cut a bulk read
        short; `size_limit` (0: none) raises SizeLimitExceeded when more
        match. `timeout_factor` stretches the timeout for bulk reads.
        NoSuchEntry when `base` does not exist."""

    @abc.abstractmethod
    async def compare(self, dn: str, attribute: str, value: Value) -> bool:
        """Whether `dn` holds `value` in `attribute` (its equality rule)."""

    @abc.abstractmethod
    async def write(self, operations: Sequence[Operation]) -> None:
        """Apply `operations`: those on one DN in order; those on different
        DNs perhaps concurrently (LDAP) or in one atomic file write
        (embedded). Used for bulk imports; single changes use the methods
        below."""

    async def add(self, entry: Entry) -> None:
        """EntryExists when the DN is taken."""
        await self.write([Add(entry)])

    async def modify(self, dn: str, changes: Sequence[Modification]) -> None:
        """All of `changes` or none; NoSuchEntry, DirectoryRefused."""
        await self.write([Modify(dn, tuple(changes))])

    async def delete(self, dn: str) -> None:
        """NoSuchEntry when absent."""
        await self.write([Delete(dn)])

    async def password_modify(self, dn: str, password: str) -> None:
        """Set `userPassword` through the server (RFC 3062)."""
        await self.write([PasswordModify(dn, password)])

    async def upgrade_password_hash(self, dn: str, password: str) -> bool:
        """Where the port hashes passwords itself: replace an outdated
        `userPassword` hash of `dn` by a fresh one of `password` (which has
        just logged in), changing nothing else. True if replaced. An LDAP
        server keeps the hashes its own policy wrote: rewriting one there
        would restart the password's age (ppolicy pwdChangedTime)."""
        return False

    @abc.abstractmethod
    def changes(self, base: str, interval: float = DEFAULT_CHANGES_SECONDS
                ) -> AsyncIterator[list[Change]]:
        """Batches of entries changed under `base`, each change once. The
        first batch is empty: it comes once the feed has taken its baseline,
        and every change after that moment is reported. Survives the server
        going away and coming back: the outage is logged and the changes
        made meanwhile arrive when it answers again.
        Runs until the consumer stops iterating (or is cancelled)."""

    async def ping(self) -> None:
        """DirectoryUnavailable unless the directory answers."""
        return None

    async def aclose(self) -> None:
        """Release connections and files."""
        return None
