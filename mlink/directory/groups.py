"""Directory groups to roster groups, the part both backends share.

A backend reads two things: every user once (one paged search giving each
user's DN, JID and uids: a `UserIndex`), and the group entries the
configuration names. `resolve_group` then maps member values to JIDs with
dictionary lookups only, so a group of 5,000 members costs 5,000 lookups,
never 5,000 searches.

Member attributes understood (the three group shapes in common use):
- `member` (groupOfNames) and `uniqueMember` (groupOfUniqueNames; RFC 4517
  Name and Optional UID: a DN optionally followed by `#'0101'B`, which is
  dropped) hold DNs of user entries;
- `memberUid` (posixGroup, RFC 2307) holds uids, looked up as the users'
  `uid` values.
An entry with several of them (rfc2307bis groups) contributes the union.
Values that are not users mlink knows (other groups, entries outside the
users subtree or filter) are left out: nested groups are not expanded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mlink.config_model import RosterGroupConfig
from mlink.directory.base import DirectoryGroup
from mlink.directory.names import normalize_dn, rdn_value
from mlink.jid import InvalidJID, parse_jid

log = logging.getLogger(__name__)

DN_MEMBER_ATTRIBUTES = ("member", "uniqueMember")
UID_MEMBER_ATTRIBUTE = "memberUid"
# The naming attribute most groups have, used when the configured name
# attribute is missing from an entry.
FALLBACK_NAME_ATTRIBUTE = "cn"
# The optional UID part of a uniqueMember value (RFC 4517 §3.3.21).
_BITSTRING_RE = re.compile(r"#'[01]*'B$")


def group_attributes(spec: RosterGroupConfig) -> list[str]:
    """The attributes to read from a group entry for `spec`."""
    return [spec.name_attribute, FALLBACK_NAME_ATTRIBUTE, *DN_MEMBER_ATTRIBUTES,
            UID_MEMBER_ATTRIBUTE]


def bare_jid(value: str) -> str | None:
    """`value` prepared as a bare JID (as mlink.jid gives it), or None when
    it is not one; the roster code compares these with session JIDs."""
    try:
        jid = parse_jid(value.strip())
    except InvalidJID:
        return None
    if not jid.local or jid.resource:
        return None
    return str(jid)


@dataclass(slots=True)
class UserIndex:
    """Every user mlink knows, by normalised DN and by uid."""

    by_dn: dict[str, str] = field(default_factory=dict)
    by_uid: dict[str, str] = field(default_factory=dict)
    # uids that several users share (same localpart in two domains): a
    # memberUid naming one is ambiguous and matches nobody.
    ambiguous_uids: set[str] = field(default_factory=set)

    def add(self, dn: str, jid_value: str, uids: Sequence[str]) -> None:
        jid = bare_jid(jid_value)
        if jid is None:
            log.warning("directory: %s has JID attribute %r, which is not a bare JID; "
                        "it cannot be a roster group member", dn, jid_value)
            return
        self.by_dn[normalize_dn(dn)] = jid
        for uid in uids:
            key = uid.strip().lower()  # uid matches without case (caseIgnoreMatch)
            if key in self.by_uid and self.by_uid[key] != jid:
                self.ambiguous_uids.add(key)
            self.by_uid[key] = jid


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def resolve_group(
    dn: str,
    get: Callable[[str], Sequence[str | bytes]],
    spec: RosterGroupConfig,
    users: UserIndex,
) -> DirectoryGroup:
    """The roster group of one group entry; `get(name)` gives an attribute's
    values (names compared without case by the caller)."""
    members: set[str] = set()
    unknown = 0
    for attribute in DN_MEMBER_ATTRIBUTES:
        for value in get(attribute):
            member_dn = _BITSTRING_RE.sub("", _text(value))
            jid = users.by_dn.get(normalize_dn(member_dn))
            if jid is None:
                unknown += 1
            else:
                members.add(jid)
    for value in get(UID_MEMBER_ATTRIBUTE):
        key = _text(value).strip().lower()
        jid = users.by_uid.get(key)
        if jid is None or key in users.ambiguous_uids:
            if key in users.ambiguous_uids:
                log.warning("directory: %s: memberUid %r matches users in several "
                            "domains; left out", dn, key)
            unknown += 1
        else:
            members.add(jid)
    if unknown:
        log.debug("directory: %s: %d member values are not users mlink knows", dn, unknown)
    if spec.name:
        name = spec.name
    else:
        values = get(spec.name_attribute) or get(FALLBACK_NAME_ATTRIBUTE)
        name = _text(values[0]).strip() if values else ""
        name = name or rdn_value(dn)
    return DirectoryGroup(key=normalize_dn(dn), name=name, members=frozenset(members))


def dedupe(groups: list[DirectoryGroup]) -> list[DirectoryGroup]:
    """Each group once, as the first spec found it (configuration order)."""
    seen: set[str] = set()
    out = []
    for group in groups:
        if group.key not in seen:
            seen.add(group.key)
            out.append(group)
    return out
