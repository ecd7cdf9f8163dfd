"""Stanza delivery for the local domains (RFC 6120 §10, RFC 6121 §8).

Every stanza goes through `route`: modules get the named events of
`mlink.hooks` first, and what no module consumes gets the RFC's default
treatment here. Destinations are resolved by JID through the session
table; modules see `SessionInfo` records and deliver through `deliver`,
never through connection objects, so sessions can later live in other
shard processes.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from mlink.hooks import Hooks, StanzaEvent, iq_child_namespace
from mlink.jid import JID, InvalidJID, parse_jid
from mlink.router.sessions import Connection, SessionInfo, SessionTable
from mlink.stream.errors import stanza_error

if TYPE_CHECKING:
    from mlink.shard.cluster import Cluster

log = logging.getLogger(__name__)

# RFC 6121 §4.1/§4.7.2.3: valid presence types; anything else is bad-request.
PRESENCE_TYPES = frozenset(
    {None, "unavailable", "subscribe", "subscribed", "unsubscribe", "unsubscribed", "probe",
     "error"}
)
MESSAGE_TYPES = frozenset({"normal", "chat", "groupchat", "headline", "error"})


@dataclass(frozen=True, slots=True)
class HostedDomain:
    """A subdomain a module serves (`Module.add_host`), such as a multi-user
    chat service on `conference.<domain>`: stanzas to it or to JIDs under it
    fire `hosted/<service>`; `parent` is the local domain whose disco#items
    lists it."""

    parent: str
    service: str


class Router:
    def __init__(self, domains: frozenset[str], sessions: SessionTable, hooks: Hooks,
                 account_exists: Callable[[JID], Awaitable[bool]] | None = None) -> None:
        self.domains = domains
        self.sessions = sessions
        self.hooks = hooks
        self._account_exists = account_exists
        # Subdomains served by modules (`Module.add_host`), by domain.
        self.hosted: dict[str, HostedDomain] = {}
        # Other shards' sessions (set by a shard worker; None in one process).
        self.cluster: Cluster | None = None
        # Nesting of batches per routing task: cross-shard work is flushed
        # when the task's outermost batch ends. Per task, so one handler
        # awaiting the directory never holds back another task's stanzas.
        self._depth: dict[object, int] = {}
        # The serial number of each task's outermost batch, while it runs:
        # connections write one stanza per batch to their socket at once
        # and leave the rest to their writer (`current_batch`).
        self._batch_serial: dict[object, int] = {}
        self._serials = 0

    async def account_exists(self, bare: JID) -> bool:
        """Whether `bare` is an account here; online users exist for sure."""
        if self.sessions.online(bare) or (self.cluster is not None and self.cluster.online(bare)):
            return True
        if self._account_exists is None:
            return False
        return await self._account_exists(bare)

    # -- what modules may ask and do ------------------------------------------------

    def online(self, bare: JID) -> bool:
        """Whether `bare` has a bound session on any shard."""
        return self.sessions.online(bare) or (
            self.cluster is not None and self.cluster.online(bare))

    def resources(self, bare: JID) -> list[SessionInfo]:
        """The bound sessions of a user (available or not), on any shard."""
        local = [conn.info for conn in self.sessions.of_user(bare)]
        if self.cluster is None:
            return local
        return local + self.cluster.resources(bare)

    def resource_count(self, bare: JID) -> int:
        """How many bound sessions the user has, on any shard: the cheap
        question before `resources` (a module with nothing to do for a user
        with one session asks it on every stanza)."""
        count = self.sessions.count_of_user(bare)
        if self.cluster is not None:
            count += self.cluster.count_of_user(bare)
        return count

    def local_resources(self, bare: JID) -> list[SessionInfo]:
        """The bound sessions of a user on this shard only: what this shard
        decides about (see `deliver_local_available`)."""
        return [conn.info for conn in self.sessions.of_user(bare)]

    def deliver_local_available(self, bare: JID, stanza: ET.Element) -> int:
        """Queue `stanza` for the available sessions of `bare` on this shard;
        how many got it."""
        count = 0
        for conn in self.sessions.of_user(bare):
            if conn.info.available:
                conn.deliver(stanza)
                count += 1
        return count

    def deliver_to_available(self, bare: JID, stanza: ET.Element) -> None:
        """Queue `stanza` for every available session of `bare` on any
        shard; each shard decides for its own sessions when the stanza
        reaches it, so no interleaving with a login elsewhere loses it."""
        self.deliver_local_available(bare, stanza)
        if self.cluster is not None:
            self.cluster.deliver_to_available(bare, stanza)

    def session(self, full: JID) -> SessionInfo | None:
        conn = self.sessions.get(full)
        if conn is not None:
            return conn.info
        return self.cluster.session(full) if self.cluster is not None else None

    def deliver(self, full: JID, stanza: ET.Element) -> bool:
        """Queue `stanza` for one session, here or on another shard; False
        if it is not bound anywhere."""
        conn = self.sessions.get(full)
        if conn is not None and conn.deliver(stanza):
            return True
        return self.cluster is not None and self.cluster.deliver(full, stanza)

    def expect_session(self, full: JID) -> None:
        """The session `full` is about to be bound here: what is sent to
        it meanwhile is kept (`session_arrived`), not taken for gone."""
        if self.cluster is not None:
            self.cluster.expect(full)

    def session_arrived(self, full: JID) -> list[ET.Element]:
        """What was kept for `full` since `expect_session`, in order."""
        return self.cluster.arrived(full) if self.cluster is not None else []

    def deliver_tracked(self, full: JID, stanza: ET.Element) -> WriteReceipt | None:
        """Queue `stanza` for a session on this shard, to learn when it has
        really been written (a stanza held in the store until then, such as
        an offline message); None when no such session is here."""
        conn = self.sessions.get(full)
        if conn is None:
            return None
        mark = conn.deliver_tracked(stanza)
        return None if mark is None else WriteReceipt(conn, mark)

    def end_session(self, full: JID, condition: str, text: str = "") -> bool:
        """End a session on this shard with a stream error; False when it
        is not here."""
        conn = self.sessions.get(full)
        if conn is None:
            return False
        conn.kick(condition, text)
        return True

    def is_local(self, jid: JID) -> bool:
        return jid.domain in self.domains

    def hosted_under(self, parent: str) -> list[str]:
        """The module-served subdomains listed under local domain `parent`."""
        return sorted(d for d, h in self.hosted.items() if h.parent == parent)

    async def bounce(self, stanza: ET.Element, condition: str, text: str = "",
                     error_type: str | None = None) -> None:
        """Answer `stanza` with a stanza error (RFC 6120 §8.3): never an
        error to an error, and never for iq results."""
        if stanza.get("type") in ("error", "result"):
            return
        error = stanza_error(stanza, condition, text, error_type)
        try:
            sender = parse_jid(stanza.get("from", ""))
        except InvalidJID:
            return
        # The usual case: tell a local client at once (its stanza's `to` may
        # be the malformed JID being complained about).
        if not self.deliver(sender, error):
            await self.route(error)

    # -- entry points -----------------------------------------------------------

    def batch(self) -> Batch:
        """Group what routing queues for other shards until the outermost
        batch ends: a presence broadcast then costs one frame per shard.
        (A small class rather than a generator-based context manager:
        every stanza enters one.)"""
        return Batch(self)

    def current_batch(self) -> int:
        """The serial number of the running task's outermost batch (0
        outside one). A connection writes the first stanza of a batch to
        its socket at once and queues the others for its writer, which
        sends them together when the task yields: a user who logs in gets
        each online contact's presence in one routing pass, one write
        instead of one each."""
        serials = self._batch_serial
        if not serials:
            return 0
        try:
            task: object = trio.lowlevel.current_task()
        except RuntimeError:
            return 0
        return serials.get(task, 0)

    async def route_from_client(self, origin: SessionInfo, stanza: ET.Element) -> None:
        """A stanza from a bound local client, its `from` already stamped."""
        with self.batch():
            try:
                await self._from_client(origin, stanza)
            except Exception:
                # A module's bug costs this stanza, not the stream or the
                # shard: the sender hears internal-server-error (RFC 6120
                # §8.3.3.5), the log has the traceback once.
                log.exception("handling %s (%s) from %s failed", _kind(stanza),
                              iq_child_namespace(stanza) or "-", origin.jid)
                await self._internal_error(stanza)
            # What other shards know of this session (presence, priority,
            # interest, module fields) may have changed.
            if self.cluster is not None and self.sessions.get(origin.jid) is not None:
                self.cluster.announce(origin)

    async def _internal_error(self, stanza: ET.Element) -> None:
        try:
            await self.bounce(stanza, "internal-server-error")
        except Exception:
            log.exception("could not bounce a stanza after an internal error")

    async def _from_client(self, origin: SessionInfo, stanza: ET.Element) -> None:
        to_text = stanza.get("to")
        kind = stanza.tag.rpartition("}")[2]
        try:
            to = parse_jid(to_text) if to_text else origin.jid.bare
        except InvalidJID:
            await self.bounce(stanza, "jid-malformed")
            return
        if kind == "iq":
            if not stanza.get("id"):
                # RFC 6120 §8.1.3: an iq without an id cannot be answered.
                await self.bounce(stanza, "bad-request", "an iq needs an id")
                return
            if stanza.get("type") not in ("get", "set", "result", "error"):
                await self.bounce(stanza, "bad-request", "unknown iq type")
                return
        elif kind == "presence" and stanza.get("type") not in PRESENCE_TYPES:
            # RFC 6121 §4.7.1: an unknown presence type is bad-request.
            await self.bounce(stanza, "bad-request", "unknown presence type")
            return
        elif kind == "message" and stanza.get("type", "normal") not in MESSAGE_TYPES:
            stanza.set("type", "normal")  # RFC 6121 §5.2.2: treat as normal
        event = StanzaEvent(stanza, origin.jid, to, origin)
        if await self.hooks.fire(f"pre-{kind}/{_scope(to)}", event):
            return
        await self._route(event, kind)

    async def route(self, stanza: ET.Element, rerouted: bool = False) -> None:
        """A stanza the server or a module sends. Without `from` it comes
        from the server of its `to` (as replies to iqs sent without `to`).
        `rerouted`: see `reroute`."""
        to_text, from_text = stanza.get("to"), stanza.get("from")
        try:
            if from_text:
                sender = parse_jid(from_text)
                to = parse_jid(to_text) if to_text else sender.bare
            else:
                to = parse_jid(to_text or "")
                sender = JID("", to.domain, "")
        except InvalidJID:
            log.warning("dropping server stanza with bad addresses: %s", stanza.attrib)
            return
        with self.batch():
            await self._route(StanzaEvent(stanza, sender, to, rerouted=rerouted),
                              stanza.tag.rpartition("}")[2])

    async def reroute(self, stanza: ET.Element) -> None:
        """Route again a stanza that was routed once already and never
        reached its session (it ended first, or moved): modules that act
        once per stanza (the archive, carbons) see `event.rerouted` and
        skip it; resource selection, offline storage and bounces apply."""
        await self.route(stanza, rerouted=True)

    # -- delivery rules ------------------------------------------------------------

    async def _route(self, event: StanzaEvent, kind: str) -> None:
        to = event.to
        if to.domain not in self.domains:
            hosted = self.hosted.get(to.domain)
            if hosted is not None:
                await self._hosted(event, kind, hosted)
                return
            # No server-to-server yet: every remote domain is unreachable.
            await self.bounce(event.stanza, "remote-server-not-found")
            return
        scope = _scope(to)
        if await self.hooks.fire(f"{kind}/{scope}", event):
            return
        if kind == "message":
            await self._message(event, scope)
        elif kind == "iq":
            await self._iq(event, scope)
        elif kind == "presence":
            self._presence(event, scope)

    async def _hosted(self, event: StanzaEvent, kind: str, hosted: HostedDomain) -> None:
        """A stanza for a module's subdomain: the module's, whatever its
        kind; what it leaves is refused as for a JID that offers nothing
        (an iq get/set or a message is answered service-unavailable)."""
        if await self.hooks.fire(f"hosted/{hosted.service}", event):
            return
        if kind != "presence" and (kind != "iq" or event.stanza.get("type") in ("get", "set")):
            await self.bounce(event.stanza, "service-unavailable")

    async def _iq(self, event: StanzaEvent, scope: str) -> None:
        iq = event.stanza
        if scope == "full":
            if not self.deliver(event.to, iq):
                await self.bounce(iq, "service-unavailable")
            return
        if iq.get("type") not in ("get", "set"):
            return  # results and errors for the server or an account end here
        if len(iq) != 1:
            # RFC 6120 §8.2.3: a get or set carries exactly one payload.
            await self.bounce(iq, "bad-request", "an iq needs one child element")
            return
        if scope == "bare":
            if event.to == event.sender.bare:
                scope = "self"
            elif not await self.account_exists(event.to):
                # RFC 6121 §8.5.1: no such account, whatever the payload.
                await self.bounce(iq, "service-unavailable")
                return
        name = f"iq-{iq.get('type')}/{scope}/{iq_child_namespace(iq)}"
        if not await self.hooks.fire(name, event):
            await self.bounce(iq, "service-unavailable")

    async def _message(self, event: StanzaEvent, scope: str) -> None:
        message, to = event.stanza, event.to
        if scope == "host":
            return  # messages to the server itself are dropped, as Prosody does
        msg_type = message.get("type", "normal")
        if scope == "full":
            if self.deliver(to, message):
                await self._delivered(event, (to,))
                return
            if msg_type in ("groupchat", "error"):
                # RFC 6121 §8.5.3.2.1: no such resource.
                await self.bounce(message, "service-unavailable")
                return
        await self._message_to_bare(event, msg_type)

    async def _message_to_bare(self, event: StanzaEvent, msg_type: str) -> None:
        """RFC 6121 §8.5.2: the bare JID's available resources, by priority."""
        message = event.stanza
        if msg_type == "error":
            return  # §8.5.2.1.1: errors to a bare JID are silently ignored
        if msg_type == "groupchat":
            await self.bounce(message, "service-unavailable")
            return
        available = [i for i in self.resources(event.to.bare) if i.available and i.priority >= 0]
        if available:
            if msg_type == "headline":
                targets = available
            else:
                top = max(i.priority for i in available)
                targets = [i for i in available if i.priority == top]
            # A session may refuse (it is ending and nothing keeps its
            # output): the message goes on as if it were not there.
            accepted = tuple(info.jid for info in targets if self.deliver(info.jid, message))
            if accepted:
                await self._delivered(event, accepted)
                return
        if msg_type == "headline":
            return  # §8.5.2.2: headlines are not stored or bounced
        if not await self.hooks.fire("message/offline", event):
            await self.bounce(message, "service-unavailable")

    async def _delivered(self, event: StanzaEvent, targets: tuple[JID, ...]) -> None:
        if self.hooks.has("message/delivered"):
            event.delivered_to = targets
            await self.hooks.notify("message/delivered", event)

    def _presence(self, event: StanzaEvent, scope: str) -> None:
        """What the presence module leaves: directed presence to sessions."""
        if scope == "full":
            self.deliver(event.to, event.stanza)
        elif scope == "bare":
            self.deliver_to_available(event.to, event.stanza)


