"""Values and errors of the store, kept apart from the SQLite backend so a
second backend (or a test double) can share them."""

from __future__ import annotations

from dataclasses import dataclass

# RFC 6121 §2.1.2.5: the only values of the roster item `subscription`
# attribute that are ever stored ("remove" is a request, not a state).
SUBSCRIPTION_STATES = frozenset({"none", "to", "from", "both"})


class StoreError(Exception):
    """The store could not do what was asked (I/O error, database locked for
    longer than the busy timeout, closed store, foreign file, ...).

    Callers map it to a `wait`/`internal-server-error` stanza error: the
    request may well succeed later, and nothing was acknowledged."""


class SchemaTooNewError(StoreError):
    """The database was written by a newer mlink whose schema this code does
    not know. Opening it anyway could corrupt data the newer code relies on,
    so we refuse rather than guess."""


@dataclass(frozen=True, slots=True)
class RosterItem:
    """One roster item (RFC 6121 §2.1.2).

    `groups` is normalised to a sorted tuple without duplicates on
    construction, so two items with the same groups compare equal whatever
    order the client sent them in.
    """

    jid: str
    name: str | None = None
    groups: tuple[str, ...] = ()  # sorted, unique
    subscription: str = "none"  # none | to | from | both
    ask: bool = False  # pending-out: we sent subscribe, no answer yet
    approved: bool = False  # pre-approval given (RFC 6121 §3.4)

    def __post_init__(self) -> None:
        if self.subscription not in SUBSCRIPTION_STATES:
            raise ValueError(f"bad roster subscription state {self.subscription!r}")
        # Frozen dataclass: normalise through object.__setattr__.
        object.__setattr__(self, "groups", tuple(sorted(set(self.groups))))
