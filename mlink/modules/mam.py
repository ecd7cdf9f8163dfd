"""XEP-0313 message archive management for users (`urn:xmpp:mam:2`).

Every chat or normal message with something to read (a body, or an
encrypted payload) that a local user sends or receives goes into that
user's archive (`module.store.archive("messages")`) before it is delivered,
so a second device and a new login can fetch the history, and a message
delivered to no resource is in the archive as well as in offline storage
(XEP-0313 §7, XEP-0160). The recipient's copy carries a XEP-0359
`<stanza-id by='user@domain' id='…'/>` with its archive id; a stanza-id a
sender put there in our name is removed first (XEP-0359 §4: it would be
forged).

Not archived: groupchat (room archives belong to the rooms), headlines,
errors, messages without content (chat states, receipts), carbons and
archive results (copies of something archived already), and messages
marked `<no-store/>` or `<no-permanent-store/>` (XEP-0334).

Preferences (`<prefs default='always|never|roster'>` with `<always/>` and
`<never/>` JID lists) decide per peer; an explicit list wins over the
default, `never` over `always` (XEP-0313 §6.1). `roster` archives only
peers in the user's roster.

Queries: an iq-set `<query queryid>` to one's own account, with an
optional data form (`with`: a bare JID's conversations, or a full JID's;
`start`, `end`: XEP-0082 times) and XEP-0059 paging (`max`, `after`,
`before`; an empty `before` is the last page). Results come as one
`<message><result queryid id><forwarded>` each to the requesting
session, then the iq result with `<fin>` (`complete` when the page reaches
the end in its direction, RSM `first`/`last`). An id that is not in the
archive is `item-not-found`. Results are written in paced batches, so a
page never fills a session's output buffer.

Retention: `retention-days` (0: keep forever), applied hourly in batches.
Room archives are not implemented here (multi-user chat is being built).
"""

from __future__ import annotations

import itertools
import json
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from mlink.config_schema import Int, Str, option
from mlink.config_schema import Invalid as SchemaInvalid
from mlink.hooks import StanzaEvent
from mlink.jid import JID, InvalidJID, parse_jid
from mlink.modules.mam_query import (
    EXTENDED_NS,
    MAM_NS,
    Page,
    Query,
    QueryError,
    fin,
    metadata,
    parse_query,
    query_form,
    result_message,
    run_query,
)
from mlink.modules.stream_management import ack_barriers
from mlink.modules.util import iq_result
from mlink.router.rosters import rosters_of
from mlink.store import StoreError
from mlink.store.module_store import ArchivedItem, ArchiveIds, ArchiveStore
from mlink.xml.serialize import CLIENT_NS, serialize

if TYPE_CHECKING:
    from mlink.config_schema import ParseEnv
    from mlink.module import Module

SID_NS = "urn:xmpp:sid:0"
HINTS_NS = "urn:xmpp:hints"
CARBONS_NS = "urn:xmpp:carbons:2"
ARCHIVED_TYPES = frozenset({"chat", "normal"})
POLICIES = ("always", "never", "roster")
# Results written before waiting for the session to take them: a page of
# large messages must not fill the 4 MiB output buffer and get it cut.
WRITE_BATCH = 25
# JIDs one preferences list may hold: a roster's worth; the rest is abuse.
MAX_PREFS_JIDS = 1000
# Archive writes are behind delivery (see `Writer`): at most this many
# items per transaction, and at most this many waiting before senders wait.
WRITE_BATCH_ITEMS = 500
MAX_UNWRITTEN = 20_000
# How long the writer lets items gather before a transaction, unless a
# batch is full or someone waits for the writes (a query, an XEP-0198 ack):
# each commit is a thread hop and an fsync, so at 1,000 messages/s (2,000
# archive items) writing whatever came during the previous commit meant
# hundreds of small transactions a second; 50 ms makes them about 20.
WRITE_LINGER = 0.05
# A query waits this long at most for earlier messages to be written (a
# failing store must not hang queries; they then show what is written) ...
FLUSH_WAIT = 5.0
# ... and this long for the other shards to say theirs are written (a shard
# restarting does not answer; the query then shows what is there).
REMOTE_FLUSH_WAIT = 2.0
# After a failed write (disk full, a locked file), try again after this
# long, this many times; then item by item, dropping only what still fails.
WRITE_RETRY = 1.0
WRITE_RETRIES = 3
# How often retention runs, and how many items one delete removes.
RETENTION_INTERVAL = 3600.0
RETENTION_BATCH = 10_000


