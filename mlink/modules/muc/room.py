"""One multi-user chat room (XEP-0045), sans-IO.

A `Room` is fed the stanzas addressed to it (`presence`, `message`, `iq`,
each with the stamped sender and the time) and answers with an `Effects`:
the stanzas to deliver, each with its recipient's real full JID, and what
changed that the service must act on (configuration or affiliations to
write to the directory, history to keep, the room gone). It never awaits,
so every rule below is tested without sockets and a room's state changes
atomically between two stanzas.

Privacy: an occupant's real JID appears in what the room sends only to
those allowed to see it (everybody in a non-anonymous room, moderators in a
semi-anonymous one; §5.2.1); private messages, invitations and history come
from the room or the occupant's room JID.
"""

from __future__ import annotations

import time
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mlink.jid import JID, InvalidJID, parse_jid
from mlink.modules.muc.config import (
    ROOMINFO_FORM_TYPE,
    ConfigError,
    RoomConfig,
    apply_form,
    changed_fields,
    config_form,
)
from mlink.modules.muc.roles import (
    Affiliation,
    Role,
    default_role,
    may_set_affiliation,
    may_set_role,
)
from mlink.stream.errors import stanza_error
from mlink.xml.serialize import CLIENT_NS, Shared, serialize

MUC_NS = "http://jabber.org/protocol/muc"
MUC_USER_NS = f"{MUC_NS}#user"
MUC_ADMIN_NS = f"{MUC_NS}#admin"
MUC_OWNER_NS = f"{MUC_NS}#owner"
DISCO_INFO_NS = "http://jabber.org/protocol/disco#info"
DISCO_ITEMS_NS = "http://jabber.org/protocol/disco#items"
DATA_NS = "jabber:x:data"
STANZA_ID_NS = "urn:xmpp:sid:0"
PING_NS = "urn:xmpp:ping"
MAM_NS = "urn:xmpp:mam:2"
MAM_EXTENDED_NS = "urn:xmpp:mam:2#extended"
# XEP-0410 §3.2: the room answers an occupant's ping of itself.
SELF_PING_OPTIMIZATION = f"{MUC_NS}#self-ping-optimization"
DELAY_NS = "urn:xmpp:delay"
STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
# XEP-0045 §15.6 status codes used here.
NON_ANONYMOUS = 100
CONFIG_CHANGED = 104
SELF = 110
LOGGED = 170
NOW_NON_ANONYMOUS = 172
NOW_SEMI_ANONYMOUS = 173
CREATED = 201
NICK_ASSIGNED = 210
BANNED = 301
NICK_CHANGED = 303
KICKED = 307
AFFILIATION_REMOVED = 321
MEMBERS_ONLY_REMOVED = 322
TECHNICAL = 333
SHUTDOWN = 332
# A nickname longer than this (characters, after the JID's resourceprep) is
# refused with not-acceptable (§7.2.9 leaves the policy to the service; 128
# is far beyond any display name and keeps presence small).
MAX_NICK_CHARS = 128
# A subject is shown by every client in its title bar: bounded like a
# configuration text value.
MAX_SUBJECT_CHARS = 1024

Out = tuple[JID, ET.Element]


def _c(tag: str) -> str:
    return f"{{{CLIENT_NS}}}{tag}"


def _u(tag: str) -> str:
    return f"{{{MUC_USER_NS}}}{tag}"


@dataclass(slots=True)
class Limits:
    """The service's limits that apply inside a room (from the module's
    options; see `mlink.modules.muc.options`)."""

    max_occupants: int = 1000
    max_history: int = 50


@dataclass(slots=True)
class Occupant:
    nick: str
    jid: JID  # the real full JID
    role: Role
    presence: ET.Element  # the client's last presence (its payload is forwarded)
    # The room's presence for this occupant as newcomers get it, per
    # variant (with or without the real JID), with what it was built from:
    # a large room's joins then serialise each occupant's presence once,
    # not once per newcomer.
    shown: dict[bool, tuple[tuple[object, ...], Shared]] = field(default_factory=dict)
    version: int = 0  # bumped whenever `presence` is replaced


@dataclass(slots=True)
class HistoryEntry:
    """A groupchat message as broadcast (no `to`), kept for newcomers."""

    when: float
    stanza: ET.Element
    chars: int  # its length as XML text, for maxchars


@dataclass(slots=True)
class Archived:
    """A groupchat message (or subject change) for the room's archive: its
    archive id (the stanza-id occupants got), when, who sent it (the real
    full JID, shown in results only to those allowed to see it), and the
    message as broadcast (no `to`)."""

    id: int
    when: float
    sender: JID
    stanza: ET.Element


@dataclass(slots=True)
class Effects:
    out: list[Out] = field(default_factory=list)
    persist: bool = False  # configuration or affiliations changed
    history: list[HistoryEntry] = field(default_factory=list)  # added to the history
    archive: list[Archived] = field(default_factory=list)  # for the room's archive
    subject_changed: bool = False
    destroyed: bool = False
    occupants_changed: bool = False

    def send(self, to: JID, stanza: ET.Element) -> None:
        self.out.append((to, stanza))

    def error(self, stanza: ET.Element, condition: str, text: str = "",
              error_type: str | None = None) -> Effects:
        """Answer `stanza` with a stanza error (the XEP-0045 one)."""
        sender = stanza.get("from")
        if sender and stanza.get("type") not in ("error", "result"):
            self.send(parse_jid(sender), stanza_error(stanza, condition, text, error_type))
        return self


