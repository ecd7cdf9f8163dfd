"""The directory's change feed, brought to online users.

One `DirectoryWatch` per server process reads `Directory.changes()` (a
poll on `modifyTimestamp` for LDAP, file writes for the embedded directory;
`mlink.directory.port`) in one background task and hands every batch to
its subscribers, so the directory is polled once however many features
follow it. It is created by the first subscriber and runs in the server's
nursery (`Module.spawn`); a failing subscriber is logged and the
others still get the batch.

Two subscribers today:

- static rosters (`follow_static_rosters`, subscribed by
  `mlink.router.rosters.rosters_of` when `<rosters static-attribute>` is
  set): when an online user's entry changes, their personal roster is read
  again and each item that changed is pushed to their interested sessions
  (RFC 6121 §2.1.6), so an item added or removed with `ldapmodify` shows
  without a new login;
- directory groups (`follow_groups`, called by the shared-groups module):
  a change that may touch a configured group runs the module's refresh at
  once (pushes and presence, as the periodic refresh does), and the
  refresh still runs every `refresh-seconds` as a safety net (LDAP polls
  cannot see a deleted entry).

Changes of kind `delete`, and modifications of user entries (an account
disabled), are on the feed for whoever needs them next (ending the
sessions of removed users).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import trio

from mlink.directory.base import DirectoryError
from mlink.router.roster_push import push_item
from mlink.store import RosterItem, StoreError

if TYPE_CHECKING:
    from mlink.config_model import RosterGroupConfig
    from mlink.directory.base import Directory
    from mlink.directory.port import Change
    from mlink.module import Module
    from mlink.router.rosters import RosterCache, SharedChange

log = logging.getLogger(__name__)

# When a group refresh fails (directory unreachable), try again after at
# most this long, however long the refresh interval: the outage is usually
# short and, at start, nobody has group items until a load succeeds.
GROUP_RETRY_SECONDS = 10.0
# Never refresh groups more often than this, however busy the feed: a
# refresh reads every user and every group.
MIN_GROUP_REFRESH_SECONDS = 0.5
# After a failed feed (a bug, not an outage: outages are retried inside
# the feed), wait this long before reading it again.
FEED_RESTART_SECONDS = 5.0

ChangeHandler = Callable[[Sequence["Change"]], Awaitable[None]]


class DirectoryWatch:
    """Reads the change feed once and fans each batch out to subscribers."""

    def __init__(self, directory: Callable[[], Directory]) -> None:
        # A getter: tests and the server may swap the directory after start.
        self._directory = directory
        self._handlers: list[ChangeHandler] = []
        # Set once the feed has its baseline: every change after this
        # moment reaches the subscribers.
        self.ready = trio.Event()

    def subscribe(self, handler: ChangeHandler) -> None:
        """`handler(batch)` is awaited for every batch, in feed order."""
        self._handlers.append(handler)

    async def run(self) -> None:
        """Follow the feed until cancelled (the server's nursery ends)."""
        while True:
            try:
                async for batch in self._directory().changes():
                    if not batch:
                        self.ready.set()
                        continue
                    log.debug("directory changes: %s",
                              ", ".join(f"{c.kind} {c.dn}" for c in batch))
                    for handler in self._handlers:
                        try:
                            await handler(batch)
                        except Exception:
                            log.exception("a directory change subscriber failed")
            except Exception:
                log.exception("the directory change feed failed; restarting it")
            await trio.sleep(FEED_RESTART_SECONDS)


def watch_of(module: Module) -> DirectoryWatch:
    """The server's watch, created (and its task started) on first use."""

    def create() -> DirectoryWatch:
        watch = DirectoryWatch(lambda: module.directory)
        module.spawn(watch.run)
        return watch

    return module.shared("directory/watch", create)


# -- static rosters ---------------------------------------------------------------------


def push_changes(module: Module, changes: Sequence[SharedChange]) -> None:
    """A push per changed item; an item gone is pushed as `remove`."""
    for change in changes:
        if change.after is None:
            push_item(module.router, change.user, RosterItem(change.contact), True,
                      change.version)
        else:
            push_item(module.router, change.user, change.after, False, change.version)


def follow_static_rosters(module: Module, rosters: RosterCache) -> None:
    """Push static roster items changed in the directory to online users."""

    async def on_changes(batch: Sequence[Change]) -> None:
        users = {c.user for c in batch if c.user is not None and c.kind != "delete"}
        for user in sorted(users):
            if rosters.cached(user) is None:
                continue  # offline here: read fresh at the next login
            try:
                changes = await rosters.reload_personal(user)
            except StoreError as exc:
                log.warning("static roster of %s not re-read after a directory change: %s",
                            user, exc)
                continue
            if changes:
                log.info("static roster of %s changed in the directory: %d items pushed",
                         user, len(changes))
            push_changes(module, changes)

    watch_of(module).subscribe(on_changes)


# -- directory groups ---------------------------------------------------------------------


class GroupFollower:
    """Runs a group refresh at start, whenever the feed reports a change
    that may touch a configured group, and every `interval` anyway."""

    def __init__(self, directory: Callable[[], Directory], specs: Sequence[RosterGroupConfig],
                 refresh: Callable[[], Awaitable[bool]], interval: float) -> None:
        self._directory = directory
        self.specs = list(specs)
        self._refresh = refresh
        self.interval = max(MIN_GROUP_REFRESH_SECONDS, interval)
        self._dirty = trio.Event()

    def changed(self) -> None:
        """Refresh soon (the configuration changed)."""
        self._dirty.set()

    async def on_changes(self, batch: Sequence[Change]) -> None:
        directory = self._directory()
        if any(directory.touches_groups(change, self.specs) for change in batch):
            self._dirty.set()

    async def run(self) -> None:
        while True:
            self._dirty = trio.Event()  # changes from here on need another refresh
            try:
                ok = await self._refresh()
            except DirectoryError as exc:
                log.warning("directory groups not refreshed: %s", exc)
                ok = False
            except Exception:
                log.exception("refreshing directory groups failed")
                ok = False
            with trio.move_on_after(self.interval if ok
                                    else min(self.interval, GROUP_RETRY_SECONDS)):
                await self._dirty.wait()
            # A burst of changes (a script editing many groups) is one refresh.
            await trio.sleep(MIN_GROUP_REFRESH_SECONDS)


def follow_groups(module: Module, specs: Sequence[RosterGroupConfig],
                  refresh: Callable[[], Awaitable[bool]], interval: float) -> GroupFollower:
    """Run `refresh` (resolve the groups, push and send presence to online
    users; False when the directory could not answer) at start, within the
    feed's interval of a change to a group, and every `interval` seconds.
    Replaces a task that only slept `interval` between refreshes."""
    follower = GroupFollower(lambda: module.directory, specs, refresh, interval)
    watch_of(module).subscribe(follower.on_changes)
    module.spawn(follower.run)
    return follower