class Policy(Str):
    doc = " | ".join(POLICIES)

    def parse(self, raw: str, env: ParseEnv) -> str:
        value = raw.strip()
        if value not in POLICIES:
            raise SchemaInvalid(f"must be one of {', '.join(POLICIES)}, not {value!r}")
        return value


@dataclass(frozen=True, slots=True)
class Options:
    default: str = option(
        "always", kind=Policy(),
        doc="What is archived for a user who set no preferences: `always` (every "
            "conversation), `roster` (peers in the roster), `never`.",
        why="users expect their history on a new device, as on every current server")
    retention_days: int = option(
        0, kind=Int(minimum=0, maximum=36500), default_doc="0 (forever)",
        doc="Archived messages older than this many days are deleted (hourly). 0 keeps "
            "them forever.")


OPTIONS = Options


def _q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


def archivable(message: ET.Element) -> bool:
    """Whether a message belongs in user archives (see the docstring)."""
    if message.get("type", "normal") not in ARCHIVED_TYPES:
        return False
    content = False
    for child in message:
        tag = child.tag
        if tag in (_q(HINTS_NS, "no-store"), _q(HINTS_NS, "no-permanent-store")):
            return False
        if tag.startswith("{" + CARBONS_NS + "}") or tag == _q(MAM_NS, "result"):
            return False
        if tag == _q(CLIENT_NS, "body") or tag.endswith("}encrypted"):
            content = True
    return content


@dataclass(frozen=True, slots=True)
class Prefs:
    default: str
    always: frozenset[str]
    never: frozenset[str]

    def to_element(self) -> ET.Element:
        prefs = ET.Element(_q(MAM_NS, "prefs"), {"default": self.default})
        for name, jids in (("always", self.always), ("never", self.never)):
            holder = ET.SubElement(prefs, _q(MAM_NS, name))
            for jid in sorted(jids):
                ET.SubElement(holder, _q(MAM_NS, "jid")).text = jid
        return prefs

    def encode(self) -> bytes:
        return serialize(self.to_element(), stream_ns="")


def parse_prefs(element: ET.Element) -> Prefs:
    default = element.get("default", "")
    if default not in POLICIES:
        raise QueryError("bad-request", f"default must be one of {', '.join(POLICIES)}")
    lists: dict[str, frozenset[str]] = {}
    for name in ("always", "never"):
        holder = element.find(_q(MAM_NS, name))
        jids = [] if holder is None else holder.findall(_q(MAM_NS, "jid"))
        if len(jids) > MAX_PREFS_JIDS:
            raise QueryError("not-acceptable", f"at most {MAX_PREFS_JIDS} JIDs per list")
        try:
            lists[name] = frozenset(str(parse_jid((j.text or "").strip())) for j in jids)
        except InvalidJID as exc:
            raise QueryError("jid-malformed", str(exc)) from None
    return Prefs(default, lists["always"], lists["never"])


