"""XEP-0045 §5: affiliations (long-lived, per bare JID) and roles (per
visit, per occupant), and what each may do.

Kept apart from the room so the rules can be read in one place and tested
without stanzas.
"""

from __future__ import annotations

from enum import IntEnum


class Affiliation(IntEnum):
    """Ordered by rank: a higher affiliation may act on a lower one."""

    OUTCAST = -1
    NONE = 0
    MEMBER = 1
    ADMIN = 2
    OWNER = 3

    @property
    def word(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, word: str | None) -> Affiliation | None:
        """The affiliation named `word` (XEP-0045 spelling), or None."""
        if word is None:
            return None
        try:
            return cls[word.upper()]
        except KeyError:
            return None


class Role(IntEnum):
    NONE = 0
    VISITOR = 1
    PARTICIPANT = 2
    MODERATOR = 3

    @property
    def word(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, word: str | None) -> Role | None:
        if word is None:
            return None
        try:
            return cls[word.upper()]
        except KeyError:
            return None


def default_role(affiliation: Affiliation, moderated: bool) -> Role:
    """§5.1.2: the role an occupant enters with: owners and admins
    moderate; members take part; others take part unless the room is
    moderated, where they visit (no voice)."""
    if affiliation >= Affiliation.ADMIN:
        return Role.MODERATOR
    if affiliation == Affiliation.MEMBER:
        return Role.PARTICIPANT
    if affiliation == Affiliation.OUTCAST:
        return Role.NONE
    return Role.VISITOR if moderated else Role.PARTICIPANT


def may_set_role(actor_aff: Affiliation, actor_role: Role, target_aff: Affiliation,
                 target_role: Role, new_role: Role) -> bool:
    """§8, §9: who may change whose role. Moderators kick and give or take
    voice; nobody acts on an admin or owner except someone of higher
    affiliation (§8.2: not "at or above the moderator's level"); only
    admins and owners make or unmake moderators (§9.6, §9.7)."""
    if actor_role != Role.MODERATOR:
        return False
    if target_aff >= Affiliation.ADMIN:
        return actor_aff > target_aff
    if Role.MODERATOR in (new_role, target_role):
        return actor_aff >= Affiliation.ADMIN
    return True


def may_set_affiliation(actor: Affiliation, current: Affiliation, new: Affiliation) -> bool:
    """§9/§10: admins grant and revoke membership and bans of those below
    admin; owners change anything (the last owner is guarded elsewhere)."""
    if actor == Affiliation.OWNER:
        return True
    if actor == Affiliation.ADMIN:
        return current < Affiliation.ADMIN and new < Affiliation.ADMIN
    return False