class Batch:
    """`Router.batch`'s context manager: nesting counted per Trio task."""

    __slots__ = ("_router", "_task", "_depth")

    def __init__(self, router: Router) -> None:
        self._router = router

    def __enter__(self) -> None:
        try:
            task: object = trio.lowlevel.current_task()
        except RuntimeError:
            task = None  # outside Trio (unit tests of the router)
        depths = self._router._depth
        depth = depths.get(task, 0)
        depths[task] = depth + 1
        self._task, self._depth = task, depth
        if not depth:
            router = self._router
            router._serials += 1
            router._batch_serial[task] = router._serials

    def __exit__(self, *exc: object) -> None:
        router = self._router
        if self._depth:
            router._depth[self._task] = self._depth
        else:
            del router._depth[self._task]
            del router._batch_serial[self._task]
            if router.cluster is not None:
                router.cluster.flush()


class WriteReceipt:
    """When a tracked stanza left for its session (`Router.deliver_tracked`)."""

    __slots__ = ("_conn", "_mark")

    def __init__(self, conn: Connection, mark: int) -> None:
        self._conn = conn
        self._mark = mark

    async def written(self) -> bool:
        """Until written (True) or the session ended first (False)."""
        return await self._conn.written(self._mark)

    @property
    def done(self) -> bool:
        """Written already."""
        return self._conn.is_written(self._mark)


def _kind(stanza: ET.Element) -> str:
    return stanza.tag.rpartition("}")[2]


def _scope(to: JID) -> str:
    if not to.local:
        return "host"
    return "full" if to.resource else "bare"
