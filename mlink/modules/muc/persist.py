"""Persistent rooms as directory entries (conf/mlink-schema.ldif,
`mlinkRoom`), on either backend through the directory's entry operations.

One entry per room, `mlinkRoomJID=<room JID>,<rooms DN>`: the configuration
in single-valued attributes, the affiliations as one multi-valued
attribute per kind (bare JIDs). The mapping both ways is here, shared by
the running service and `mlink room`; a value the mapping cannot take
(edited by hand) is a `RoomEntryError` naming the entry's DN and the
attribute, and the service then keeps the room's previous configuration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlink.directory.ldif import Entry, Value
from mlink.directory.names import escape_dn_value, escape_filter_value, normalize_dn
from mlink.jid import JID, InvalidJID, parse_jid
from mlink.modules.muc.config import ConfigError, RoomConfig
from mlink.modules.muc.roles import Affiliation

if TYPE_CHECKING:
    from mlink.directory.base import Directory
    from mlink.modules.muc.room import Room

ROOM_CLASS = "mlinkRoom"
JID_ATTRIBUTE = "mlinkRoomJID"
ROOMS_RDN = "ou=Rooms"
# RoomConfig field -> attribute. `persistent` is the entry's existence and
# `password_protected` the presence of a password.
CONFIG_ATTRIBUTES: dict[str, str] = {
    "name": "mlinkRoomName",
    "description": "description",
    "public": "mlinkRoomPublic",
    "members_only": "mlinkRoomMembersOnly",
    "moderated": "mlinkRoomModerated",
    "password": "mlinkRoomPassword",
    "whois": "mlinkRoomWhois",
    "max_users": "mlinkRoomMaxUsers",
    "change_subject": "mlinkRoomChangeSubject",
    "allow_invites": "mlinkRoomAllowInvites",
    "allow_pm": "mlinkRoomAllowPM",
    "history_length": "mlinkRoomHistoryLength",
    "logging": "mlinkRoomLogging",
    "member_group": "mlinkRoomMemberGroup",
    "archive": "mlinkRoomArchive",
}
AFFILIATION_ATTRIBUTES: dict[Affiliation, str] = {
    Affiliation.OWNER: "mlinkRoomOwner",
    Affiliation.ADMIN: "mlinkRoomAdmin",
    Affiliation.MEMBER: "mlinkRoomMember",
    Affiliation.OUTCAST: "mlinkRoomOutcast",
}
SUBJECT_ATTRIBUTE = "mlinkRoomSubject"
# Every attribute mlink writes: a save replaces exactly these.
MANAGED = (*CONFIG_ATTRIBUTES.values(), *AFFILIATION_ATTRIBUTES.values(), SUBJECT_ATTRIBUTE)
_DEFAULTS = RoomConfig()


class RoomEntryError(ValueError):
    """A room entry holds a value mlink cannot take; says which."""


@dataclass(frozen=True, slots=True)
class RoomRecord:
    """A persistent room as its entry describes it."""

    dn: str
    jid: JID
    config: RoomConfig
    affiliations: dict[str, Affiliation]
    subject: str = ""

    def same_as(self, other: RoomRecord) -> bool:
        return (self.config == other.config and self.affiliations == other.affiliations
                and self.subject == other.subject)


def rooms_dn(directory: Directory, configured: str) -> str:
    return configured or f"{ROOMS_RDN},{directory.base_dn}"


def room_dn(base: str, jid: JID) -> str:
    return f"{JID_ATTRIBUTE}={escape_dn_value(str(jid))},{base}"


def _text(value: Value | bool | int) -> str:
    """A value as LDAP text: bonsai hands BOOLEAN and INTEGER values over as
    Python bool and int, the embedded directory as text."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _bool(text: str, attribute: str, dn: str) -> bool:
    word = text.strip().upper()
    if word in ("TRUE", "1"):
        return True
    if word in ("FALSE", "0"):
        return False
    raise RoomEntryError(f"{dn}: {attribute} must be TRUE or FALSE, not {text!r}")


def to_entry(base: str, room_jid: JID, config: RoomConfig,
             affiliations: dict[str, Affiliation], subject: str = "") -> Entry:
    """The entry that describes a room."""
    entry = Entry(room_dn(base, room_jid))
    entry.set("objectClass", ["top", ROOM_CLASS])
    entry.set(JID_ATTRIBUTE, [str(room_jid)])
    for name, attribute in CONFIG_ATTRIBUTES.items():
        value = getattr(config, name)
        if isinstance(value, bool):
            entry.set(attribute, ["TRUE" if value else "FALSE"])
        elif isinstance(value, int):
            entry.set(attribute, [str(value)])
        elif value:
            entry.set(attribute, [value])
    for aff, attribute in AFFILIATION_ATTRIBUTES.items():
        jids = sorted(j for j, a in affiliations.items() if a == aff)
        if jids:
            entry.set(attribute, list(jids))
    if subject:
        entry.set(SUBJECT_ATTRIBUTE, [subject])
    return entry


