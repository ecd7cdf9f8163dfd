"""XEP-0357 push notifications: wake a phone whose app cannot see a message.

A client registers an app server (`<enable jid node>`, with an optional
publish-options form holding its secret); the registration is kept in the
module's store, per user, for every later session. When a message arrives
that the user's device cannot see now — its session is held by stream
management after the connection dropped, its client said it is inactive
(CSI), or the user has no session and the message goes offline — the
server publishes a notification to the app server over XMPP (an iq set
of pubsub `<publish>` from the user's bare JID, XEP-0357 §5), usually to an
external component (XEP-0114).

Choices, after Prosody's mod_cloud_notify:
- Privacy: the summary carries `message-count` only, unless the options
  say to include the sender (`include-sender`) and the body
  (`include-body`): the app server is a third party.
- Rate: at most one push per user per `min-interval` seconds;
  messages in a burst are counted and summarised in one push at the end
  of the interval.
- An error from the app server of any type but `wait` (the node is gone,
  the app was uninstalled) removes the registration; `wait` keeps it.
- Messages from a chat room are not pushed (no mention detection).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import weakref
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from mlink.config_schema import Bool, FloatAtLeast, option
from mlink.hooks import StanzaEvent
from mlink.jid import JID, InvalidJID, parse_jid
from mlink.modules.wakeups import wakeups
from mlink.util.keyed_lock import KeyedLock
from mlink.util.user_cache import UserCache
from mlink.xml.serialize import CLIENT_NS, serialize

if TYPE_CHECKING:
    from mlink.module import Module

PUSH_NS = "urn:xmpp:push:0"
PUBSUB_NS = "http://jabber.org/protocol/pubsub"
DATA_NS = "jabber:x:data"
SUMMARY_FORM = "urn:xmpp:push:summary"
PUBLISH_OPTIONS_FORM = "http://jabber.org/protocol/pubsub#publish-options"
# Registrations per account: one per app install on each device; more is
# abuse (every message would fan out to them all).
MAX_REGISTRATIONS = 10
# A publish-options form holds a secret and an endpoint or two; bigger is
# not a real client's.
MAX_FORM_BYTES = 4096
# Longest node and app server JID kept (a node is a random token).
MAX_NODE_CHARS = 1024
# Characters of the body put in a notification when bodies are included:
# enough for a preview, and the push services' own payload limits are small.
MAX_BODY_CHARS = 256
# Ids of our publish iqs start with this, so the app server's answers
# (routed to the user's bare JID) are recognised on any shard.
ID_PREFIX = "push~"
REGISTRATIONS = "registrations"
# Users whose "has a registration or not" a shard remembers: most users
# never register, and without the answer each message to one of them that
# is held, inactive or offline would cost a task and a store read. A bool
# per user; the least recently used go first.
MAX_CACHED_USERS = 50_000
# Errors that say the app server is unreachable now, not that the
# registration is wrong: a push gateway restarting must not cost every
# user their notifications.
TRANSIENT = frozenset({"service-unavailable", "remote-server-not-found",
                       "remote-server-timeout", "internal-server-error"})


@dataclass(frozen=True, slots=True)
class PushOptions:
    include_body: bool = option(
        False, kind=Bool(),
        doc="Put the message body (its first 256 characters) in notifications. Off: the "
            "app server, a third party, learns that a message came, not what it says.",
        why="Privacy, as Prosody's default.")
    include_sender: bool = option(
        False, kind=Bool(),
        doc="Put the sender's bare JID in notifications (`last-message-sender`).",
        why="Privacy, as Prosody's default.")
    min_interval: float = option(
        10.0, kind=FloatAtLeast(0.0),
        doc="Seconds between two pushes for one user; messages meanwhile are counted into "
            "one push at the end of the interval. `0`: a push per message.",
        why="A burst of messages wakes the phone once.")


OPTIONS = PushOptions


@dataclass(slots=True)
class Pending:
    """Messages not yet pushed for one user, and when the last push went."""

    count: int = 0
    sender: str = ""
    body: str = ""
    last_push: float = -1e9
    scheduled: bool = False


def setup(module: Module) -> None:
    store = module.store.map(REGISTRATIONS)
    pending: dict[str, Pending] = {}
    # Two enables of one user at once must not both pass the count check.
    locks: KeyedLock[str] = KeyedLock()
    # User -> whether they have a registration, as last read on this shard
    # (dropped on a change here or, through `changed`, on another shard).
    registered: UserCache[str, bool] = UserCache(MAX_CACHED_USERS)
    changed = module.user_cache("registered", registered.invalidate)
    # Messages already noted through Wakeups (a held or inactive session):
    # when such a message is routed again to offline storage, the push for
    # it went or is going. Weak: the set holds no message alive.
    reported: weakref.WeakSet[ET.Element] = weakref.WeakSet()

    async def registrations(user: str) -> dict[str, dict[str, str]]:
        load = registered.begin(user)
        try:
            found = {key: json.loads(value)
                     for key, value in (await store.items(user)).items()}
        except BaseException:
            registered.finish(user, load, False, keep=False)
            raise
        registered.finish(user, load, bool(found))
        return found

    async def set_registration(user: str, key: str, value: bytes | None) -> None:
        """Write one registration and drop every shard's cached answer."""
        registered.invalidate(user)
        try:
            await store.set(user, key, value)
        finally:
            registered.invalidate(user)
            changed(user)

    # -- enable / disable (XEP-0357 §5, §6) -----------------------------------------

    async def command(event: StanzaEvent) -> bool:
        iq = event.stanza
        child = iq[0]
        user = str(event.sender.bare)
        op = child.tag.rpartition("}")[2]
        app = child.get("jid", "")
        node = child.get("node")
        try:
            app_jid = str(parse_jid(app)) if app else ""
        except InvalidJID:
            app_jid = ""
        if op not in ("enable", "disable") or not app_jid or (op == "enable" and not node):
            await module.router.bounce(iq, "bad-request", "give 'jid' and (to enable) 'node'")
            return True
        if node is not None and len(node) > MAX_NODE_CHARS:
            await module.router.bounce(iq, "not-acceptable", "node too long")
            return True
        async with locks.hold(user):
            refusal = await change(user, op, app_jid, node, child)
        if refusal is not None:
            await module.router.bounce(iq, *refusal)
            return True
        await module.router.route(_result(iq))
        return True

    async def change(user: str, op: str, app_jid: str, node: str | None,
                     child: ET.Element) -> tuple[str, str] | None:
        """Apply an enable or disable; the (condition, text) refusing it, if any."""
        existing = await registrations(user)
        if op == "disable":
            for key, reg in existing.items():
                if reg["jid"] == app_jid and (node is None or reg["node"] == node):
                    await set_registration(user, key, None)
        else:
            form = child.find(f"{{{DATA_NS}}}x")
            form_xml = serialize(form, "").decode() if form is not None else ""
            if len(form_xml) > MAX_FORM_BYTES:
                return "not-acceptable", "publish-options too large"
            key = _key(app_jid, node or "")
            if key not in existing and len(existing) >= MAX_REGISTRATIONS:
                return "resource-constraint", "too many registrations"
            value = {"jid": app_jid, "node": node or "", "form": form_xml}
            await set_registration(user, key, json.dumps(value).encode())
        return None

    # -- what triggers a push ----------------------------------------------------------

    def pushable(stanza: ET.Element) -> bool:
        if stanza.tag != f"{{{CLIENT_NS}}}message":
            return False
        if stanza.get("type", "normal") not in ("normal", "chat"):
            return False  # groupchat (no mentions), headline, error
        return stanza.find(f"{{{CLIENT_NS}}}body") is not None

    def note(user: str, stanza: ET.Element) -> None:
        """Count `stanza` for `user` and make sure a push will go."""
        if not pushable(stanza) or registered.get(user) is False:
            return  # nothing to push, or nobody to push to (known on this shard)
        state = pending.setdefault(user, Pending())
        state.count += 1
        sender = stanza.get("from", "")
        try:
            state.sender = str(parse_jid(sender).bare) if sender else ""
        except InvalidJID:
            state.sender = ""
        state.body = (stanza.findtext(f"{{{CLIENT_NS}}}body") or "")[:MAX_BODY_CHARS]
        if not state.scheduled:
            state.scheduled = True
            module.spawn(lambda: flush_later(user))

    def on_wakeup(session: JID, stanza: ET.Element, reason: str) -> None:
        reported.add(stanza)
        note(str(session.bare), stanza)

    async def on_offline(event: StanzaEvent) -> bool:
        # A message routed again (its session ended) was pushed already
        # only if Wakeups reported it (it waited in a held session); one
        # never written (queued on a session without stream management,
        # or crossing the bus to a session that just ended) was not.
        if event.stanza not in reported:
            note(str(event.to.bare), event.stanza)
        return False  # the offline module still stores it

    async def flush_later(user: str) -> None:
        """One task per user with messages to push: push, then stay for an
        interval to gather what comes next; leave after a quiet interval
        (so a user's entry lives at most `min-interval` past their last
        push, and the pause between two pushes is never shorter)."""
        state = pending[user]
        try:
            while True:
                wait = state.last_push + module.options.min_interval - trio.current_time()
                if wait > 0:
                    await trio.sleep(wait)
                if not state.count:
                    return
                count, sender, body = state.count, state.sender, state.body
                state.count = 0
                state.last_push = trio.current_time()
                await publish(user, count, sender, body)
        finally:
            state.scheduled = False
            if pending.get(user) is state and not state.count:
                del pending[user]

    async def publish(user: str, count: int, sender: str, body: str) -> None:
        options = module.options
        for key, reg in (await registrations(user)).items():
            # The id names the registration, so an error removes that one only.
            iq = ET.Element(f"{{{CLIENT_NS}}}iq", {
                "type": "set", "from": user, "to": reg["jid"],
                "id": f"{ID_PREFIX}{key}~{secrets.token_hex(8)}"})
            pubsub = ET.SubElement(iq, f"{{{PUBSUB_NS}}}pubsub")
            publish_el = ET.SubElement(pubsub, f"{{{PUBSUB_NS}}}publish", {"node": reg["node"]})
            item = ET.SubElement(publish_el, f"{{{PUBSUB_NS}}}item")
            notification = ET.SubElement(item, f"{{{PUSH_NS}}}notification")
            form = ET.SubElement(notification, f"{{{DATA_NS}}}x", {"type": "submit"})
            _field(form, "FORM_TYPE", SUMMARY_FORM)
            _field(form, "message-count", str(count))
            if options.include_sender and sender:
                _field(form, "last-message-sender", sender)
            if options.include_body and body:
                _field(form, "last-message-body", body)
            if reg["form"]:
                po = ET.SubElement(pubsub, f"{{{PUBSUB_NS}}}publish-options")
                po.append(ET.fromstring(reg["form"]))
            module.log.info("push to %s for %s (%d message(s))", reg["jid"], user, count)
            await module.router.route(iq)

    # -- the app server's answers ---------------------------------------------------------

    async def answer(event: StanzaEvent) -> bool:
        iq = event.stanza
        kind = iq.get("type")
        # Only answers (result, error) to our publishes: a get or set whose
        # id happens to look like ours is a request for the account's own
        # handlers (disco#info to the bare JID, say), and must be answered.
        if (iq.tag != f"{{{CLIENT_NS}}}iq" or kind not in ("result", "error")
                or not iq.get("id", "").startswith(ID_PREFIX)):
            return False
        if kind != "error":
            return True
        error = iq.find(f"{{{CLIENT_NS}}}error")
        if error is None or error.get("type") == "wait" or any(
                child.tag.rpartition("}")[2] in TRANSIENT for child in error):
            return True  # temporary: keep the registration
        user = str(event.to.bare)
        app = str(event.sender)
        key = iq.get("id", "")[len(ID_PREFIX):].partition("~")[0]
        async with locks.hold(user):
            raw = await store.get(user, key) if key else None
            # Only the app server the registration names can remove it.
            if raw is not None and json.loads(raw)["jid"] == app:
                await set_registration(user, key, None)
                module.log.info("push registration %s of %s removed after an error", app, user)
        return True

    module.add_account_feature(PUSH_NS)
    module.hook(f"iq-set/self/{PUSH_NS}", command)
    module.hook("message/offline", on_offline, priority=10)
    module.hook("iq/bare", answer, priority=10)
    wakeups(module).listen(on_wakeup)


def _key(app: str, node: str) -> str:
    """The store key of one registration (fixed length, whatever the node)."""
    return hashlib.sha256(f"{app}\0{node}".encode()).hexdigest()


def _field(form: ET.Element, var: str, value: str) -> None:
    f = ET.SubElement(form, f"{{{DATA_NS}}}field", {"var": var})
    ET.SubElement(f, f"{{{DATA_NS}}}value").text = value


def _result(iq: ET.Element) -> ET.Element:
    reply = ET.Element(iq.tag, {"type": "result", "id": iq.get("id", "")})
    if (sender := iq.get("from")) is not None:
        reply.set("to", sender)
    return reply

