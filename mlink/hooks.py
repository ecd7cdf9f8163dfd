"""Named events that modules hook, as Prosody's modules do.

The core fires events and knows no XEP; a module registers handlers on the
names it cares about and declares the disco features it adds.

Stanza events (handlers get a `StanzaEvent`, return True to consume it):
- `pre-<kind>/<bare|full|host>`: a stanza from a local client, before it is
  routed (outbound filters: blocking, carbons' sent copies, presence).
- `<kind>/<bare|full|host>`: a stanza being delivered to the local domain
  (inbound filters and handlers: subscriptions, probes, blocking).
- `iq-<type>/<host|self|bare>/<namespace>`: an iq the server answers: to
  the domain, to the sender's own account, or to another account.
- `hosted/<service>`: any stanza to a subdomain module `<service>` serves
  (`Module.add_host`, e.g. `conference.<domain>`) or to a JID under it;
  unconsumed, an iq get/set or message is answered service-unavailable.
- `message/offline`: a message for a user with no available resource.
- `message/delivered`: a message was delivered to these local resources.

Session events (handlers get a `SessionInfo`, return value ignored):
- `session/bound`, `session/closed`, `session/initial-presence`.

Server events (return value ignored): `server/stopping` (payload None)
before the streams end at shutdown, for modules that tell users (a chat
room's status 332); `server/stopped` (the server) once every session has
ended at shutdown, while the store is still open: a module writes out what
it buffered (the archive's queued writes).

Cluster events (payload: the peer shard's number): `cluster/peer-up` when
the bus to another shard is (again) up, `cluster/peer-down` when that shard
is gone; for tables of objects homed on shards (external components).

Account events (payload: the bare JID string, return value ignored):
`account/removed` on every shard when the directory's change feed shows a
user entry deleted (`mlink.modules.accounts`; feeds that see deletions
only: the embedded directory), and when mlink itself deleted the account
(`mlink user delete`, the console: `Server.account_removed` through the
supervisor's control socket, whatever the backend). A handler removing shared state (files)
acts on one shard (`Module.owner`) and tolerates the event twice.

Stream events: `nonza/<namespace>` (a `NonzaEvent`) for top-level elements
of a namespace a module registered (`Module.add_nonza_handler`).

Profile events: `profile/photo-changed` (the user's bare JID string) when
mlink wrote a new photo, so presence can carry the new avatar hash.

Handlers of one name run in priority order (higher first), and the first
that returns True ends the event; the core's own default, where it has one,
runs only when no handler consumed the event.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlink.jid import JID

if TYPE_CHECKING:
    from mlink.router.sessions import SessionInfo, StreamControl

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StanzaEvent:
    stanza: ET.Element
    sender: JID  # the stamped `from`
    to: JID  # the `to`, or the sender's bare JID when absent (RFC 6120 §10.3)
    origin: SessionInfo | None = None  # the local session it came from, if any
    delivered_to: tuple[JID, ...] = ()  # for message/delivered
    # Routed again by the server (`Router.reroute`): a stanza already routed
    # once (archived, carbon-copied) whose session ended before its client
    # confirmed it; only where it goes now is decided again.
    rerouted: bool = False

    @property
    def kind(self) -> str:
        return self.stanza.tag.rpartition("}")[2]

    @property
    def type(self) -> str | None:
        return self.stanza.get("type")


@dataclass(slots=True)
class NonzaEvent:
    """A top-level non-stanza element of a module's namespace, from an
    authenticated stream (event `nonza/<namespace>`): `session` is the
    bound session (a blank JID before a bind), `stream` what the handler
    may do with the stream itself (answer, count stanzas, resume)."""

    session: SessionInfo
    element: ET.Element
    stream: StreamControl | None = None


Handler = Callable[[Any], Awaitable[bool | None]]


class Hooks:
    def __init__(self) -> None:
        self._handlers: dict[str, list[tuple[int, Handler]]] = {}
        self.features: set[str] = set()
        # What accounts show in disco#info besides account/registered and
        # the namespaces answered for them (e.g. PEP: pubsub/pep).
        self.account_identities: list[tuple[str, str, str]] = []
        self.account_features: set[str] = set()

    def on(self, name: str, handler: Handler, priority: int = 0) -> None:
        handlers = self._handlers.setdefault(name, [])
        handlers.append((priority, handler))
        handlers.sort(key=lambda item: -item[0])

    def add_feature(self, var: str) -> None:
        """A disco#info feature the server advertises (XEP-0030)."""
        self.features.add(var)

    def has(self, name: str) -> bool:
        return name in self._handlers

    async def fire(self, name: str, event: object) -> bool:
        """Run the handlers of `name`; True when one consumed the event."""
        handlers = self._handlers.get(name)
        if not handlers:
            return False
        for _, handler in handlers:
            if await handler(event):
                return True
        return False

    async def notify(self, name: str, event: object) -> None:
        """Run every handler of `name` (for events nobody consumes). A
        handler's crash is logged once and the others still run: one
        module's bug must not cost another module its event."""
        for _, handler in self._handlers.get(name, ()):
            try:
                await handler(event)
            except Exception:
                log.exception("handler %s of event %s failed",
                              getattr(handler, "__qualname__", handler), name)


def iq_child_namespace(iq: ET.Element) -> str:
    """The namespace of an iq's payload, which names its iq-* event."""
    if len(iq) != 1:
        return ""
    tag = iq[0].tag
    return tag[1:].partition("}")[0] if tag[:1] == "{" else ""
