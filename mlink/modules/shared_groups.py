"""Roster pre-population: directory groups whose members all see each other.

The configuration (`<rosters>`, `config.rosters.groups`) lists directory
groups, by DN or by filter. A background task resolves them all with one
`Directory.roster_groups` call (paged searches, done by the directory layer)
when the server starts, within the directory change feed's interval of a
change that may touch a group (`mlink.router.directory_watch`), and every
`refresh_seconds` anyway (a polled LDAP feed cannot see deletions); a
reload's new group list applies at once. It installs the
result in the roster cache's in-memory `GroupIndex`
(`mlink.router.rosters`). Rosters handed out merge the group items in, so a
login, a roster get, a presence broadcast or a probe never searches the
directory per contact, and nothing group-derived is written to the store.

When the directory cannot be reached the last good resolution stays in use
(a directory outage must not empty every roster) and the load is retried
sooner than the refresh interval.

After each refresh, every online user whose group-derived items changed (a
member added or removed, a group renamed, created or gone) gets:
- a roster push per changed item, each with the roster version right after
  it; an item that went away is pushed with `subscription='remove'`, unless
  the user's own (personal) item for the contact remains, which is pushed
  as it now stands;
- presence, as a subscription change would give it (RFC 6121 §3.1.5,
  §3.2.2): a new contact gets the user's current available presence and the
  user the contact's, with no subscription handshake; a contact that no
  longer shares presence gets unavailable, both ways.

Refresh runs in the server's nursery (`Module.spawn`), so it ends with the
server; a bug in one refresh is logged and the next one runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mlink.config_model import Config, RosterGroupConfig
from mlink.directory.base import DirectoryError
from mlink.jid import parse_jid
from mlink.modules import presence
from mlink.modules.roster import push
from mlink.router.directory_watch import follow_groups
from mlink.router.rosters import RosterCache, SharedChange, rosters_of
from mlink.store import RosterItem

if TYPE_CHECKING:
    from mlink.module import Module

log = logging.getLogger(__name__)

# When a refresh fails (directory unreachable), try again after at most
# this long, however long the refresh interval: the outage is usually short
# and, at start, nobody has group items until a load succeeds.
RETRY_SECONDS = 10.0
# Never hammer the directory, whatever the configuration says.
MIN_REFRESH_SECONDS = 0.5

_GETS_OUR_PRESENCE = frozenset({"from", "both"})
_SENDS_US_PRESENCE = frozenset({"to", "both"})


def setup(module: Module) -> None:
    specs = list(module.config.rosters.groups)
    if not specs:
        return  # groups configured later (by a reload) take a restart
    rosters = rosters_of(module)
    interval = max(MIN_REFRESH_SECONDS, module.config.rosters.refresh_seconds)
    # Refreshes at start, within the directory feed's interval of a change
    # to a group, and every `interval` as a safety net.
    follower = follow_groups(module, specs, lambda: refresh(module, rosters, follower.specs),
                             interval)

    async def reloaded(config: Config) -> None:
        """A reload may change the groups and the interval: the next
        refresh (run at once) uses them."""
        groups = list(config.rosters.groups)
        if groups != follower.specs or config.rosters.refresh_seconds != follower.interval:
            follower.specs = groups
            follower.interval = max(MIN_REFRESH_SECONDS, config.rosters.refresh_seconds)
            follower.changed()

    module.hook("config/reloaded", reloaded)


async def refresh(module: Module, rosters: RosterCache,
                  specs: Sequence[RosterGroupConfig]) -> bool:
    """Resolve the groups once and tell online users what changed. False
    when the directory could not answer (the last groups stay)."""
    started = time.monotonic()
    first = not rosters.groups
    try:
        groups = await module.directory.roster_groups(specs)
    except DirectoryError as exc:
        log.warning("directory groups not refreshed (keeping the last ones): %s", exc)
        return False
    loaded = time.monotonic()
    # From here to the last push nothing awaits: rosters change and their
    # pushes are queued in one step, ahead of any later roster write.
    changes = rosters.set_groups(groups)
    for change in changes:
        _push(module, rosters, change)
    index = rosters.groups
    level = logging.INFO if (first or changes) else logging.DEBUG
    log.log(level, "directory groups loaded: %d groups, %d members in %.3f s; "
            "%d roster changes for online users in %.3f s",
            len(index.groups), index.member_count(), loaded - started,
            len(changes), time.monotonic() - loaded)
    await _presence(module, changes)
    return True


def _push(module: Module, rosters: RosterCache, change: SharedChange) -> None:
    roster = rosters.cached(change.user)
    if roster is None:
        return
    if change.after is None:
        push(module, roster, RosterItem(change.contact), remove=True, version=change.version)
    else:
        push(module, roster, change.after, version=change.version)


async def _presence(module: Module, changes: Sequence[SharedChange]) -> None:
    """Presence for subscriptions the groups gave or took: both users'
    changes usually describe one pair, so each (sender, receiver) is sent
    once."""
    available: dict[tuple[str, str], None] = {}
    unavailable: dict[tuple[str, str], None] = {}
    for change in changes:
        before = change.before.subscription if change.before else "none"
        after = change.after.subscription if change.after else "none"
        user, contact = change.user, change.contact
        for states, sender, receiver in ((_GETS_OUR_PRESENCE, user, contact),
                                         (_SENDS_US_PRESENCE, contact, user)):
            if after in states and before not in states:
                available[(sender, receiver)] = None
            elif before in states and after not in states:
                unavailable[(sender, receiver)] = None
    for sender, receiver in available:
        await presence.send_presence_to(module, parse_jid(sender), parse_jid(receiver))
    for sender, receiver in unavailable:
        await presence.send_unavailable_to(module, parse_jid(sender), parse_jid(receiver))
