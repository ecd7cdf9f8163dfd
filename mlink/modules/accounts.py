"""Account lifecycle: a user removed, disabled or locked in the directory
loses their sessions.

The directory is where accounts live, and administrators change them there
(a web console, `ldapmodify`, `mlink user delete`). Every shard follows
the directory's change feed (`mlink.router.directory_watch`); when an entry
of a user with sessions on this shard is deleted, or modified so that the
directory's verdict refuses the account lastingly (disabled, locked by an
administrator — not a timed lockout after failed logins, which an attacker
could otherwise use to disconnect anyone), the sessions end with
`not-authorized` and a text saying why. `mlink user delete` also tells a
running server at once through its control socket (each shard's
`Server.end_user_sessions`), without waiting for the feed.

A deleted user entry also fires `account/removed` (the bare JID string)
on every shard, whether or not the user is online here, so modules drop
what they keep outside the store for the account (the upload module its
files); the store's own per-user data is the store's business. Only
backends whose feed sees deletions fire it here (the embedded directory;
an LDAP feed polls timestamps, which a deleted entry no longer has); an
account deleted through mlink fires it through the control socket too
(`Server.account_removed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mlink.directory.base import DirectoryError
from mlink.jid import JID, InvalidJID, parse_jid
from mlink.router.directory_watch import watch_of

if TYPE_CHECKING:
    from mlink.directory.port import Change
    from mlink.module import Module

REMOVED_TEXT = "your account was removed"
DISABLED_TEXT = "your account was disabled"
# The event a deleted account fires (payload: the bare JID string).
ACCOUNT_REMOVED = "account/removed"


def setup(module: Module) -> None:
    router = module.router

    async def on_changes(batch: Sequence[Change]) -> None:
        for change in batch:
            if change.user is None:
                continue
            try:
                user = parse_jid(change.user).bare
            except InvalidJID:
                continue
            if change.kind == "delete":
                await module.fire(ACCOUNT_REMOVED, str(user))
            if not router.local_resources(user):
                continue  # nobody here to disconnect
            if change.kind == "delete":
                end(user, REMOVED_TEXT)
                continue
            try:
                verdict = await module.directory.account_verdict(str(user))
            except DirectoryError as exc:
                module.log.warning("state of %s unknown after a directory change: %s",
                                   user, exc)
                continue
            if verdict is None:
                end(user, REMOVED_TEXT)
            elif verdict.lasting:
                end(user, f"{DISABLED_TEXT}: {verdict.text}")

    def end(user: JID, text: str) -> None:
        for info in router.local_resources(user):
            router.end_session(info.jid, "not-authorized", text)
        module.log.info("ended the sessions of %s: %s", user, text)

    watch_of(module).subscribe(on_changes)
