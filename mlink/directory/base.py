"""The one door to user data: an async interface with two backends.

Modules and the stream layer never talk LDAP or read files themselves; they
ask a `Directory`. Every method takes bare JIDs already normalised by the
caller (`mlink.jid`), so backends only map them to entries.
"""

from __future__ import annotations

import abc
import datetime
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from mlink.config_model import RosterGroupConfig
from mlink.directory.policy import Verdict
from mlink.sasl.secrets import ScramSecret

if TYPE_CHECKING:
    from mlink.directory.ldif import Entry
    from mlink.directory.port import Change

# PBKDF2 in hashlib releases the GIL, so a few threads derive secrets in
# parallel; more than the cores buys nothing.
DERIVE_THREADS = max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True, slots=True)
class ScramLogin:
    """A SCRAM login's secret (None: no such user or no secret) and the
    directory's verdict on the account."""

    secret: ScramSecret | None
    verdict: Verdict = Verdict()


@dataclass(frozen=True, slots=True)
class PasswordStatus:
    """What the directory's password policy says of a user's password, for
    the self-service page: when it expires, grace logins left, whether it
    must be changed, and the rules a new one must meet (None: not known)."""

    expires: datetime.datetime | None = None
    grace_left: int | None = None
    must_change: bool = False
    min_length: int | None = None
    history: int | None = None
    max_age_days: int | None = None


class DirectoryError(Exception):
    """A request the directory refused (bad JID, existing user, ...)."""


class DirectoryUnavailable(DirectoryError):
    """The directory could not be reached or timed out.

    Authentication maps this to SASL `temporary-auth-failure`: the user's
    credentials may be fine, we just cannot tell now.
    """


class DirectoryRefused(DirectoryError):
    """The directory answered and said no: a schema violation (unknown
    attribute, several values for a single-valued one, bad syntax), a
    constraint, insufficient access. `str()` is the directory's own message,
    fit for a stanza error's text. Nothing of the request was applied.

    Kept apart from DirectoryUnavailable because the client must hear
    "your value is wrong" (bad-request/not-acceptable), not "try later".
    """


class UserExists(DirectoryError):
    def __str__(self) -> str:
        return f"{self.args[0]} already exists" if self.args else "the user already exists"


class NoSuchUser(DirectoryError):
    def __str__(self) -> str:
        return f"no such user: {self.args[0]}" if self.args else "no such user"


@dataclass(frozen=True, slots=True)
class DirectoryGroup:
    """One directory group resolved for roster pre-population.

    Frozen and hashable so the roster code can diff two refreshes with set
    operations (a member added or removed, a group renamed or gone).
    """

    key: str  # stable identity: the group's DN, normalised (names.normalize_dn)
    name: str  # roster group name: the name attribute's first value, or the literal name
    members: frozenset[str]  # bare JIDs (prepared, as mlink.jid gives them) of known users


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """A CA entry of the directory: its certificates and CRLs, DER."""

    dn: str
    certificates: tuple[bytes, ...] = ()
    crls: tuple[bytes, ...] = ()


