"""The multi-user chat service's options (`<module name="muc">` children)."""

from __future__ import annotations

from dataclasses import dataclass

from mlink.config_schema import Bool, Choice, Int, Kind, ParseEnv, option

# Who may create rooms: anybody who can reach the service, users of the
# server's own domains, or members of a directory group.
CREATORS = ("anyone", "local", "group")


class DomainList(Kind):
    """Service domains, separated by spaces (each `<label>.<local domain>`)."""

    doc = "domains"

    def parse(self, raw: str, env: ParseEnv) -> tuple[str, ...]:
        return tuple(raw.lower().split())


class Text(Kind):
    """Text as written (may be empty)."""

    def parse(self, raw: str, env: ParseEnv) -> str:
        return raw.strip()


@dataclass(frozen=True, slots=True)
class Options:
    prefix: str = option(
        "conference", kind=Text(),
        doc="The service runs on `<prefix>.<domain>` for every local domain, unless "
            "`<hosts>` names the service domains. Empty: no service unless `<hosts>` "
            "gives one. Applies at restart.")
    hosts: tuple[str, ...] = option(
        (), kind=DomainList(), default_doc="none",
        doc="Service domains, separated by spaces, each a subdomain of a local domain "
            "(`chat.example.com`): the service runs on exactly these. Applies at restart.")
    rooms_dn: str = option(
        "", kind=Text(), default_doc="`ou=Rooms,<base DN>`",
        doc="Where persistent rooms are kept in the directory, one entry each "
            "(`mlinkRoom`, see docs/muc.md).")
    max_occupants: int = option(
        1000, kind=Int(1),
        doc="Occupants a room admits at most (owners and admins may still enter).",
        why="a room's presence fan-out grows with its square; 1000 is a large meeting")
    max_rooms_per_user: int = option(
        100, kind=Int(0),
        doc="Rooms one user may have created and still own (0: no limit).")
    create: str = option(
        "local", kind=Choice(CREATORS, "<create> must be one of {hint}"),
        doc="Who may create rooms: `anyone`, `local` (users of this server's domains) or "
            "`group` (members of `<create-group>`).")
    create_group: str = option(
        "", kind=Text(), default_doc="none",
        doc="DN of the directory group (groupOfNames) whose members may create rooms, with "
            "`<create>group</create>`.")
    max_history: int = option(
        50, kind=Int(0),
        doc="Messages a room keeps for newcomers at most (a room's own history length "
            "may be lower).")
    max_message_bytes: int = option(
        16384, kind=Int(256),
        doc="Largest groupchat or private message a room accepts (bytes of XML); larger "
            "ones are refused with policy-violation.")
    idle_temporary: int = option(
        0, kind=Int(0),
        doc="Seconds without a message after which a temporary room is destroyed, its "
            "occupants told (0: only when it empties).")
    idle_persistent: int = option(
        0, kind=Int(0),
        doc="Seconds an empty persistent room may go unused before it is destroyed and "
            "removed from the directory (0: never).")
    archive_default: bool = option(
        True, kind=Bool(),
        doc="Whether a new room archives its messages (XEP-0313); its owner may turn it "
            "off or on (`muc#roomconfig_enablearchiving`). A persistent room whose "
            "directory entry has no `mlinkRoomArchive` archives.",
        why="clients fetch a room's history from its archive on every join and device")
    archive_retention_days: int = option(
        0, kind=Int(minimum=0, maximum=36500), default_doc="0 (forever)",
        doc="Archived room messages older than this many days are deleted (hourly). 0 "
            "keeps them forever.")
    refresh_seconds: int = option(
        60, kind=Int(1),
        doc="How often persistent rooms are read again from the directory whatever the "
            "change feed says (it cannot see deletions on every LDAP server).")

    def __post_init__(self) -> None:
        if self.create == "group" and not self.create_group:
            raise ValueError("<create>group</create> needs <create-group>")


OPTIONS = Options