class Writer:
    """Archive writes behind delivery.

    Why: the store is one SQLite file shared by every shard; a durable
    write before each delivery made chat wait on fsyncs and on the other
    shard's write lock (p99 in seconds at 1,000 messages/s, bench
    `loadgen.mobile`). The archive id is made here (`ArchiveIds`) so the
    stanza-id goes out at once; items are written in batches by one task.
    A query first waits for everything archived before it (a client sees
    its own messages), and so does an XEP-0198 ack (`ACK_BARRIERS`): a
    crash loses only what no client was yet told was handled. Items gather
    for WRITE_LINGER before a transaction (group commit), unless a batch is
    full or someone is waiting. Offline messages are stored durably by their
    own module, before anyone is told they were accepted."""

    def __init__(self, module: Module, archive: ArchiveStore) -> None:
        self.module = module
        self.archive = archive
        # Made on first use: modules are set up before the shard joins the
        # bus, so `module.shard` is only right once the server runs (ids
        # made with shard 0 on every shard collided).
        self._ids: ArchiveIds | None = None
        self.pending: list[tuple[int, str, float, str, bytes]] = []
        self.added = 0
        self.written = 0
        self._wake = trio.Event()
        self._urgent = trio.Event()  # write now: a full batch, or a waiter
        self._progress = trio.Event()

    async def add(self, item: tuple[int, str, float, str, bytes]) -> None:
        while len(self.pending) >= MAX_UNWRITTEN:
            self._urgent.set()
            await self._next_progress()  # backpressure: the disk is behind
        self.pending.append(item)
        self.added += 1
        self._wake.set()
        if len(self.pending) >= WRITE_BATCH_ITEMS:
            self._urgent.set()

    async def flush(self) -> None:
        """Until everything added so far is written."""
        target = self.added
        while self.written < target:
            self._urgent.set()
            await self._next_progress()

    async def flush_bounded(self) -> None:
        """`flush`, giving up after FLUSH_WAIT (a failing store must not
        hang whoever waits: a query, an ack)."""
        with trio.move_on_after(FLUSH_WAIT):
            await self.flush()

    async def _next_progress(self) -> None:
        await self._progress.wait()

    @property
    def ids(self) -> ArchiveIds:
        if self._ids is None:
            self._ids = ArchiveIds(self.module.shard)
        return self._ids

    async def run(self) -> None:
        try:
            self.ids.above(await self.archive.max_id())
        except StoreError as exc:
            self.module.log.warning("could not read the largest archive id: %s", exc)
        while True:
            await self._wake.wait()
            with trio.move_on_after(WRITE_LINGER):
                await self._urgent.wait()
            self._wake, self._urgent = trio.Event(), trio.Event()
            while self.pending:
                batch = self.pending[:WRITE_BATCH_ITEMS]
                await self._write(batch)
                del self.pending[:len(batch)]
                self.written += len(batch)
                progress, self._progress = self._progress, trio.Event()
                progress.set()

    async def _write(self, batch: list[tuple[int, str, float, str, bytes]]) -> None:
        """Write `batch`, retrying a failing store a few times; then item by
        item, so one bad item (an id taken after the clock stepped back)
        costs itself, logged, and never stalls the archive for everyone."""
        for attempt in range(WRITE_RETRIES):
            try:
                await self.archive.append_many(batch)
                return
            except StoreError as exc:
                self.module.log.error("archiving %d message(s) failed (try %d of %d): %s",
                                      len(batch), attempt + 1, WRITE_RETRIES, exc)
                await trio.sleep(WRITE_RETRY)
        for item in batch:
            try:
                await self.archive.append_many([item])
            except StoreError as exc:
                self.module.log.error("archived message %d of %s lost: %s", item[0],
                                      item[1], exc)


