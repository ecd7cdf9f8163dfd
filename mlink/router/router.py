"""Deliver stanzas between local sessions (RFC 6120 §10, RFC 6121 §8).

This is the core's routing; presence broadcast, rosters and offline storage
are modules that hook in (see the IM issue). Destinations are resolved
through the `SessionTable`, never by handing sessions to modules.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from mlink.hooks import Hooks
from mlink.jid import JID, InvalidJID, parse_jid
from mlink.router.sessions import SessionTable
from mlink.stream.errors import stanza_error


class Router:
    def __init__(self, domains: frozenset[str], sessions: SessionTable, hooks: Hooks) -> None:
        self.domains = domains
        self.sessions = sessions
        self.hooks = hooks

    def route(self, stanza: ET.Element) -> None:
        """Route a stanza whose `from` the stream has already stamped."""
        kind = stanza.tag.rpartition("}")[2]
        sender = parse_jid(stanza.get("from", ""))
        to_text = stanza.get("to")
        try:
            to = parse_jid(to_text) if to_text else sender.bare
        except InvalidJID:
            self._bounce(stanza, "jid-malformed")
            return
        if to.domain not in self.domains:
            # No server-to-server yet: every remote domain is unreachable.
            self._bounce(stanza, "remote-server-not-found")
            return
        if kind == "iq":
            self._route_iq(stanza, to)
        elif kind == "message":
            self._route_message(stanza, to)
        # Presence routing belongs to the presence module (IM issue).

    def _route_iq(self, iq: ET.Element, to: JID) -> None:
        iq_type = iq.get("type")
        if to.resource:
            session = self.sessions.get(to)
            if session is not None:
                session.deliver(iq)
            else:
                self._bounce(iq, "service-unavailable")
            return
        if iq_type not in ("get", "set"):
            return  # results and errors for the server end here
        if len(iq) != 1:
            # RFC 6120 §8.2.3: a get or set carries exactly one payload.
            self._reply(iq, stanza_error(iq, "bad-request", "an iq needs one child element"))
            return
        sender = parse_jid(iq.get("from", ""))
        scope = "host" if not to.local else "self" if to == sender.bare else "bare"
        reply = self.hooks.fire_iq(iq, scope)
        self._reply(iq, reply if reply is not None else stanza_error(iq, "service-unavailable"))

    def _route_message(self, message: ET.Element, to: JID) -> None:
        if not to.local:
            return  # messages to the server itself are dropped, as Prosody does
        session = self.sessions.get(to) if to.resource else None
        if session is not None:
            session.deliver(message)
            return
        msg_type = message.get("type", "normal")
        if to.resource and msg_type == "groupchat":
            # RFC 6121 §8.5.3.2.1: groupchat to a resource that is not there.
            self._bounce(message, "service-unavailable")
            return
        targets = self.sessions.of_user(to.bare)
        if not targets:
            # RFC 6121 §8.5.2.2: headlines to an unavailable user are dropped.
            if msg_type != "headline":
                self._bounce(message, "service-unavailable")
            return
        for target in targets:
            target.deliver(message)

    def _bounce(self, stanza: ET.Element, condition: str) -> None:
        # RFC 6120 §8.3.1: never answer an error with an error.
        if stanza.get("type") == "error":
            return
        self._reply(stanza, stanza_error(stanza, condition))

    def _reply(self, original: ET.Element, reply: ET.Element) -> None:
        try:
            dest = parse_jid(original.get("from", ""))
        except InvalidJID:
            return
        session = self.sessions.get(dest)
        if session is not None:
            session.deliver(reply)
