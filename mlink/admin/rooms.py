"""`mlink room list|show|create|destroy`: persistent multi-user chat rooms,
acting on the directory the configuration names (embedded or LDAP).

A running server follows the directory (its change feed, and a periodic
read): a room created here appears, a room destroyed here is destroyed on
the server with a destroy presence to its occupants. Temporary rooms live
only in the server and are not listed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from mlink.jid import InvalidJID, parse_jid
from mlink.modules.muc import service_hosts
from mlink.modules.muc.config import ConfigError, RoomConfig
from mlink.modules.muc.options import Options
from mlink.modules.muc.persist import RoomDirectory, RoomRecord, rooms_dn
from mlink.modules.muc.roles import Affiliation

if TYPE_CHECKING:
    from mlink.config_model import Config
    from mlink.directory.base import Directory
    from mlink.jid import JID


class RoomCommandError(Exception):
    """One line for the user; exit status 1."""


def add_parsers(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """The `room` command and its actions; the caller sets its `func`."""
    room: argparse.ArgumentParser = sub.add_parser("room", help="manage persistent chat rooms")
    room_sub = room.add_subparsers(metavar="ACTION")
    listing = room_sub.add_parser("list", help="list persistent rooms")
    listing.add_argument("--config", type=Path)
    listing.set_defaults(room_action="list")
    show = room_sub.add_parser("show", help="show a room's configuration and affiliations")
    show.add_argument("jid")
    show.add_argument("--config", type=Path)
    show.set_defaults(room_action="show")
    create = room_sub.add_parser("create", help="create a persistent room")
    create.add_argument("jid")
    create.add_argument("--owner", required=True, action="append",
                        help="bare JID of an owner (repeat for several)")
    create.add_argument("--name", default="")
    create.add_argument("--description", default="")
    create.add_argument("--members-only", action="store_true")
    create.add_argument("--moderated", action="store_true")
    create.add_argument("--hidden", action="store_true", help="not listed in disco#items")
    create.add_argument("--non-anonymous", action="store_true",
                        help="every occupant sees real JIDs")
    create.add_argument("--member-group", default="",
                        help="DN of a group whose members are the room's members")
    create.add_argument("--config", type=Path)
    create.set_defaults(room_action="create")
    destroy = room_sub.add_parser("destroy", help="destroy a persistent room")
    destroy.add_argument("jid")
    destroy.add_argument("--config", type=Path)
    destroy.set_defaults(room_action="destroy")
    return room


def run(args: argparse.Namespace, config: Config) -> list[str]:
    """Do the action; the lines to print. RoomCommandError for a failure."""
    options = config.module_options.get("muc")
    if "muc" not in config.modules:
        raise RoomCommandError("the muc module is not enabled in this configuration")
    if not isinstance(options, Options):
        options = Options()
    hosts = service_hosts(options, frozenset(config.domains))

    async def act() -> list[str]:
        from mlink.directory import open_directory

        directory = open_directory(config.directory)
        try:
            rooms = RoomDirectory(directory, rooms_dn(directory, options.rooms_dn))
            return await _act(args, rooms, directory, hosts)
        finally:
            await directory.aclose()

    return trio.run(act)


def _room_jid(text: str, hosts: dict[str, str]) -> JID:
    try:
        jid = parse_jid(text)
    except InvalidJID as exc:
        raise RoomCommandError(f"invalid room JID {text!r}: {exc}") from None
    if not jid.local or jid.resource:
        raise RoomCommandError(f"{text!r} is not a room JID (room@service)")
    if jid.domain not in hosts:
        raise RoomCommandError(f"{jid.domain} is not a chat service of this server "
                               f"({', '.join(sorted(hosts)) or 'none'})")
    return jid


async def _act(args: argparse.Namespace, rooms: RoomDirectory, directory: Directory,
               hosts: dict[str, str]) -> list[str]:
    action = args.room_action
    if action == "list":
        found, problems = await rooms.load()
        lines = [_summary(record) for _, record in sorted(found.items(), key=lambda i: str(i[0]))]
        return lines + [f"unreadable: {problem}" for problem in problems]
    jid = _room_jid(args.jid, hosts)
    existing = await rooms.get(jid)
    if action == "show":
        if existing is None:
            raise RoomCommandError(f"no persistent room {jid}")
        return _details(existing)
    if action == "destroy":
        if not await rooms.delete(jid):
            raise RoomCommandError(f"no persistent room {jid}")
        return [f"destroyed {jid}"]
    if existing is not None:
        raise RoomCommandError(f"room {jid} exists")
    owners: dict[str, Affiliation] = {}
    for text in args.owner:
        try:
            owner = parse_jid(text)
        except InvalidJID:
            raise RoomCommandError(f"invalid owner JID {text!r}") from None
        owners[str(owner.bare)] = Affiliation.OWNER
    if args.member_group and await directory.group_members(args.member_group) is None:
        raise RoomCommandError(f"no directory group {args.member_group}")
    try:
        config = RoomConfig().replace(
            persistent=True, name=args.name, description=args.description,
            members_only=args.members_only, moderated=args.moderated, public=not args.hidden,
            whois="anyone" if args.non_anonymous else "moderators",
            member_group=args.member_group)
    except ConfigError as exc:
        raise RoomCommandError(str(exc)) from None
    await rooms.put(jid, config, owners)
    return [f"created {jid}"]


def _summary(record: RoomRecord) -> str:
    config = record.config
    flags = [word for on, word in ((config.members_only, "members-only"),
                                   (config.moderated, "moderated"),
                                   (not config.public, "hidden"),
                                   (config.needs_password, "password"),
                                   (config.non_anonymous, "non-anonymous")) if on]
    name = f"  {config.name}" if config.name else ""
    return f"{record.jid}{name}" + (f"  ({', '.join(flags)})" if flags else "")


def _details(record: RoomRecord) -> list[str]:
    config = record.config
    lines = [f"room: {record.jid}", f"dn: {record.dn}"]
    for label, value in (("name", config.name), ("description", config.description),
                         ("subject", record.subject), ("member group", config.member_group)):
        if value:
            lines.append(f"{label}: {value}")
    lines += [f"public: {'yes' if config.public else 'no'}",
              f"members-only: {'yes' if config.members_only else 'no'}",
              f"moderated: {'yes' if config.moderated else 'no'}",
              f"password: {'yes' if config.needs_password else 'no'}",
              f"real JIDs shown to: {config.whois}",
              f"max occupants: {config.max_users or 'service limit'}",
              f"history: {config.history_length} messages"]
    for aff in (Affiliation.OWNER, Affiliation.ADMIN, Affiliation.MEMBER, Affiliation.OUTCAST):
        jids = sorted(j for j, a in record.affiliations.items() if a == aff)
        if jids:
            lines.append(f"{aff.word}s: {' '.join(jids)}")
    return lines