def from_entry(entry: Entry) -> RoomRecord:
    """The room an entry describes; RoomEntryError for a value mlink
    cannot take (the message names the DN and the attribute)."""
    dn = entry.dn
    jids = entry.get(JID_ATTRIBUTE)
    if len(jids) != 1:
        raise RoomEntryError(f"{dn}: needs exactly one {JID_ATTRIBUTE}")
    try:
        jid = parse_jid(_text(jids[0]))
    except InvalidJID:
        raise RoomEntryError(f"{dn}: {JID_ATTRIBUTE} is not a JID") from None
    if not jid.local or jid.resource:
        raise RoomEntryError(f"{dn}: {JID_ATTRIBUTE} must be a bare room JID")
    changes: dict[str, object] = {"persistent": True}
    for name, attribute in CONFIG_ATTRIBUTES.items():
        values = entry.get(attribute)
        if not values:
            continue
        if len(values) > 1:
            raise RoomEntryError(f"{dn}: {attribute} takes one value")
        text = _text(values[0])
        default = getattr(_DEFAULTS, name)
        if isinstance(default, bool):
            changes[name] = _bool(text, attribute, dn)
        elif isinstance(default, int):
            if not text.strip().isdigit():
                raise RoomEntryError(f"{dn}: {attribute} must be a whole number, not {text!r}")
            changes[name] = int(text)
        else:
            changes[name] = text
    changes["password_protected"] = bool(changes.get("password"))
    try:
        config = dataclasses.replace(_DEFAULTS, **changes)  # type: ignore[arg-type]
        config.check()
    except ConfigError as exc:
        raise RoomEntryError(f"{dn}: {exc}") from None
    affiliations: dict[str, Affiliation] = {}
    for aff, attribute in AFFILIATION_ATTRIBUTES.items():
        for value in entry.get(attribute):
            try:
                member = parse_jid(_text(value))
            except InvalidJID:
                raise RoomEntryError(f"{dn}: {attribute} value {value!r} is not a JID") from None
            affiliations[str(member.bare)] = aff
    subject = _text(entry.get(SUBJECT_ATTRIBUTE)[0]) if entry.get(SUBJECT_ATTRIBUTE) else ""
    return RoomRecord(dn, jid, config, affiliations, subject)


class RoomDirectory:
    """Persistent rooms in the directory under `base` (see the module docstring)."""

    def __init__(self, directory: Directory, base: str) -> None:
        self.directory = directory
        self.base = base
        self.base_key = normalize_dn(base)

    async def load(self) -> tuple[dict[JID, RoomRecord], list[str]]:
        """Every room entry: (rooms by JID, problems of the entries that
        could not be read, each naming its DN)."""
        found: dict[JID, RoomRecord] = {}
        problems: list[str] = []
        for entry in await self.directory.entries(self.base, f"(objectClass={ROOM_CLASS})"):
            try:
                record = from_entry(entry)
            except RoomEntryError as exc:
                problems.append(str(exc))
                continue
            found[record.jid] = record
        return found, problems

    async def get(self, jid: JID) -> RoomRecord | None:
        entries = await self.directory.entries(
            self.base, f"(&(objectClass={ROOM_CLASS})"
                       f"({JID_ATTRIBUTE}={escape_filter_value(str(jid))}))")
        return from_entry(entries[0]) if entries else None

    async def save(self, room: Room) -> None:
        await self.put(room.jid, room.config, room.affiliations, room.subject)

    async def put(self, jid: JID, config: RoomConfig, affiliations: dict[str, Affiliation],
                  subject: str = "") -> None:
        entry = to_entry(self.base, jid, config, affiliations, subject)
        await self.directory.put_entry(entry, MANAGED)

    async def delete(self, jid: JID) -> bool:
        return await self.directory.delete_entry(room_dn(self.base, jid))

    async def group_members(self, dn: str) -> frozenset[str] | None:
        return await self.directory.group_members(dn)

    def touches(self, keys: Sequence[str]) -> bool:
        """Whether changed entries (normalised DNs) may concern rooms."""
        return any(key.endswith("," + self.base_key) or key == self.base_key for key in keys)