def setup(module: Module) -> None:
    router = module.router
    archive = module.store.archive("messages")
    writer = Writer(module, archive)
    # Queries waiting for the other shards' writes: request id -> (answers, done).
    flushing: dict[int, tuple[list[int], trio.Event]] = {}
    flush_ids = itertools.count(1)

    async def flush_everywhere() -> None:
        """Until every shard wrote what it archived so far: messages for a
        user are archived on the shard that routed them, any of them."""
        await writer.flush_bounded()
        others = module.shard_count - 1
        if others <= 0:
            return
        req = next(flush_ids)
        answers: list[int] = []
        done = trio.Event()
        flushing[req] = (answers, done)
        try:
            module.send_bus(json.dumps({"op": "flush", "req": req}).encode(), channel="flush")
            with trio.move_on_after(REMOTE_FLUSH_WAIT):
                await done.wait()
        finally:
            del flushing[req]

    async def flush_message(source: int, payload: bytes) -> None:
        message = json.loads(payload)
        if message.get("op") == "flush":
            req = message["req"]

            async def answer() -> None:  # in a task: the bus reader must not wait on the disk
                with trio.move_on_after(FLUSH_WAIT):
                    await writer.flush()
                module.send_bus(json.dumps({"op": "flushed", "req": req}).encode(),
                                shard=source, channel="flush")

            module.spawn(answer)
        elif message.get("op") == "flushed":
            waiting = flushing.get(message["req"])
            if waiting is not None:
                waiting[0].append(source)
                if len(set(waiting[0])) >= module.shard_count - 1:
                    waiting[1].set()
    prefs_store = module.store.keyval("prefs")
    prefs_cache: dict[str, Prefs] = {}
    # Users who ever stored preferences (loaded at start): anyone else has
    # the defaults without a store read, so the first message of each of a
    # thousand users does not queue a thousand reads. None until loaded.
    with_prefs: set[str] | None = None
    changed_since_start: set[str] = set()  # so a change during the load is not missed

    def forget_prefs(user: str) -> None:
        prefs_cache.pop(user, None)
        changed_since_start.add(user)
        if with_prefs is not None:
            with_prefs.add(user)  # set here or on another shard: read it next time

    async def load_prefs_users() -> None:
        nonlocal with_prefs
        try:
            with_prefs = await prefs_store.users() | changed_since_start
        except StoreError as exc:
            module.log.warning("archive preferences not preloaded: %s", exc)

    prefs_changed = module.user_cache("prefs", forget_prefs)

    # The defaults, made once per options object (a reload makes a new one):
    # most users never set preferences, and each message asks twice.
    defaults: list[tuple[object, Prefs]] = []

    def default_prefs() -> Prefs:
        options = module.options
        if not defaults or defaults[0][0] is not options:
            defaults[:] = [(options, Prefs(options.default if options is not None else "always",
                                           frozenset(), frozenset()))]
        return defaults[0][1]

    async def prefs_of(user: str) -> Prefs:
        if with_prefs is not None and user not in with_prefs:
            return default_prefs()
        found = prefs_cache.get(user)
        if found is None:
            data = await prefs_store.get(user)
            found = default_prefs()
            if data is not None:
                try:
                    found = parse_prefs(ET.fromstring(data))
                except (ET.ParseError, QueryError):
                    module.log.error("unreadable archive preferences of %s", user)
            if len(prefs_cache) > 10_000:
                prefs_cache.clear()  # a bound, not an LRU: cheap to reload
            prefs_cache[user] = found
        return found

    async def wanted(user: JID, peer: JID) -> bool:
        if with_prefs is not None and str(user) not in with_prefs:
            policy = default_prefs().default  # no lists: the default decides
            if policy != "roster":
                return policy == "always"
        prefs = await prefs_of(str(user))
        bare, full = str(peer.bare), str(peer)
        if bare in prefs.never or full in prefs.never:
            return False
        if bare in prefs.always or full in prefs.always:
            return True
        if prefs.default == "roster":
            roster = await rosters_of(module).get(str(user))
            return bare in roster.items
        return prefs.default == "always"

    # The last message serialised for an archive, and its bytes: the
    # sender's copy (pre-message hook) and the recipient's (message hook,
    # right after, same element, not yet marked) are the same text, made once.
    last: list[tuple[ET.Element, int, bytes] | None] = [None]

    def archived_bytes(message: ET.Element) -> bytes:
        found = last[0]
        if found is not None and found[0] is message and found[1] == len(message):
            return found[2]
        data = serialize(message, stream_ns="")
        last[0] = (message, len(message), data)
        return data

    async def store(user: JID, peer: JID, message: ET.Element) -> int | None:
        if not await wanted(user, peer):
            return None
        item_id = writer.ids.next()
        await writer.add((item_id, str(user), time.time(), str(peer.bare),
                          archived_bytes(message)))
        return item_id

    async def incoming(event: StanzaEvent) -> bool:
        """A message for a local user: archive it and mark it before it is
        delivered (or stored offline)."""
        message = event.stanza
        if event.rerouted:
            # Routed again by the server (a session that ended before its
            # client confirmed it): archived when first routed, and it
            # keeps the stanza-id the client may already have seen.
            return False
        user = event.to.bare
        for old in message.findall(_q(SID_NS, "stanza-id")):
            if old.get("by") == str(user):
                message.remove(old)  # not ours: forged in our name
        if not archivable(message) or event.sender.bare == user:
            return False
        if not router.online(user) and not await router.account_exists(user):
            return False  # no such account: the router bounces it
        item_id = await store(user, event.sender, message)
        last[0] = None  # the element changes now, and must not be kept alive
        if item_id is not None:
            # First, not last: the body stays the message's last child, as
            # the sender wrote it (clients and tools that look for
            # "</body></message>" keep working).
            message.insert(0, ET.Element(_q(SID_NS, "stanza-id"),
                                         {"by": str(user), "id": str(item_id)}))
        return False

    async def outgoing(event: StanzaEvent) -> bool:
        """A message a local user sends: into the sender's archive."""
        if archivable(event.stanza) and event.sender.bare != event.to.bare and \
                router.is_local(event.to):
            await store(event.sender.bare, event.to, event.stanza)
        return False

    async def query(event: StanzaEvent) -> bool:
        element = event.stanza[0]
        if element.tag != _q(MAM_NS, "query"):
            return False
        user = str(event.sender.bare)
        try:
            page = await fetch(user, parse_query(element))
        except QueryError as exc:
            await router.bounce(event.stanza, exc.condition, exc.text)
            return True
        queryid = element.get("queryid")
        receipt = None
        for n, item in enumerate(page.sent, 1):
            receipt = router.deliver_tracked(event.sender, result_message(
                event.sender, user, queryid, item, archived_message(user, item)))
            if receipt is None:
                return True  # the session ended
            if n % WRITE_BATCH == 0 and not await receipt.written():
                return True
        await router.route(iq_result(event.stanza, fin(page)))
        return True

    async def fetch(user: str, q: Query) -> Page:
        await flush_everywhere()  # the user's latest messages are in the answer
        with_bare = str(q.with_jid.bare) if q.with_jid is not None else None
        peer = q.with_jid
        accept = None
        if peer is not None and peer.resource:
            # A full JID: the bare JID's items, those to or from it.
            def accept(item: ArchivedItem) -> bool:
                return resource_matches(item, peer)
        return await run_query(archive, user, q, with_index=with_bare, accept=accept)

    def resource_matches(item: ArchivedItem, peer: JID) -> bool:
        try:
            message = ET.fromstring(item.value)
        except ET.ParseError:
            return False
        return str(peer) in (message.get("from"), message.get("to"))

    def archived_message(user: str, item: ArchivedItem) -> ET.Element | None:
        try:
            return ET.fromstring(item.value)
        except ET.ParseError:
            module.log.error("unreadable archived message %d of %s", item.id, user)
            return None

    async def form(event: StanzaEvent) -> bool:
        """XEP-0313 §4.1.1 (the query form) and §5 (the metadata)."""
        tag = event.stanza[0].tag
        if tag == _q(MAM_NS, "query"):
            await router.route(iq_result(event.stanza, query_form()))
            return True
        if tag == _q(MAM_NS, "metadata"):
            await flush_everywhere()
            found = await metadata(archive, str(event.sender.bare))
            await router.route(iq_result(event.stanza, found))
            return True
        return False

    async def get_prefs(event: StanzaEvent) -> bool:
        if event.stanza[0].tag != _q(MAM_NS, "prefs"):
            return False
        prefs = await prefs_of(str(event.sender.bare))
        await router.route(iq_result(event.stanza, prefs.to_element()))
        return True

    async def set_prefs(event: StanzaEvent) -> bool:
        element = event.stanza[0]
        if element.tag == _q(MAM_NS, "query"):
            return await query(event)
        if element.tag != _q(MAM_NS, "prefs"):
            return False
        user = str(event.sender.bare)
        try:
            prefs = parse_prefs(element)
        except QueryError as exc:
            await router.bounce(event.stanza, exc.condition, exc.text)
            return True
        await prefs_store.set(user, prefs.encode())
        forget_prefs(user)
        prefs_changed(user)
        await router.route(iq_result(event.stanza, prefs.to_element()))
        return True

    async def not_yours(event: StanzaEvent) -> bool:
        await router.bounce(event.stanza, "forbidden", "only the owner may read an archive")
        return True

    async def retention() -> None:
        while True:
            await trio.sleep(RETENTION_INTERVAL)
            options = module.options
            days = options.retention_days if options is not None else 0
            if not days:
                continue
            cutoff = time.time() - days * 86400
            deleted = RETENTION_BATCH
            total = 0
            while deleted == RETENTION_BATCH:
                deleted = await archive.delete_older(cutoff, RETENTION_BATCH)
                total += deleted
            if total:
                module.log.info("retention: %d archived message(s) deleted", total)

    module.add_account_feature(MAM_NS)
    module.add_account_feature(EXTENDED_NS)
    module.add_account_feature(SID_NS)
    module.add_feature(SID_NS)
    # After blocking's filter (100): a refused message is not archived.
    for scope in ("bare", "full"):
        module.hook(f"message/{scope}", incoming, priority=40)
        module.hook(f"pre-message/{scope}", outgoing, priority=40)
    module.hook(f"iq-set/self/{MAM_NS}", set_prefs)
    module.hook(f"iq-get/self/{MAM_NS}", get_prefs)
    module.hook(f"iq-get/self/{MAM_NS}", form)
    module.hook(f"iq-set/bare/{MAM_NS}", not_yours)
    module.hook(f"iq-get/bare/{MAM_NS}", not_yours)
    async def stopping(_server: object) -> None:
        await writer.flush()

    module.hook("server/stopped", stopping)
    ack_barriers(module).append(writer.flush_bounded)
    module.on_bus(flush_message, channel="flush")
    module.spawn(retention)
    module.spawn(writer.run)
    module.spawn(load_prefs_users)