class Room:
    """The state of one room and the rules of XEP-0045; see the module docstring."""

    def __init__(self, jid: JID, config: RoomConfig | None = None,
                 affiliations: dict[str, Affiliation] | None = None,
                 limits: Limits | None = None, now: float | None = None) -> None:
        self.jid = jid
        self.config = config or RoomConfig()
        self.affiliations: dict[str, Affiliation] = dict(affiliations or {})
        self.limits = limits or Limits()
        self.occupants: dict[str, Occupant] = {}
        self.by_jid: dict[JID, str] = {}
        # Members of the configured directory group (bare JIDs), or None
        # when the room names none; kept current by the service.
        self.group_members: frozenset[str] | None = None
        self.locked = False
        self.subject = ""
        self.subject_from = ""  # the nick (or room JID) that set it
        self.history: deque[HistoryEntry] = deque()
        self.last_active = time.time() if now is None else now
        # Archive ids (XEP-0313), given by the service that keeps the
        # archive; None: this room archives nothing whatever its config.
        self.archive_ids: Callable[[], int] | None = None

    @property
    def archiving(self) -> bool:
        return self.config.archive and self.archive_ids is not None

    def _logged(self, config: RoomConfig) -> bool:
        """Whether occupants are told what they say is kept (status 170)."""
        return config.logging or (config.archive and self.archive_ids is not None)

    # -- questions ---------------------------------------------------------------

    def affiliation(self, bare: JID | str) -> Affiliation:
        key = str(bare)
        found = self.affiliations.get(key)
        if found is not None:
            return found
        if self.group_members is not None and key in self.group_members:
            return Affiliation.MEMBER
        return Affiliation.NONE

    def occupant_of(self, real: JID) -> Occupant | None:
        nick = self.by_jid.get(real)
        return self.occupants.get(nick) if nick is not None else None

    @property
    def empty(self) -> bool:
        return not self.occupants

    @property
    def owners(self) -> list[str]:
        return sorted(j for j, a in self.affiliations.items() if a == Affiliation.OWNER)

    def nick_jid(self, nick: str) -> JID:
        return JID(self.jid.local, self.jid.domain, nick)

    def _sees_jids(self, viewer: Occupant) -> bool:
        return self.config.non_anonymous or viewer.role == Role.MODERATOR

    # -- presence ----------------------------------------------------------------

    def presence(self, stanza: ET.Element, sender: JID, to: JID, now: float) -> Effects:
        effects = Effects()
        kind = stanza.get("type")
        occupant = self.occupant_of(sender)
        if kind == "error":
            if occupant is not None:  # its client is gone or refuses us
                self._remove(effects, occupant, [TECHNICAL], None)
            return effects
        if kind == "unavailable":
            if occupant is not None:
                self._leave(effects, occupant, stanza)
            return effects
        if kind is not None:
            return effects  # subscriptions to a room mean nothing
        if occupant is None:
            return self._join(effects, stanza, sender, to, now)
        if to.resource != occupant.nick:
            return self._change_nick(effects, stanza, occupant, to.resource)
        occupant.presence = stanza
        occupant.version += 1
        self._broadcast_presence(effects, occupant, [])
        return effects

    def _join(self, effects: Effects, stanza: ET.Element, sender: JID, to: JID,
              now: float, created: bool = False) -> Effects:
        nick = to.resource
        if not nick:
            return effects.error(stanza, "jid-malformed", "a nickname is needed to enter")
        if len(nick) > MAX_NICK_CHARS:
            return effects.error(stanza, "not-acceptable", "the nickname is too long")
        aff = self.affiliation(sender.bare)
        if aff == Affiliation.OUTCAST:
            return effects.error(stanza, "forbidden", "you are banned from this room")
        if self.locked and aff != Affiliation.OWNER:
            return effects.error(stanza, "item-not-found", "the room is not configured yet")
        if self.config.members_only and aff < Affiliation.MEMBER:
            return effects.error(stanza, "registration-required", "the room is members-only")
        muc = stanza.find(f"{{{MUC_NS}}}x")
        if self.config.needs_password and aff < Affiliation.OWNER:
            given = muc.findtext(f"{{{MUC_NS}}}password") if muc is not None else None
            if given != self.config.password:
                return effects.error(stanza, "not-authorized", "a password is required")
        existing = self.occupants.get(nick)
        if existing is not None:
            return effects.error(stanza, "conflict", "that nickname is in use")
        limit = self.limits.max_occupants
        if self.config.max_users:
            limit = min(limit, self.config.max_users)
        if len(self.occupants) >= limit and aff < Affiliation.ADMIN:
            # §7.2.10: the room is full, try later.
            return effects.error(stanza, "service-unavailable", "the room is full", "wait")
        occupant = Occupant(nick, sender, default_role(aff, self.config.moderated), stanza)
        # §7.2.3: the others first, then the newcomer's own presence.
        show = self._sees_jids(occupant)
        for other in self.occupants.values():
            effects.send(sender, self._shown(other, show).addressed(str(sender)))
        self.occupants[nick] = occupant
        self.by_jid[sender] = nick
        self.last_active = now
        effects.occupants_changed = True
        codes = []
        if self.config.non_anonymous:
            codes.append(NON_ANONYMOUS)
        if self._logged(self.config):
            codes.append(LOGGED)  # §15.6: told that what they say is kept
        if created:
            codes.append(CREATED)
        if _asked_nick(stanza) not in (None, nick):
            codes.append(NICK_ASSIGNED)  # the JID's preparation changed it (§7.2.9)
        self._broadcast_presence(effects, occupant, codes)
        history = muc.find(f"{{{MUC_NS}}}history") if muc is not None else None
        for entry in self._history_for(history, now):
            effects.send(sender, self._delayed(entry, sender))
        effects.send(sender, self._subject_message(sender))
        return effects

    def create(self, stanza: ET.Element, sender: JID, to: JID, now: float,
               instant: bool = False) -> Effects:
        """The first join of a new room: its creator becomes owner, and the
        room stays locked until configured (§10.1) unless `instant`."""
        self.affiliations[str(sender.bare)] = Affiliation.OWNER
        self.locked = not instant
        effects = self._join(Effects(), stanza, sender, to, now, created=True)
        return effects

    def _change_nick(self, effects: Effects, stanza: ET.Element, occupant: Occupant,
                     new: str) -> Effects:
        if not new:
            return effects.error(stanza, "jid-malformed", "a nickname is needed")
        if len(new) > MAX_NICK_CHARS:
            return effects.error(stanza, "not-acceptable", "the nickname is too long")
        if new in self.occupants:
            return effects.error(stanza, "conflict", "that nickname is in use")
        old = occupant.nick
        # §7.6: unavailable from the old nick with 303 and the new nick ...
        self._broadcast_presence(effects, occupant, [NICK_CHANGED], kind="unavailable",
                                 item_nick=new)
        del self.occupants[old]
        occupant.nick = new
        occupant.presence = stanza
        occupant.version += 1
        self.occupants[new] = occupant
        self.by_jid[occupant.jid] = new
        # ... then available from the new one.
        self._broadcast_presence(effects, occupant, [])
        return effects

    def _leave(self, effects: Effects, occupant: Occupant, stanza: ET.Element) -> None:
        self._remove(effects, occupant, [], stanza)

    def _remove(self, effects: Effects, occupant: Occupant, codes: list[int],
                stanza: ET.Element | None, actor: str | None = None, reason: str = "",
                affiliation: Affiliation | None = None) -> None:
        """The occupant leaves (or is removed): unavailable to everyone,
        the occupant included (with 110)."""
        occupant.role = Role.NONE
        if stanza is not None:
            occupant.presence = stanza
            occupant.version += 1
        self._broadcast_presence(effects, occupant, codes, kind="unavailable", actor=actor,
                                 reason=reason, affiliation=affiliation)
        self.occupants.pop(occupant.nick, None)
        self.by_jid.pop(occupant.jid, None)
        effects.occupants_changed = True

    def remove_gone(self, real: JID) -> Effects:
        """The occupant's session ended without a word (its presence could
        not be delivered): the others see it leave."""
        effects = Effects()
        occupant = self.occupant_of(real)
        if occupant is not None:
            occupant.role = Role.NONE
            self.occupants.pop(occupant.nick, None)
            self.by_jid.pop(real, None)
            self._broadcast_presence(effects, occupant, [TECHNICAL], kind="unavailable",
                                     skip=real)
            effects.occupants_changed = True
        return effects

    # -- building presence ---------------------------------------------------------

    def _presence_of(self, occupant: Occupant, to: JID | None, show_jid: bool,
                     codes: Iterable[int], kind: str | None = None,
                     item_nick: str | None = None, actor: str | None = None,
                     reason: str = "", affiliation: Affiliation | None = None,
                     destroy: ET.Element | None = None) -> ET.Element:
        attrs = {"from": str(self.nick_jid(occupant.nick))}
        if kind is not None:
            attrs["type"] = kind
        if to is not None:
            attrs["to"] = str(to)
        presence = ET.Element(_c("presence"), attrs)
        if kind is None or occupant.presence.get("type") == "unavailable":
            # The client's show, status, caps and the like, not its MUC request.
            for child in occupant.presence:
                if not child.tag.startswith(f"{{{MUC_NS}"):
                    presence.append(child)
        x = ET.SubElement(presence, _u("x"))
        aff = affiliation if affiliation is not None else self.affiliation(occupant.jid.bare)
        item = ET.SubElement(x, _u("item"), {"affiliation": aff.word,
                                             "role": occupant.role.word})
        if show_jid:
            item.set("jid", str(occupant.jid))
        if item_nick is not None:
            item.set("nick", item_nick)
        if actor is not None:
            ET.SubElement(item, _u("actor"), {"nick": actor})
        if reason:
            ET.SubElement(item, _u("reason")).text = reason
        if destroy is not None:
            x.append(destroy)
        for code in codes:
            ET.SubElement(x, _u("status"), {"code": str(code)})
        return presence

    def _shown(self, occupant: Occupant, show_jid: bool) -> Shared:
        """`occupant`'s current presence as another occupant gets it (no
        status codes), built and serialised once until it changes."""
        key = (occupant.nick, occupant.role, self.affiliation(occupant.jid.bare),
               occupant.version)
        cached = occupant.shown.get(show_jid)
        if cached is None or cached[0] != key:
            cached = (key, Shared(self._presence_of(occupant, None, show_jid, [])))
            occupant.shown[show_jid] = cached
        return cached[1]

    def _broadcast_presence(self, effects: Effects, occupant: Occupant,
                            self_codes: list[int], kind: str | None = None,
                            item_nick: str | None = None, actor: str | None = None,
                            reason: str = "", affiliation: Affiliation | None = None,
                            skip: JID | None = None) -> None:
        """`occupant`'s presence to every occupant: with its real JID to
        those who may see it, and to itself with 110 and `self_codes`
        (codes other than 100/170/201 concern everybody: 303, 307, 301...)."""
        others_codes = [c for c in self_codes
                        if c not in (NON_ANONYMOUS, LOGGED, CREATED, NICK_ASSIGNED)]
        variants: dict[bool, Shared] = {}
        for other in self.occupants.values():
            if other is occupant or other.jid == skip:
                continue
            show = self._sees_jids(other)
            shared = variants.get(show)
            if shared is None:
                shared = variants[show] = Shared(self._presence_of(
                    occupant, None, show, others_codes, kind, item_nick, actor, reason,
                    affiliation))
            effects.send(other.jid, shared.addressed(str(other.jid)))
        if occupant.jid != skip:
            effects.send(occupant.jid, self._presence_of(
                occupant, occupant.jid, True, [*self_codes, SELF], kind, item_nick,
                actor, reason, affiliation))

    # -- history and subject --------------------------------------------------------

    def _history_for(self, request: ET.Element | None, now: float) -> list[HistoryEntry]:
        """§7.2.15: the newest messages within maxstanzas, maxchars, seconds
        and since, oldest first."""
        entries = list(self.history)
        if request is None:
            return entries
        max_stanzas = _int_attr(request, "maxstanzas")
        max_chars = _int_attr(request, "maxchars")
        seconds = _int_attr(request, "seconds")
        since = _parse_stamp(request.get("since"))
        chosen: list[HistoryEntry] = []
        chars = 0
        for entry in reversed(entries):
            if max_stanzas is not None and len(chosen) >= max_stanzas:
                break
            if seconds is not None and entry.when < now - seconds:
                break
            if since is not None and entry.when < since:
                break
            if max_chars is not None and chars + entry.chars > max_chars:
                break
            chars += entry.chars
            chosen.append(entry)
        chosen.reverse()
        return chosen

    def _delayed(self, entry: HistoryEntry, to: JID) -> ET.Element:
        message = ET.Element(entry.stanza.tag, dict(entry.stanza.attrib))
        message.set("to", str(to))
        message.text = entry.stanza.text
        message.extend(list(entry.stanza))
        ET.SubElement(message, f"{{{DELAY_NS}}}delay",
                      {"from": str(self.jid), "stamp": _stamp(entry.when)})
        return message

    def _subject_message(self, to: JID) -> ET.Element:
        """§7.2.16: the subject closes the join (empty when none is set)."""
        sender = str(self.nick_jid(self.subject_from)) if self.subject_from else str(self.jid)
        message = ET.Element(_c("message"), {"from": sender, "to": str(to),
                                             "type": "groupchat", "id": _new_id()})
        ET.SubElement(message, _c("subject")).text = self.subject or None
        return message

    def add_history(self, entry: HistoryEntry) -> None:
        """Keep `entry`, dropping the oldest beyond the room's history length."""
        keep = min(self.config.history_length, self.limits.max_history)
        if keep <= 0:
            self.history.clear()
            return
        self.history.append(entry)
        while len(self.history) > keep:
            self.history.popleft()

    # -- messages ------------------------------------------------------------------

    def message(self, stanza: ET.Element, sender: JID, to: JID, now: float) -> Effects:
        effects = Effects()
        kind = stanza.get("type", "normal")
        occupant = self.occupant_of(sender)
        if kind == "error":
            if occupant is not None and to.resource:
                return effects  # a private message's recipient refused it: nothing to do
            return effects
        if to.resource:
            return self._private(effects, stanza, occupant, to.resource, kind)
        if kind != "groupchat":
            x = stanza.find(_u("x"))
            if x is not None and (x.find(_u("invite")) is not None
                                  or x.find(_u("decline")) is not None):
                return self._invitation(effects, stanza, sender, occupant, x)
            return effects.error(stanza, "bad-request", "only groupchat messages go to a room")
        if occupant is None:
            return effects.error(stanza, "not-acceptable", "you are not in the room")
        if occupant.role < Role.PARTICIPANT:
            return effects.error(stanza, "forbidden", "you have no voice in this room")
        subject = stanza.find(_c("subject"))
        body = stanza.find(_c("body"))
        if subject is not None and body is None:
            if not (occupant.role == Role.MODERATOR or self.config.change_subject):
                return effects.error(stanza, "forbidden", "you may not change the subject")
            text = subject.text or ""
            if len(text) > MAX_SUBJECT_CHARS:
                return effects.error(stanza, "not-acceptable", "the subject is too long")
            self.subject, self.subject_from = text, occupant.nick
            effects.subject_changed = True
        self.last_active = now
        broadcast = ET.Element(_c("message"), {"from": str(self.nick_jid(occupant.nick)),
                                               "type": "groupchat"})
        if stanza.get("id") is not None:
            broadcast.set("id", stanza.get("id", ""))
        broadcast.text = stanza.text
        for child in stanza:
            # XEP-0359 §3.1: a stanza-id claiming to be ours is the sender's forgery.
            if child.tag == f"{{{STANZA_ID_NS}}}stanza-id" and child.get("by") == str(self.jid):
                continue
            # XEP-0313 §7.1.2, §8.4: a sender's muc#user <x/> would claim
            # a real JID (archive results carry the room's own).
            if child.tag == _u("x"):
                continue
            broadcast.append(child)
        archived = self.archiving and (body is not None or effects.subject_changed)
        if archived:
            assert self.archive_ids is not None
            archive_id = self.archive_ids()
            # The archive id is the stanza-id: a client pages the archive from it.
            ET.SubElement(broadcast, f"{{{STANZA_ID_NS}}}stanza-id",
                          {"id": str(archive_id), "by": str(self.jid)})
            effects.archive.append(Archived(archive_id, now, occupant.jid, broadcast))
        elif body is not None:
            ET.SubElement(broadcast, f"{{{STANZA_ID_NS}}}stanza-id",
                          {"id": _new_id(), "by": str(self.jid)})
        shared = Shared(broadcast)
        for other in self.occupants.values():
            effects.send(other.jid, shared.addressed(str(other.jid)))
        if body is not None:
            entry = HistoryEntry(now, broadcast, len(serialize(broadcast)))
            self.add_history(entry)
            effects.history.append(entry)
        return effects

    def _private(self, effects: Effects, stanza: ET.Element, occupant: Occupant | None,
                 nick: str, kind: str) -> Effects:
        """§7.5: a private message to another occupant, from the sender's
        room JID; its real JID is not revealed."""
        if kind == "groupchat":
            return effects.error(stanza, "bad-request", "a private message is not groupchat")
        if occupant is None:
            return effects.error(stanza, "not-acceptable", "you are not in the room")
        target = self.occupants.get(nick)
        if target is None:
            return effects.error(stanza, "item-not-found", "no such occupant")
        allowed = self.config.allow_pm
        if (allowed == "none" or (allowed == "participants" and occupant.role < Role.PARTICIPANT)
                or (allowed == "moderators" and occupant.role < Role.MODERATOR)):
            return effects.error(stanza, "forbidden", "private messages are not allowed")
        copy = self._forwarded(stanza, occupant.nick, target.jid)
        if copy.find(_u("x")) is None:
            ET.SubElement(copy, _u("x"))  # XEP-0045 §7.5: marks it as from a room
        effects.send(target.jid, copy)
        return effects

    def _invitation(self, effects: Effects, stanza: ET.Element, sender: JID,
                    occupant: Occupant | None, x: ET.Element) -> Effects:
        """§7.8.2 mediated invitations (and their declines, §7.8.2.3)."""
        decline = x.find(_u("decline"))
        if decline is not None:
            try:
                to = parse_jid(decline.get("to", ""))
            except InvalidJID:
                return effects.error(stanza, "jid-malformed")
            message = ET.Element(_c("message"), {"from": str(self.jid), "to": str(to)})
            out = ET.SubElement(message, _u("x"))
            fwd = ET.SubElement(out, _u("decline"), {"from": str(sender.bare)})
            if (reason := decline.findtext(_u("reason"))) is not None:
                ET.SubElement(fwd, _u("reason")).text = reason
            effects.send(to, message)
            return effects
        if occupant is None:
            return effects.error(stanza, "not-acceptable", "you are not in the room")
        aff = self.affiliation(sender.bare)
        if (self.config.members_only and aff < Affiliation.ADMIN
                and not self.config.allow_invites):
            return effects.error(stanza, "forbidden", "only admins invite to this room")
        invites = x.findall(_u("invite"))
        targets: list[tuple[JID, str]] = []
        for invite in invites:
            try:
                targets.append((parse_jid(invite.get("to", "")),
                                invite.findtext(_u("reason")) or ""))
            except InvalidJID:
                return effects.error(stanza, "jid-malformed", "bad invitee")
        inviter = (str(sender.bare) if self.config.non_anonymous
                   else str(self.nick_jid(occupant.nick)))
        for to, reason in targets:
            if self.config.members_only and self.affiliation(to.bare) < Affiliation.MEMBER:
                # §7.8.2: the invitee of a members-only room becomes a member.
                self.affiliations[str(to.bare)] = Affiliation.MEMBER
                effects.persist = True
            message = ET.Element(_c("message"), {"from": str(self.jid), "to": str(to)})
            if stanza.get("id") is not None:
                message.set("id", stanza.get("id", ""))
            out = ET.SubElement(message, _u("x"))
            inv = ET.SubElement(out, _u("invite"), {"from": inviter})
            if reason:
                ET.SubElement(inv, _u("reason")).text = reason
            if self.config.needs_password:
                ET.SubElement(out, _u("password")).text = self.config.password
            effects.send(to, message)
        return effects

    # -- iq ------------------------------------------------------------------------

    def iq(self, stanza: ET.Element, sender: JID, to: JID, now: float) -> Effects:
        effects = Effects()
        kind = stanza.get("type")
        if to.resource:
            return self._relay_iq(effects, stanza, sender, to.resource)
        if kind not in ("get", "set"):
            return effects
        payload = stanza[0] if len(stanza) == 1 else None
        ns = payload.tag[1:].partition("}")[0] if payload is not None else ""
        aff = self.affiliation(sender.bare)
        if self.locked and aff != Affiliation.OWNER:
            return effects.error(stanza, "item-not-found")
        assert payload is not None or ns == ""
        if kind == "get" and ns == DISCO_INFO_NS and payload is not None:
            if payload.get("node") is not None:
                return effects.error(stanza, "item-not-found")
            return self._result(effects, stanza, self.disco_info())
        if kind == "get" and ns == DISCO_ITEMS_NS:
            # Occupants are not listed: that would reveal who is present to
            # people who are not (§6.5 leaves it to the service).
            return self._result(effects, stanza, ET.Element(f"{{{DISCO_ITEMS_NS}}}query"))
        if ns == MUC_ADMIN_NS and payload is not None:
            return (self._admin_set(effects, stanza, payload, sender) if kind == "set"
                    else self._admin_get(effects, stanza, payload, sender))
        if ns == MUC_OWNER_NS and payload is not None:
            return self._owner(effects, stanza, payload, sender, kind)
        return effects.error(stanza, "service-unavailable")

    def _relay_iq(self, effects: Effects, stanza: ET.Element, sender: JID,
                  nick: str) -> Effects:
        """An iq between occupants through the room (vCard avatars, version,
        pings), each seeing only the other's room JID: a request goes to
        the occupant's real JID from the requester's room JID; the answer,
        addressed to that room JID, goes back the same way. The id is kept:
        the answer's `to` (the requester's room JID) says whose it is."""
        kind = stanza.get("type")
        occupant = self.occupant_of(sender)
        target = self.occupants.get(nick)
        if kind in ("get", "set"):
            if occupant is None:
                return effects.error(stanza, "not-acceptable", "you are not in the room")
            if target is None:
                return effects.error(stanza, "item-not-found", "no such occupant")
        elif occupant is None or target is None:
            return effects  # an answer from or for someone who left: dropped
        if kind == "get" and occupant is target and len(stanza) == 1 \
                and stanza[0].tag == f"{{{PING_NS}}}ping":
            # XEP-0410 self-ping: "am I still in the room?" answered by the
            # room at once, not relayed to the asking client itself.
            reply = ET.Element(stanza.tag, {"type": "result", "id": stanza.get("id", ""),
                                            "from": str(self.nick_jid(nick)),
                                            "to": stanza.get("from", "")})
            effects.send(parse_jid(stanza.get("from", "")), reply)
            return effects
        effects.send(target.jid, self._forwarded(stanza, occupant.nick, target.jid))
        return effects

    def _forwarded(self, stanza: ET.Element, nick: str, to: JID) -> ET.Element:
        """`stanza` from the occupant `nick`, passed on to the real JID `to`
        from that occupant's room JID (a private message, a relayed iq)."""
        copy = ET.Element(stanza.tag, {k: v for k, v in stanza.attrib.items()
                                       if k not in ("from", "to")})
        copy.set("from", str(self.nick_jid(nick)))
        copy.set("to", str(to))
        copy.text = stanza.text
        copy.extend(list(stanza))
        return copy

    def _result(self, effects: Effects, stanza: ET.Element,
                payload: ET.Element | None = None) -> Effects:
        reply = ET.Element(stanza.tag, {"type": "result", "id": stanza.get("id", ""),
                                        "from": str(self.jid),
                                        "to": stanza.get("from", "")})
        if payload is not None:
            reply.append(payload)
        effects.send(parse_jid(stanza.get("from", "")), reply)
        return effects

    def disco_info(self) -> ET.Element:
        """§6.4: the room's identity, features and muc#roominfo."""
        query = ET.Element(f"{{{DISCO_INFO_NS}}}query")
        ET.SubElement(query, f"{{{DISCO_INFO_NS}}}identity",
                      {"category": "conference", "type": "text",
                       "name": self.config.name or self.jid.local})
        config = self.config
        features = [MUC_NS, STANZA_ID_NS, SELF_PING_OPTIMIZATION,
                    "muc_public" if config.public else "muc_hidden",
                    "muc_persistent" if config.persistent else "muc_temporary",
                    "muc_membersonly" if config.members_only else "muc_open",
                    "muc_moderated" if config.moderated else "muc_unmoderated",
                    "muc_passwordprotected" if config.needs_password else "muc_unsecured",
                    "muc_nonanonymous" if config.non_anonymous else "muc_semianonymous"]
        if self.archiving:
            features += [MAM_NS, MAM_EXTENDED_NS]
        for var in features:
            ET.SubElement(query, f"{{{DISCO_INFO_NS}}}feature", {"var": var})
        form = ET.SubElement(query, f"{{{DATA_NS}}}x", {"type": "result"})
        for var, value in (("FORM_TYPE", ROOMINFO_FORM_TYPE),
                           ("muc#roominfo_description", config.description),
                           ("muc#roominfo_subject", self.subject),
                           ("muc#roominfo_occupants", str(len(self.occupants)))):
            fld = ET.SubElement(form, f"{{{DATA_NS}}}field", {"var": var})
            if var == "FORM_TYPE":
                fld.set("type", "hidden")
            ET.SubElement(fld, f"{{{DATA_NS}}}value").text = value
        return query

    # -- admin (§8, §9) ------------------------------------------------------------

    def _admin_get(self, effects: Effects, stanza: ET.Element, query: ET.Element,
                   sender: JID) -> Effects:
        item = query.find(f"{{{MUC_ADMIN_NS}}}item")
        if item is None:
            return effects.error(stanza, "bad-request")
        actor = self.occupant_of(sender)
        aff = self.affiliation(sender.bare)
        result = ET.Element(f"{{{MUC_ADMIN_NS}}}query")
        wanted_aff = Affiliation.parse(item.get("affiliation"))
        wanted_role = Role.parse(item.get("role"))
        if wanted_aff is not None and wanted_aff != Affiliation.NONE:
            if aff < Affiliation.ADMIN:
                return effects.error(stanza, "forbidden")
            for jid, found in sorted(self.affiliations.items()):
                if found == wanted_aff:
                    ET.SubElement(result, f"{{{MUC_ADMIN_NS}}}item",
                                  {"affiliation": found.word, "jid": jid})
            if wanted_aff == Affiliation.MEMBER and self.group_members:
                for jid in sorted(self.group_members - set(self.affiliations)):
                    ET.SubElement(result, f"{{{MUC_ADMIN_NS}}}item",
                                  {"affiliation": "member", "jid": jid})
        elif wanted_role is not None and wanted_role != Role.NONE:
            if actor is None or actor.role != Role.MODERATOR:
                return effects.error(stanza, "forbidden")
            for occ in self.occupants.values():
                if occ.role == wanted_role:
                    ET.SubElement(result, f"{{{MUC_ADMIN_NS}}}item",
                                  {"nick": occ.nick, "role": occ.role.word,
                                   "affiliation": self.affiliation(occ.jid.bare).word,
                                   "jid": str(occ.jid)})
        else:
            return effects.error(stanza, "bad-request")
        return self._result(effects, stanza, result)

    def _admin_set(self, effects: Effects, stanza: ET.Element, query: ET.Element,
                   sender: JID) -> Effects:
        """Role and affiliation changes, all or none (§9, §10)."""
        actor = self.occupant_of(sender)
        actor_aff = self.affiliation(sender.bare)
        actor_role = actor.role if actor is not None else Role.NONE
        role_changes: list[tuple[Occupant, Role, str]] = []
        aff_changes: list[tuple[str, Affiliation, str]] = []
        items = query.findall(f"{{{MUC_ADMIN_NS}}}item")
        if not items:
            return effects.error(stanza, "bad-request")
        for item in items:
            reason = item.findtext(f"{{{MUC_ADMIN_NS}}}reason") or ""
            role_word, aff_word = item.get("role"), item.get("affiliation")
            if role_word is not None and aff_word is None:
                role = Role.parse(role_word)
                target = self.occupants.get(item.get("nick", ""))
                if role is None:
                    return effects.error(stanza, "bad-request", "unknown role")
                if target is None:
                    return effects.error(stanza, "item-not-found", "no such occupant")
                target_aff = self.affiliation(target.jid.bare)
                if not may_set_role(actor_aff, actor_role, target_aff, target.role, role):
                    return effects.error(stanza, "not-allowed")
                role_changes.append((target, role, reason))
            elif aff_word is not None:
                aff = Affiliation.parse(aff_word)
                if aff is None:
                    return effects.error(stanza, "bad-request", "unknown affiliation")
                if item.get("jid"):
                    try:
                        bare = str(parse_jid(item.get("jid", "")).bare)
                    except InvalidJID:
                        return effects.error(stanza, "jid-malformed")
                else:
                    occupant = self.occupants.get(item.get("nick", ""))
                    if occupant is None:
                        return effects.error(stanza, "item-not-found", "no such occupant")
                    bare = str(occupant.jid.bare)
                if not may_set_affiliation(actor_aff, self.affiliation(bare), aff):
                    return effects.error(stanza, "forbidden")
                aff_changes.append((bare, aff, reason))
            else:
                return effects.error(stanza, "bad-request")
        # §10.6: the room must keep an owner.
        owners = set(self.owners)
        for bare, aff, _ in aff_changes:
            if aff == Affiliation.OWNER:
                owners.add(bare)
            else:
                owners.discard(bare)
        if self.owners and not owners:
            return effects.error(stanza, "conflict", "the room needs an owner")
        actor_nick = actor.nick if actor is not None else None
        for target, role, reason in role_changes:
            if target.nick in self.occupants:
                self._set_role(effects, target, role, actor_nick, reason)
        for bare, aff, reason in aff_changes:
            self.set_affiliation(effects, bare, aff, actor_nick, reason)
        return self._result(effects, stanza)

    def _set_role(self, effects: Effects, target: Occupant, role: Role, actor: str | None,
                  reason: str) -> None:
        if role == Role.NONE:
            self._remove(effects, target, [KICKED], None, actor, reason)
            return
        was_moderator = target.role == Role.MODERATOR
        target.role = role
        self._broadcast_presence(effects, target, [], actor=actor, reason=reason)
        if role == Role.MODERATOR and not was_moderator and not self.config.non_anonymous:
            # A new moderator of a semi-anonymous room learns the real JIDs.
            for other in self.occupants.values():
                if other is not target:
                    effects.send(target.jid, self._shown(other, True).addressed(
                        str(target.jid)))

    def set_affiliation(self, effects: Effects, bare: str, aff: Affiliation,
                        actor: str | None = None, reason: str = "") -> None:
        """Record `bare`'s new affiliation and apply it to its occupants."""
        if aff == Affiliation.NONE:
            self.affiliations.pop(bare, None)
        else:
            self.affiliations[bare] = aff
        effects.persist = True
        self._apply_affiliation(effects, bare, actor, reason)

    def _apply_affiliation(self, effects: Effects, bare: str, actor: str | None = None,
                           reason: str = "") -> None:
        """What `bare`'s current affiliation means for its occupants now:
        a ban or a lost membership of a members-only room removes them
        (301, 321); otherwise their role follows (§9, §10)."""
        aff = self.affiliation(bare)
        for occupant in [o for o in self.occupants.values() if str(o.jid.bare) == bare]:
            if aff == Affiliation.OUTCAST:
                self._remove(effects, occupant, [BANNED], None, actor, reason,
                             affiliation=aff)
            elif self.config.members_only and aff < Affiliation.MEMBER:
                self._remove(effects, occupant, [AFFILIATION_REMOVED], None, actor, reason,
                             affiliation=aff)
            else:
                occupant.role = default_role(aff, self.config.moderated)
                self._broadcast_presence(effects, occupant, [], actor=actor, reason=reason)

    def replace_affiliations(self, affiliations: dict[str, Affiliation],
                             group_members: frozenset[str] | None) -> Effects:
        """New affiliations from the directory: occupants whose standing
        changed see (and are shown) the change."""
        effects = Effects()
        before = {o.jid.bare: self.affiliation(o.jid.bare) for o in self.occupants.values()}
        self.affiliations = dict(affiliations)
        self.group_members = group_members
        for bare, old in before.items():
            if self.affiliation(bare) != old:
                self._apply_affiliation(effects, str(bare))
        return effects

    # -- owner (§10) ----------------------------------------------------------------

    def _owner(self, effects: Effects, stanza: ET.Element, query: ET.Element, sender: JID,
               kind: str) -> Effects:
        if self.affiliation(sender.bare) != Affiliation.OWNER:
            return effects.error(stanza, "forbidden", "only owners configure a room")
        if kind == "get":
            result = ET.Element(f"{{{MUC_OWNER_NS}}}query")
            result.append(config_form(self.config))
            return self._result(effects, stanza, result)
        destroy = query.find(f"{{{MUC_OWNER_NS}}}destroy")
        if destroy is not None:
            self.destroy(effects, destroy.get("jid"),
                         destroy.findtext(f"{{{MUC_OWNER_NS}}}reason") or "",
                         destroy.findtext(f"{{{MUC_OWNER_NS}}}password"))
            return self._result(effects, stanza)
        form = query.find(f"{{{DATA_NS}}}x")
        if form is None:
            return effects.error(stanza, "bad-request")
        if form.get("type") == "cancel":
            if self.locked:
                # §10.1.3: cancelling the creation of a new room ends it.
                self.destroy(effects, None, "")
            return self._result(effects, stanza)
        if form.get("type") != "submit":
            return effects.error(stanza, "bad-request")
        try:
            new = apply_form(self.config, form)
        except ConfigError as exc:
            return effects.error(stanza, exc.condition, str(exc))
        self._result(effects, stanza)
        self.change_config(effects, new)
        return effects

    def change_config(self, effects: Effects, new: RoomConfig) -> None:
        """Take configuration `new` (from the owner's form or the
        directory) and tell the occupants (§10.2.1)."""
        old, self.config = self.config, new
        was_locked, self.locked = self.locked, False
        effects.persist = True
        changed = changed_fields(old, new)
        if not changed and not was_locked:
            return
        codes = [CONFIG_CHANGED] if changed else []
        if "whois" in changed:
            codes.append(NOW_NON_ANONYMOUS if new.non_anonymous else NOW_SEMI_ANONYMOUS)
        if self._logged(old) != self._logged(new):
            codes.append(LOGGED if self._logged(new) else 171)
        if codes:
            message = ET.Element(_c("message"), {"from": str(self.jid), "type": "groupchat",
                                                 "id": _new_id()})
            x = ET.SubElement(message, _u("x"))
            for code in codes:
                ET.SubElement(x, _u("status"), {"code": str(code)})
            shared = Shared(message)
            for occupant in self.occupants.values():
                effects.send(occupant.jid, shared.addressed(str(occupant.jid)))
        if new.members_only and not old.members_only:
            for occupant in list(self.occupants.values()):
                if self.affiliation(occupant.jid.bare) < Affiliation.MEMBER:
                    self._remove(effects, occupant, [MEMBERS_ONLY_REMOVED], None)
        if new.moderated != old.moderated:
            for occupant in self.occupants.values():
                aff = self.affiliation(occupant.jid.bare)
                role = default_role(aff, new.moderated)
                if aff == Affiliation.NONE and role != occupant.role:
                    occupant.role = role
                    self._broadcast_presence(effects, occupant, [])
        if "history_length" in changed:
            while len(self.history) > min(new.history_length, self.limits.max_history):
                self.history.popleft()

    def destroy(self, effects: Effects, alternate: str | None, reason: str,
                password: str | None = None, codes: Iterable[int] = ()) -> None:
        """§10.9: every occupant leaves, told where the room went."""
        for occupant in list(self.occupants.values()):
            destroy = ET.Element(_u("destroy"))
            if alternate:
                destroy.set("jid", alternate)
            if reason:
                ET.SubElement(destroy, _u("reason")).text = reason
            if password:
                ET.SubElement(destroy, _u("password")).text = password
            occupant.role = Role.NONE
            effects.send(occupant.jid, self._presence_of(
                occupant, occupant.jid, True, [*codes, SELF], "unavailable",
                affiliation=Affiliation.NONE, destroy=destroy))
        self.occupants.clear()
        self.by_jid.clear()
        effects.destroyed = True

    def shutdown(self) -> Effects:
        """§15.6 status 332: the service is going down; occupants are told."""
        effects = Effects()
        for occupant in list(self.occupants.values()):
            occupant.role = Role.NONE
            effects.send(occupant.jid, self._presence_of(
                occupant, occupant.jid, True, [SHUTDOWN, SELF], "unavailable"))
        self.occupants.clear()
        self.by_jid.clear()
        return effects


def _asked_nick(stanza: ET.Element) -> str | None:
    """The nickname as the client wrote it in `to`, before the JID's
    preparation (NFC and the like), or None without one."""
    to = stanza.get("to")
    if to is None or "/" not in to:
        return None
    return to.partition("/")[2]


def _int_attr(elem: ET.Element, name: str) -> int | None:
    text = elem.get(name)
    if text is None:
        return None
    try:
        return max(0, int(text))
    except ValueError:
        return None


def _stamp(when: float) -> str:
    """XEP-0082 date-time, UTC, as XEP-0203 uses it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _parse_stamp(text: str | None) -> float | None:
    """An XEP-0082 date-time (with or without fractions and a zone), as
    seconds since the epoch; None when absent or unreadable."""
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _new_id() -> str:
    return uuid.uuid4().hex
