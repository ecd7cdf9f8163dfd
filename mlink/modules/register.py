"""XEP-0077 in-band password change (not registration of new accounts).

Clients change the password of the account they are logged in to with
`<query xmlns='jabber:iq:register'><username/><password/></query>` sent to
the server (Profanity's /changepassword, Gajim, Conversations). The change
goes to the directory, the one place passwords live: its quality and
history rules decide (a refusal comes back as `not-acceptable` with the
directory's own reason), and the SCRAM secrets are rewritten in the same
step so every mechanism works with the new password at once.

New accounts are not registered in band: accounts come from the directory
(an administrator, `mlink user add`), so a `get` answers only for a
logged-in user (`<registered/>` and the user name), and cancelling the
registration (`<remove/>`) is `not-allowed`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from mlink.directory.base import DirectoryError, DirectoryRefused, DirectoryUnavailable
from mlink.hooks import StanzaEvent
from mlink.modules.util import iq_result

if TYPE_CHECKING:
    from mlink.module import Module

REGISTER_NS = "jabber:iq:register"
# A password longer than this is a mistake or an attack on the hashing,
# not a password (the directory's own limits are usually far lower).
MAX_PASSWORD_CHARS = 1024


def setup(module: Module) -> None:
    router = module.router

    async def info(event: StanzaEvent) -> bool:
        """XEP-0077 §3.2.1: an account that exists answers `registered`."""
        query = ET.Element(f"{{{REGISTER_NS}}}query")
        ET.SubElement(query, f"{{{REGISTER_NS}}}registered")
        ET.SubElement(query, f"{{{REGISTER_NS}}}username").text = event.sender.local
        ET.SubElement(query, f"{{{REGISTER_NS}}}password")
        await router.route(iq_result(event.stanza, query))
        return True

    async def change(event: StanzaEvent) -> bool:
        query = event.stanza[0]
        if event.origin is None:
            await router.bounce(event.stanza, "not-allowed")
            return True
        if query.find(f"{{{REGISTER_NS}}}remove") is not None:
            await router.bounce(event.stanza, "not-allowed",
                                "accounts are managed in the directory")
            return True
        username = (query.findtext(f"{{{REGISTER_NS}}}username") or "").strip()
        password = query.findtext(f"{{{REGISTER_NS}}}password")
        if not password or len(password) > MAX_PASSWORD_CHARS:
            await router.bounce(event.stanza, "bad-request", "a new password is needed")
            return True
        if username and username.lower() != event.sender.local.lower():
            # §3.3: only the logged-in account's own password.
            await router.bounce(event.stanza, "not-authorized", "not your account")
            return True
        jid = str(event.sender.bare)
        try:
            await module.directory.change_own_password(jid, password)
        except DirectoryRefused as exc:
            await router.bounce(event.stanza, "not-acceptable", str(exc))
            return True
        except DirectoryUnavailable:
            await router.bounce(event.stanza, "service-unavailable",
                                "the directory cannot be reached; try again later",
                                error_type="wait")
            return True
        except DirectoryError as exc:
            await router.bounce(event.stanza, "not-acceptable", str(exc))
            return True
        module.log.info("%s changed their password", jid)
        await router.route(iq_result(event.stanza))
        return True

    module.add_feature(REGISTER_NS)
    for scope in ("host", "self"):
        module.hook(f"iq-get/{scope}/{REGISTER_NS}", info)
        module.hook(f"iq-set/{scope}/{REGISTER_NS}", change)
