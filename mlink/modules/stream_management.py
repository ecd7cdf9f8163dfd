"""XEP-0198 stream management: acknowledgements and stream resumption.

After `<enable/>` on a bound stream both sides count stanzas (h, modulo
2^32). The server keeps every stanza it sent until the client acknowledges
it (`<a h='…'/>`), answers `<r/>` with its own count, and asks for an ack
(`<r/>`) whenever stanzas are unacknowledged and no request is outstanding.

With `<enable resume='true'/>` the session outlives its connection: when
the TCP connection (or WebSocket) drops without a closing tag, the session
stays bound and available (`StreamTap.lost`), stanzas for it are kept, and
a new stream of the same user may continue it with `<resume previd h/>`
within the timeout (the client's `max`, at most the configured
`resume-timeout`). The stanzas the client did not confirm are sent again.
When the timeout passes, or the session ends any other way, the stanzas
never acknowledged are routed again as for a resource that is gone (RFC
6121 §8.5.3.2): messages to another resource or to offline storage, iqs
bounced with `service-unavailable`; nothing is dropped silently.

Resumption ids are 128 random bits (`secrets`), so they cannot be guessed,
and resuming needs the same user's authentication: an id of another user
gets `item-not-found`, as an unknown or expired one does.

Across shards (docs/sharding.md): an id is generated so that its owner
(`Module.owner(id)`) is the shard where the session is, its home. A
`<resume/>` on any shard asks the home; the home takes the session if it
holds it, or forwards the request to the shard it moved to. The holder
migrates the session (its routing state, fields with codecs, counters and
unacknowledged stanzas) to the shard of the new connection, which tells
the home where the session lives now.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import itertools
import json
import math
import secrets
import time
import weakref
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from mlink.config_schema import Int, option
from mlink.hooks import NonzaEvent
from mlink.jid import JID, InvalidJID, parse_jid
from mlink.modules.wakeups import DETACHED, wakeups
from mlink.router.fields import field_registry
from mlink.router.sessions import SessionHold, SessionInfo, StreamControl
from mlink.xml.serialize import serialize

if TYPE_CHECKING:
    from mlink.module import Module

SM_NS = "urn:xmpp:sm:3"
DELAY_NS = "urn:xmpp:delay"
IQ = "{jabber:client}iq"
STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
# Counters wrap at 2^32 (XEP-0198 §4: h is an unsigned 32-bit integer).
MODULUS = 2 ** 32
# The name of the list (`Module.shared`) of barriers an ack waits for: an
# `<a h/>` tells the client its stanzas are handled, so work a module does
# behind delivery for them (the message archive's batched writes) must be
# done by then. A module appends an async callable that returns when its
# work so far is done (or gives up, bounded).
ACK_BARRIERS = "sm/ack-barriers"
# Bytes of randomness in a resumption id: 128 bits cannot be guessed.
RESUME_ID_BYTES = 16
# A longer previd is not one of ours; refused before any lookup.
MAX_RESUME_ID_CHARS = 64
# Ids drawn until one is homed on this shard: each draw has a 1/N chance,
# so this bound is never reached in practice (it only bounds the loop).
ID_DRAWS = 1000
# How long a resumption waits for the shard holding the session to answer
# (one bus round trip, or two when forwarded); past it, item-not-found.
# How long a resumption waits for a still-connected old stream of the
# session to be cut and held (the client reconnected before we noticed).
DROP_TIMEOUT = 5.0
# Longer than the holder may take (DROP_TIMEOUT) plus two bus hops, so an
# answer is rarely late (one that is, is handled by `Manager.orphaned`).
BUS_TIMEOUT = DROP_TIMEOUT + 5.0
# A held session keeps at most this many times the output bound
# (limits output-bytes) of stanzas in bytes: the count (max-unacked) alone
# let one held session keep up to max-unacked stanzas of the largest size.
# Past it the session ends, and what it kept is routed again.
HELD_OUTPUT_FACTOR = 4
# A migrated session travels in one bus frame (4 MiB at most): past this,
# it is not moved; the session ends (its stanzas routed again) and the
# client gets item-not-found and starts a new one.
MAX_MIGRATION_BYTES = 3 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Options:
    resume_timeout: int = option(
        300, kind=Int(minimum=0, maximum=86400),
        doc="The longest a session waits, in seconds, for its client to resume it after "
            "its connection dropped (XEP-0198 `max`; a client may ask for less). 0 "
            "turns resumption off (acknowledgements still work).",
        why="five minutes covers a phone changing networks or a train tunnel; a session "
            "held longer keeps showing the user online while nobody reads")
    max_unacked: int = option(
        1000, kind=Int(minimum=1, maximum=100000),
        doc="Stanzas a session may keep unacknowledged. A live stream past it ends with "
            "`policy-violation`; a held session past it ends at once. Either way the "
            "stanzas are routed again (offline storage), not lost.",
        why="a client that never acknowledges must not make the server keep everything "
            "it was sent")


OPTIONS = Options


def _sm(tag: str, **attrs: str) -> ET.Element:
    return ET.Element(f"{{{SM_NS}}}{tag}", attrs)


def failed(condition: str, h: int | None = None, text: str = "") -> ET.Element:
    """`<failed/>` with a stanza error condition (XEP-0198 §3, §5)."""
    element = _sm("failed") if h is None else _sm("failed", h=str(h))
    ET.SubElement(element, f"{{{STANZAS_NS}}}{condition}")
    if text:
        ET.SubElement(element, f"{{{STANZAS_NS}}}text").text = text
    return element


def parse_h(value: str | None) -> int | None:
    """An h attribute: a decimal unsigned 32-bit integer, else None."""
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 10:
        return None
    h = int(value)
    return h if h < MODULUS else None


def _q_delay() -> str:
    return f"{{{DELAY_NS}}}delay"


def stamp(at: float) -> str:
    """XEP-0082 date-time in UTC, milliseconds."""
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# Children of a message that only means something to the session it was
# sent to: a carbon copy (XEP-0280, another resource got the original) and
# an archive query's result (XEP-0313, the query is gone with the session).
SESSION_ONLY = frozenset({
    "{urn:xmpp:carbons:2}received", "{urn:xmpp:carbons:2}sent", "{urn:xmpp:mam:2}result",
})


def never_again(stanza: ET.Element) -> bool:
    """Whether an unacknowledged `stanza` is dropped at the session's end
    rather than routed again: carbons and archive results (as Prosody's
    smacks does; routed again they reached other resources or offline
    storage as if they were new messages). Offline messages, which are
    also written without being kept, are routed again: their stored copy
    was deleted once they were written."""
    if stanza.tag != "{jabber:client}message":
        return False
    return any(child.tag in SESSION_ONLY for child in stanza)


def encode_stanza(stanza: ET.Element) -> str:
    return serialize(stanza, stream_ns="").decode("utf-8")


class SmState:
    """One managed session: counters, the unacknowledged stanzas, and its
    resumption; the `StreamTap` of its current stream."""

    def __init__(self, manager: Manager, info: SessionInfo, stream: StreamControl | None,
                 resume_id: str | None, timeout: int) -> None:
        self.manager = manager
        self.info = info
        # Held weakly: the manager's `streams` maps each stream to its
        # state (a WeakKeyDictionary), and a value that refers to its key
        # would keep the stream, and itself, alive for ever.
        self._stream: weakref.ref[StreamControl] | None = None
        self.stream = stream
        self.resume_id = resume_id
        self.timeout = timeout
        self.inbound = 0  # stanzas received from the client, mod 2^32
        self.acked = 0  # the client's last h: stanzas it confirmed, mod 2^32
        # Unacknowledged stanzas with when they were sent (a delay stamp
        # if they must go again).
        self.queue: deque[tuple[ET.Element, float]] = deque()
        self.ack_requested = False
        # The count our last <r/> asked about: no second request for the
        # same count (a client that acks less than it got would loop).
        self.last_requested: int | None = None
        self.hold: SessionHold | None = None
        # Bytes of the stanzas kept while held (see HELD_OUTPUT_FACTOR).
        self.held_bytes = 0
        self.deadline = math.inf
        self.ended = False
        # Set when the session is held or has ended (a resumption waiting
        # for an old stream to be cut).
        self.settled = trio.Event()

    @property
    def stream(self) -> StreamControl | None:
        ref = self._stream
        return ref() if ref is not None else None

    @stream.setter
    def stream(self, stream: StreamControl | None) -> None:
        self._stream = weakref.ref(stream) if stream is not None else None

    # -- StreamTap ----------------------------------------------------------------

    def sent(self, stanza: ET.Element) -> None:
        self.queue.append((stanza, time.time()))
        if self.hold is not None:
            self.manager.wakeups.notify(self.info.jid, stanza, DETACHED)
            most = self.manager.max_held_bytes()
            if self.held_bytes <= most:  # once past it, the session is ending
                self.held_bytes += len(encode_stanza(stanza))
                if self.held_bytes > most:
                    self.manager.module.log.info(
                        "held session %s ends: over %d bytes kept", self.info.jid, most)
                    self.hold.end()
                    return
        if len(self.queue) > self.manager.max_unacked():
            if self.hold is not None:
                self.hold.end()
            else:
                self.manager.module.router.end_session(
                    self.info.jid, "policy-violation",
                    "too many unacknowledged stanzas")
            return
        if self.hold is None and not self.ack_requested:
            self.manager.want_ack(self)

    def request_ack(self) -> None:
        """Ask the client for an ack, once per burst: the manager calls
        this after the task that queued the stanzas yielded."""
        count = self.sent_count
        if (self.hold is not None or self.stream is None or self.ended or not self.queue
                or self.ack_requested or count == self.last_requested):
            return
        self.ack_requested = True
        self.last_requested = count
        self.stream.send_nonza(_sm("r"))

    def received(self, stanza: ET.Element) -> None:
        self.inbound = (self.inbound + 1) % MODULUS

    def lost(self, hold: SessionHold) -> bool:
        if self.resume_id is None or self.ended:
            return False
        # What the client never confirmed may never have reached it: the
        # device may need waking for it (XEP-0357), as for what comes next.
        for stanza, _ in self.queue:
            self.manager.wakeups.notify(self.info.jid, stanza, DETACHED)
        self.hold = hold
        self.held_bytes = 0
        self.stream = None
        self.deadline = trio.current_time() + self.timeout
        self.manager.held_changed()
        self.settled.set()
        return True

    def unacked(self) -> list[ET.Element]:
        self.ended = True
        self.manager.forget(self)
        self.settled.set()
        # The hold refers to the old connection (a key of `streams`).
        self.hold = None
        self.stream = None
        out = [self.stamped(stanza, at) for stanza, at in self.queue if not never_again(stanza)]
        self.queue.clear()
        return out

    def stamped(self, stanza: ET.Element, at: float) -> ET.Element:
        """`stanza` as sent again later: a message or presence gets a
        XEP-0203 delay saying when it was first sent (a copy; iqs as they are)."""
        if stanza.tag == IQ or stanza.find(_q_delay()) is not None:
            return stanza
        again = copy.copy(stanza)
        ET.SubElement(again, _q_delay(), {"from": str(self.info.jid.bare), "stamp": stamp(at)})
        return again

    # -- acknowledgements ------------------------------------------------------

    def acknowledge(self, h: int) -> bool:
        """The client confirmed h stanzas in all: drop them from the queue.
        False when h counts more than were sent (the client's bug)."""
        delta = (h - self.acked) % MODULUS
        if delta > len(self.queue):
            return False
        for _ in range(delta):
            self.queue.popleft()
        self.acked = h
        return True

    @property
    def sent_count(self) -> int:
        return (self.acked + len(self.queue)) % MODULUS

    # -- migration -------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything a new stream on another shard needs to carry on."""
        info = self.info
        return {
            "jid": str(info.jid), "priority": info.priority,
            "presence": encode_stanza(info.presence) if info.presence is not None else None,
            "interested": info.interested, "initial": info.initial_presence_sent,
            "directed": sorted(info.directed_to),
            "fields": [[name, base64.b64encode(data).decode()]
                       for name, data in field_registry.encode(info)],
            "inbound": self.inbound, "acked": self.acked, "timeout": self.timeout,
            "queue": [[encode_stanza(s), at] for s, at in self.queue],
        }


def info_from(snapshot: dict[str, Any]) -> SessionInfo:
    """The SessionInfo a snapshot describes (for `StreamControl.resume`)."""
    presence = snapshot["presence"]
    return SessionInfo(
        parse_jid(snapshot["jid"]),
        presence=ET.fromstring(presence) if presence else None,
        priority=int(snapshot["priority"]), interested=bool(snapshot["interested"]),
        fields=field_registry.decode(
            (name, base64.b64decode(data)) for name, data in snapshot["fields"]),
        directed_to=set(snapshot["directed"]),
        initial_presence_sent=bool(snapshot["initial"]))


@dataclass(slots=True)
class Taken:
    """A session taken for a new stream: the state itself (same shard) or
    its snapshot (from another shard)."""

    state: SmState | None = None
    snapshot: dict[str, Any] | None = None


class ResumeRefused(Exception):
    def __init__(self, condition: str, text: str = "", h: int | None = None) -> None:
        super().__init__(text)
        self.condition = condition
        self.text = text
        self.h = h


class Manager:
    """This shard's managed sessions and its part in resumption."""

    def __init__(self, module: Module) -> None:
        self.module = module
        # Stanzas for held sessions are signalled (a push module wakes the device).
        self.wakeups = wakeups(module)
        self.streams: weakref.WeakKeyDictionary[Any, SmState] = weakref.WeakKeyDictionary()
        # Sessions with resumption that live on this shard, by id.
        self.local: dict[str, SmState] = {}
        # Ids homed here whose session moved to another shard.
        self.where: dict[str, int] = {}
        self.pending: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self._requests = itertools.count(1)
        self._wake = trio.Event()
        # Sessions owed an ack request, sent once the queuing task yields.
        self._ack_wanted: dict[SmState, None] = {}
        self._ack_wake = trio.Event()

    def max_unacked(self) -> int:
        options = self.module.options
        return options.max_unacked if options is not None else 1000

    def max_held_bytes(self) -> int:
        return self.module.config.limits.max_output_bytes * HELD_OUTPUT_FACTOR

    def max_timeout(self) -> int:
        options = self.module.options
        return options.resume_timeout if options is not None else 300

    def new_id(self) -> str:
        """An id no one can guess, homed on this shard (see the docstring)."""
        for _ in range(ID_DRAWS):
            candidate = secrets.token_urlsafe(RESUME_ID_BYTES)
            if self.module.owner(candidate) == self.module.shard and \
                    candidate not in self.local:
                return candidate
        raise RuntimeError("no resumption id homed on this shard")

    def held_changed(self) -> None:
        self._wake.set()

    def want_ack(self, state: SmState) -> None:
        self._ack_wanted[state] = None
        self._ack_wake.set()

    async def ack_requests(self) -> None:
        """Background task: one <r/> per session per burst of stanzas (as
        Prosody defers its request to the end of the tick), not one each."""
        while True:
            await self._ack_wake.wait()
            self._ack_wake = trio.Event()
            wanted, self._ack_wanted = self._ack_wanted, {}
            for state in wanted:
                state.request_ack()

    def forget(self, state: SmState) -> None:
        """The session ended: its id resumes nothing any more."""
        rid = state.resume_id
        if rid is None or self.local.get(rid) is not state:
            return
        del self.local[rid]
        home = self.module.owner(rid)
        if home == self.module.shard:
            self.where.pop(rid, None)
        else:
            self._send(home, {"op": "gone", "id": rid})

    def _send(self, shard: int, message: dict[str, Any]) -> None:
        self.module.send_bus(json.dumps(message).encode(), shard=shard, channel="resume")

    async def expire(self) -> None:
        """Background task: end held sessions whose time is up."""
        while True:
            now = trio.current_time()
            soonest = math.inf
            for state in list(self.local.values()):
                if state.hold is None:
                    continue
                if state.deadline <= now:
                    self.module.log.info("resumption of %s expired", state.info.jid)
                    state.hold.end()
                else:
                    soonest = min(soonest, state.deadline)
            self._wake = trio.Event()
            with trio.move_on_at(soonest):
                await self._wake.wait()

    # -- taking a session for a new stream -------------------------------------

    async def take_local(self, rid: str, user: str, h: int, for_shard: int) -> Taken:
        """Detach the session `rid` of `user` held here, its acknowledged
        stanzas dropped. ResumeRefused with the condition to answer."""
        state = self.local.get(rid)
        if state is None or str(state.info.jid.bare) != user:
            raise ResumeRefused("item-not-found", "no such session to resume")
        if state.hold is None:
            # Still connected, as far as we know: the client moved first.
            if state.stream is not None:
                state.stream.drop()
            with trio.move_on_after(DROP_TIMEOUT):
                await state.settled.wait()
            if state.hold is None or self.local.get(rid) is not state:
                raise ResumeRefused("item-not-found", "the session ended")
        hold = state.hold
        if not state.acknowledge(h):
            # XEP-0198 §5: more confirmed than sent; the session cannot go on.
            sent = state.sent_count
            hold.end()
            raise ResumeRefused("undefined-condition",
                                f"h={h} acknowledges more than the {sent} stanzas sent",
                                state.inbound)
        taken = Taken(state=state)
        if for_shard != self.module.shard:
            taken = Taken(snapshot=state.snapshot())
            if len(json.dumps(taken.snapshot)) > MAX_MIGRATION_BYTES:
                hold.end()
                raise ResumeRefused("item-not-found", "the session is too large to move")
        del self.local[rid]
        state.hold = None
        state.ended = True
        # Make before break: until the new stream has the session, what is
        # sent to it is kept (taken here) or passed on (taken elsewhere).
        if for_shard == self.module.shard:
            self.module.router.expect_session(state.info.jid)
            hold.taken()
        else:
            hold.taken(moving_to=for_shard)
        home = self.module.owner(rid)
        if home == self.module.shard:
            if for_shard == self.module.shard:
                self.where.pop(rid, None)
            else:
                self.where[rid] = for_shard
        else:
            self._send(home, {"op": "moved", "id": rid, "shard": for_shard})
        return taken

    async def locate(self, request: dict[str, Any]) -> None:
        """On the home shard (or the holder, when forwarded): take the
        session, or forward to where it lives; the answer goes to the
        requesting shard."""
        rid, user, h, to = request["id"], request["user"], request["h"], request["to"]
        elsewhere = self.where.get(rid)
        if elsewhere is not None and rid not in self.local and not request.get("forwarded"):
            self._send(elsewhere, {**request, "forwarded": True})
            return
        answer: dict[str, Any] = {"op": "result", "req": request["req"]}
        try:
            taken = await self.take_local(rid, user, h, to)
        except ResumeRefused as exc:
            answer.update(condition=exc.condition, text=exc.text, h=exc.h)
        else:
            answer["session"] = taken.snapshot
            answer["state"] = taken.state  # only ever used on this shard
        if to == self.module.shard:
            self.resolve(answer)
        else:
            answer.pop("state", None)
            self._send(to, answer)

    def resolve(self, answer: dict[str, Any]) -> bool:
        """Hand `answer` to the resumption waiting for it; False when none
        is (it gave up: see `orphaned`)."""
        waiting = self.pending.get(answer["req"])
        if waiting is None:
            return False
        session = answer.get("session")
        if session:
            # Moving here: keep what arrives for it until it is bound.
            try:
                self.module.router.expect_session(parse_jid(session["jid"]))
            except (KeyError, TypeError, InvalidJID):
                pass
        waiting[1].append(answer)
        waiting[0].set()
        return True

    async def orphaned(self, answer: dict[str, Any]) -> None:
        """An answer that came after its resumption gave up (BUS_TIMEOUT):
        if it carries a session, the holder already let it go (no
        session/closed, its queue in the snapshot), so it is nobody's. End
        it here as an expiry would: contacts and rooms hear it leave, and
        what its client never confirmed is routed again."""
        snapshot = answer.get("session")
        if not snapshot:
            return
        try:
            info = info_from(snapshot)
            queue = [ET.fromstring(st) for st, _at in snapshot["queue"]]
        except (KeyError, TypeError, ValueError, InvalidJID, ET.ParseError):
            self.module.log.exception("a session answered too late could not be read")
            return
        self.module.log.info("resumption of %s answered too late; the session ends",
                             info.jid)
        router = self.module.router
        # Its old shard passes on what reaches it to here: routed again too.
        router.expect_session(info.jid)
        queue += router.session_arrived(info.jid)
        with router.batch():
            await self.module.fire("session/closed", info)
        for stanza in queue:
            if not never_again(stanza):
                await router.reroute(stanza)

    async def take(self, rid: str, user: str, h: int) -> dict[str, Any]:
        """Find and take the session `rid` wherever it is: the answer."""
        req = next(self._requests)
        event = trio.Event()
        answers: list[dict[str, Any]] = []
        self.pending[req] = (event, answers)
        request = {"op": "take", "req": req, "id": rid, "user": user, "h": h,
                   "to": self.module.shard}
        try:
            home = self.module.owner(rid)
            if home == self.module.shard:
                await self.locate(request)
            else:
                self._send(home, request)
            with trio.move_on_after(BUS_TIMEOUT):
                await event.wait()
        finally:
            del self.pending[req]
        if not answers:
            return {"condition": "item-not-found", "text": "the session could not be reached"}
        return answers[0]

    async def bus_message(self, source: int, payload: bytes) -> None:
        message = json.loads(payload)
        op = message.get("op")
        if op == "take":
            await self.locate(message)
        elif op == "result":
            if not self.resolve(message):
                await self.orphaned(message)
        elif op == "moved":
            shard = int(message["shard"])
            if shard == self.module.shard:
                self.where.pop(message["id"], None)  # back home
            else:
                self.where[message["id"]] = shard
        elif op == "gone":
            self.where.pop(message["id"], None)


def ack_barriers(module: Module) -> list[Callable[[], Awaitable[None]]]:
    """The barriers every `<a/>` waits for (see ACK_BARRIERS): a module
    appends its own; the list is the same for every module of a shard."""
    found: list[Callable[[], Awaitable[None]]] = module.shared(ACK_BARRIERS, list)
    return found


def setup(module: Module) -> None:
    manager = Manager(module)
    barriers = ack_barriers(module)

    def feature(view: Any) -> ET.Element | None:
        return _sm("sm")

    async def handle(event: NonzaEvent) -> bool:
        stream = event.stream
        if stream is None:
            return True
        tag = event.element.tag.rpartition("}")[2]
        state = manager.streams.get(stream)
        if tag == "enable":
            await enable(event, stream, state)
        elif tag == "resume":
            await resume(event, stream, state)
        elif state is None:
            # XEP-0198 §3: r and a mean nothing before enable.
            stream.send_nonza(failed("unexpected-request", text="stream management is not "
                                     "enabled on this stream"))
        elif tag == "r":
            handled = state.inbound
            # An ack says the stanzas are handled: what modules keep behind
            # delivery for them (the message archive's writes) is done first.
            for barrier in list(barriers):
                await barrier()
            stream.send_nonza(_sm("a", h=str(handled)))
        elif tag == "a":
            h = parse_h(event.element.get("h"))
            if h is None:
                module.router.end_session(state.info.jid, "bad-request", "h must be 0..2^32-1")
            elif not state.acknowledge(h):
                module.router.end_session(
                    state.info.jid, "undefined-condition",
                    f"h={h} acknowledges more than the {state.sent_count} stanzas sent")
            else:
                state.ack_requested = False
                if state.queue:
                    manager.want_ack(state)
        else:
            stream.send_nonza(failed("feature-not-implemented", text=f"unknown element {tag}"))
        return True

    async def enable(event: NonzaEvent, stream: StreamControl, state: SmState | None) -> None:
        if not stream.bound:
            stream.send_nonza(failed("unexpected-request", text="bind a resource first"))
            return
        if state is not None:
            stream.send_nonza(failed("unexpected-request", text="already enabled"))
            return
        wanted = event.element.get("resume") in ("true", "1")
        most = manager.max_timeout()
        timeout = most
        asked = parse_h(event.element.get("max"))
        if asked is not None and asked > 0:
            timeout = min(asked, most)
        resume_id = manager.new_id() if wanted and most > 0 else None
        state = SmState(manager, event.session, stream, resume_id, timeout)
        manager.streams[stream] = state
        if resume_id is not None:
            manager.local[resume_id] = state
            stream.send_nonza(_sm("enabled", id=resume_id, resume="true", max=str(timeout)))
        else:
            stream.send_nonza(_sm("enabled"))
        stream.set_tap(state)

    async def resume(event: NonzaEvent, stream: StreamControl, state: SmState | None) -> None:
        user = stream.authenticated_jid
        if stream.bound or state is not None or user is None:
            stream.send_nonza(failed("unexpected-request",
                                     text="resume instead of a bind, not after one"))
            return
        rid = event.element.get("previd", "")
        h = parse_h(event.element.get("h"))
        if h is None:
            stream.send_nonza(failed("bad-request", text="h must be 0..2^32-1"))
            return
        if not rid or len(rid) > MAX_RESUME_ID_CHARS:
            stream.send_nonza(failed("item-not-found", text="no such session to resume"))
            return
        answer = await manager.take(rid, str(user.bare), h)
        if answer.get("condition"):
            stream.send_nonza(failed(answer["condition"], answer.get("h"),
                                     answer.get("text", "")))
            return
        old: SmState | None = answer.get("state")
        try:
            if old is not None:
                info, timeout, inbound = old.info, old.timeout, old.inbound
                pending = list(old.queue)
            else:
                snapshot: dict[str, Any] = answer["session"]
                info = info_from(snapshot)
                timeout, inbound = int(snapshot["timeout"]), int(snapshot["inbound"])
                pending = [(ET.fromstring(st), float(at)) for st, at in snapshot["queue"]]
        except (KeyError, TypeError, ValueError, InvalidJID, ET.ParseError):
            module.log.exception("a migrated session could not be read")
            stream.send_nonza(failed("internal-server-error"))
            try:
                lost = module.router.session_arrived(parse_jid(answer["session"]["jid"]))
            except (KeyError, TypeError, InvalidJID):
                lost = []
            for stanza in lost:
                await module.router.reroute(stanza)
            return
        new = SmState(manager, info, stream, rid, timeout)
        new.inbound = inbound
        # What the client has not confirmed goes again, counted afresh from h.
        new.acked = h
        resend = [new.stamped(stanza, at) for stanza, at in pending]
        try:
            stream.resume(info, new)
        except Exception:
            # The new stream ended meanwhile: the session is nobody's now,
            # so what it was owed is routed again rather than lost.
            module.log.info("stream ended while resuming %s", info.jid)
            for stanza in [*resend, *module.router.session_arrived(info.jid)]:
                await module.router.reroute(stanza)
            return
        manager.streams[stream] = new
        manager.local[rid] = new
        stream.send_nonza(_sm("resumed", previd=rid, h=str(new.inbound)))
        # What the client did not confirm, then what was sent to the
        # session while it moved (kept meanwhile, see take_local).
        arrived = module.router.session_arrived(info.jid)
        backlog = [*resend, *arrived]
        module.log.info("resumed %s with %d stanza(s) sent again and %d kept while it moved",
                        info.jid, len(resend), len(arrived))
        left = await send_paced(info.jid, backlog)
        if left:
            # The stream ended before it took them all: they were never
            # this session's to confirm, so they are routed again.
            module.log.info("%d stanza(s) of %s's backlog not sent; routed again",
                            len(left), info.jid)
            for stanza in left:
                await module.router.reroute(stanza)

    async def send_paced(jid: JID, backlog: list[ET.Element]) -> list[ET.Element]:
        """Write `backlog` to the resumed session a part at a time, waiting
        for each part to be written before the next, as offline delivery
        does: all at once, a backlog past the output bound (held sessions
        are bounded by count, not bytes) ended the new stream with
        policy-violation before <resumed/> was even written. What the
        stream did not take (it ended) is returned."""
        budget = max(1, module.config.limits.max_output_bytes // 4)
        queued = 0
        for index, stanza in enumerate(backlog):
            receipt = module.router.deliver_tracked(jid, stanza)
            if receipt is None:
                return backlog[index:]
            queued += len(encode_stanza(stanza))
            if queued >= budget and index + 1 < len(backlog):
                queued = 0
                if not await receipt.written():
                    return backlog[index + 1:]
        return []

    module.add_stream_feature(feature, authenticated=True)
    module.add_nonza_handler(SM_NS, handle)
    module.on_bus(manager.bus_message, channel="resume")
    module.spawn(manager.expire)
    module.spawn(manager.ack_requests)