class Directory(abc.ABC):
    """Users and their credentials, wherever they live."""

    # The DN everything mlink keeps lies under ("" for a directory that
    # is not LDAP-shaped, such as a test double).
    base_dn: str = ""

    @abc.abstractmethod
    async def check_password(self, jid: str, password: str) -> bool:
        """True when `password` is right for `jid`; False for a wrong
        password or an unknown user (the caller must not tell them apart).
        Raises DirectoryUnavailable when it cannot decide."""

    def read_at_login(self, attributes: Sequence[str],
                      seen: Callable[[str, dict[str, list[bytes]]], None]) -> None:
        """Ask for `attributes` too in the search a login makes anyway and
        hand what it finds to `seen(jid, values)`: the profile a session
        reads right after (its avatar hash for presence) then costs no
        second search. Backends that do not search ignore it."""
        return None

    async def scram_login(self, jid: str, mechanism: str) -> ScramLogin:
        """The secret for a SCRAM login and the directory's verdict on the
        account (locked, expired, secrets stale: mlink.directory.policy).
        Backends without a policy answer with the secret alone."""
        return ScramLogin(await self.scram_secret(jid, mechanism))

    async def account_verdict(self, jid: str) -> Verdict | None:
        """The directory's verdict on the account (locked, disabled,
        expired); None when there is no such user."""
        return Verdict() if await self.user_exists(jid) else None

    async def password_login(self, jid: str, password: str) -> tuple[bool, Verdict]:
        """A password login (PLAIN): whether the password is right, and the
        directory's reason to refuse (locked, expired) or its warning."""
        return await self.check_password(jid, password), Verdict()

    async def change_own_password(self, jid: str, password: str) -> None:
        """The user changes their own password (in-band, XEP-0077)."""
        await self.set_password(jid, password)

    async def password_status(self, jid: str) -> PasswordStatus | None:
        """The password policy as it applies to `jid` now; None for no such
        user. Backends without a policy know nothing more."""
        return PasswordStatus() if await self.user_exists(jid) else None

    async def record_failure(self, jid: str) -> None:  # noqa: B027 (optional hook)
        """Count a failed non-bind login (a wrong SCRAM proof) where the
        directory counts failures, so its lockout applies to every mechanism."""

    async def refresh_credentials(self, jid: str, password: str) -> bool:
        """After a successful password login, bring what is stored of the
        password up to date: an outdated `userPassword` hash replaced where
        mlink hashes (the embedded directory), then fresh SCRAM secrets if
        the stored ones are missing or stale. True if it wrote anything."""
        return False

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

    @abc.abstractmethod
    async def user_attributes(
        self, jid: str, attributes: Sequence[str]
    ) -> dict[str, list[bytes]] | None:
        """Values of `attributes` of the user's entry, keyed by the names as
        requested (matched without case, as LDAP does); an attribute the
        entry lacks is absent. None when there is no such user.

        Values are bytes because one interface serves text (UTF-8) and
        binary attributes (jpegPhoto) alike; the caller knows which is which.
        """

    @abc.abstractmethod
    async def modify_user(self, jid: str, changes: Mapping[str, Sequence[bytes]]) -> None:
        """Replace each attribute's values; an empty sequence deletes the
        attribute (no error when it is absent). One atomic modify: all of it
        or nothing. Adds the `mlinkUser` class in the same modify when an
        mlink attribute (authPassword, mlinkRosterItem) is set on an entry
        without it. NoSuchUser; DirectoryRefused when the directory refuses
        (schema, access); DirectoryUnavailable when it cannot be reached."""

    @abc.abstractmethod
    async def roster_groups(self, specs: Sequence[RosterGroupConfig]) -> list[DirectoryGroup]:
        """Resolve the configured groups, in configuration order.

        A spec with `dn` reads that one entry; a spec with `filter` finds
        every matching entry under `base` (default `ou=Groups,<base DN>`).
        Members come from `member` and `uniqueMember` (DNs of users) and
        `memberUid` (uids of users); members that are not users mlink knows
        are left out. A group that does not exist (any more) is simply not
        in the result. A group found by two specs is reported once, as the
        first spec found it.
        """

    async def users_with_certificate(self, certificate: bytes) -> list[str]:
        """Bare JIDs of the users whose `userCertificate;binary` holds
        exactly `certificate` (DER), for SASL EXTERNAL's directory mapping.
        This default knows no certificates (test doubles)."""
        return []

    async def certificate_authorities(self, base: str) -> list[CertificateAuthority]:
        """The CA entries under `base` (RFC 4523 `pkiCA` or
        `certificationAuthority`): their `cACertificate;binary` and
        `certificateRevocationList;binary` values, for SASL EXTERNAL's
        trust and revocation checks. This default knows none."""
        return []

    async def changes(self, interval: float | None = None) -> AsyncIterator[list[Change]]:
        """Batches of changed entries (`mlink.directory.port.Change`: kind
        add/modify/delete, DN, the entry after the change, the user's bare
        JID when it is a user), each change once, every
        `interval` seconds at most (default: the configured
        `changes-seconds`). The first batch is empty and marks the moment
        from which every change is reported. Survives the directory going
        away: the changes
        made meanwhile come when it answers again. Iterate it in one task
        for as long as the changes are wanted.

        This default knows of no changes and waits forever, for directories
        (test doubles) that cannot tell."""
        await trio.sleep_forever()
        yield []  # pragma: no cover - unreachable; makes this a generator

    def touches_groups(self, change: Change, specs: Sequence[RosterGroupConfig]) -> bool:
        """Whether `change` may change what `roster_groups(specs)` returns.
        True unless the directory can tell better."""
        return True

    # --- entries of features (rooms), beside the users -------------------------
    # Defaults for directories (test doubles) that hold nothing else.

    async def entries(self, base: str, filter: str = "(objectClass=*)",
                      attributes: Sequence[str] = ()) -> list[Entry]:
        """The entries one level below `base` matching `filter` (every page
        read); none when `base` does not exist."""
        return []

    async def entry(self, dn: str, attributes: Sequence[str] = ()) -> Entry | None:
        """The entry `dn`, or None when there is none."""
        return None

    async def put_entry(self, entry: Entry, managed: Sequence[str]) -> None:
        """Add `entry`, or, when its DN exists, make its `managed` attributes
        what `entry` holds (absent ones removed) in one atomic modify. The
        parent is created as an organizationalUnit when it is missing
        directly under `base_dn`. DirectoryRefused, DirectoryUnavailable."""
        raise DirectoryRefused("this directory keeps no entries besides users")

    async def delete_entry(self, dn: str) -> bool:
        """Remove `dn`; False when it was not there."""
        return False

    async def group_members(self, dn: str) -> frozenset[str] | None:
        """The bare JIDs of the users the group `dn` (groupOfNames and the
        like, as for roster groups) names, or None when it does not exist."""
        return None

    async def ping(self) -> None:
        """Raise DirectoryUnavailable unless the directory answers."""
        return None

    async def aclose(self) -> None:
        """Release connections and files."""
        return None
