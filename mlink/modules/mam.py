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

import datetime as dt
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
from mlink.modules.util import iq_result
from mlink.router.rosters import rosters_of
from mlink.store import StoreError
from mlink.store.module_store import ArchivedItem, ArchiveIds, ArchiveStore
from mlink.xml.serialize import CLIENT_NS, serialize

if TYPE_CHECKING:
    from mlink.config_schema import ParseEnv
    from mlink.module import Module

MAM_NS = "urn:xmpp:mam:2"
SID_NS = "urn:xmpp:sid:0"
RSM_NS = "http://jabber.org/protocol/rsm"
DATA_NS = "jabber:x:data"
FORWARD_NS = "urn:xmpp:forward:0"
DELAY_NS = "urn:xmpp:delay"
HINTS_NS = "urn:xmpp:hints"
CARBONS_NS = "urn:xmpp:carbons:2"
MESSAGE = f"{{{CLIENT_NS}}}message"
ARCHIVED_TYPES = frozenset({"chat", "normal"})
POLICIES = ("always", "never", "roster")
# Results per page when the client asks for none (XEP-0313 leaves it to
# the server; Prosody uses 20..50) ...
DEFAULT_PAGE = 50
# ... and at most: a page is written to one session in one go (paced), so
# it must stay far below the output bound and the store's MAX_ARCHIVE_PAGE.
MAX_PAGE = 250
# Results written before waiting for the session to take them: a page of
# large messages must not fill the 4 MiB output buffer and get it cut.
WRITE_BATCH = 25
# JIDs one preferences list may hold: a roster's worth; the rest is abuse.
MAX_PREFS_JIDS = 1000
# Archive writes are behind delivery (see `Writer`): at most this many
# items per transaction, and at most this many waiting before senders wait.
WRITE_BATCH_ITEMS = 500
MAX_UNWRITTEN = 20_000
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


def stamp(at: float) -> str:
    """XEP-0082 date-time, UTC, milliseconds."""
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_time(text: str) -> float:
    """A XEP-0082 date-time as a POSIX time; ValueError when it is not one."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError("a time zone is required")
    return parsed.timestamp()


class QueryError(Exception):
    def __init__(self, condition: str, text: str) -> None:
        super().__init__(text)
        self.condition = condition
        self.text = text


@dataclass(slots=True)
class Query:
    with_jid: JID | None = None
    start: float | None = None
    end: float | None = None
    limit: int = DEFAULT_PAGE
    after: int | None = None
    before: int | None = None
    last_page: bool = False  # an empty <before/>


def parse_query(query: ET.Element) -> Query:
    """The filters and paging of a `<query/>`; QueryError when malformed."""
    q = Query()
    form = query.find(_q(DATA_NS, "x"))
    if form is not None:
        for field in form.findall(_q(DATA_NS, "field")):
            var = field.get("var", "")
            value = (field.findtext(_q(DATA_NS, "value")) or "").strip()
            try:
                if var == "FORM_TYPE":
                    if value != MAM_NS:
                        raise QueryError("bad-request", f"FORM_TYPE must be {MAM_NS}")
                elif var == "with":
                    q.with_jid = parse_jid(value)
                elif var == "start":
                    q.start = parse_time(value)
                elif var == "end":
                    q.end = parse_time(value)
                else:
                    raise QueryError("bad-request", f"unsupported field {var!r}")
            except (InvalidJID, ValueError) as exc:
                raise QueryError("bad-request", f"field {var}: {exc}") from None
    rsm = query.find(_q(RSM_NS, "set"))
    if rsm is not None:
        if rsm.find(_q(RSM_NS, "index")) is not None:
            raise QueryError("feature-not-implemented", "paging by index is not supported")
        text = rsm.findtext(_q(RSM_NS, "max"))
        if text is not None:
            if not text.strip().isdigit():
                raise QueryError("bad-request", "max must be a number")
            q.limit = min(int(text), MAX_PAGE)
        after = rsm.find(_q(RSM_NS, "after"))
        before = rsm.find(_q(RSM_NS, "before"))
        if after is not None:
            q.after = _item_id(after.text)
        if before is not None:
            if (before.text or "").strip():
                q.before = _item_id(before.text)
            else:
                q.last_page = True
    return q


def _item_id(text: str | None) -> int:
    value = (text or "").strip()
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        raise QueryError("item-not-found", f"no archived item {value!r}")
    return int(value)


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
    its own messages). A crash loses what was not yet written (typically
    milliseconds' worth); offline messages are stored durably by their own
    module, before anyone is told they were accepted."""

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
        self._progress = trio.Event()

    async def add(self, item: tuple[int, str, float, str, bytes]) -> None:
        while len(self.pending) >= MAX_UNWRITTEN:
            await self._next_progress()  # backpressure: the disk is behind
        self.pending.append(item)
        self.added += 1
        self._wake.set()

    async def flush(self) -> None:
        """Until everything added so far is written."""
        target = self.added
        while self.written < target:
            await self._next_progress()

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
            self._wake = trio.Event()
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
        with trio.move_on_after(FLUSH_WAIT):
            await writer.flush()
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

    def default_prefs() -> Prefs:
        options = module.options
        return Prefs(options.default if options is not None else "always",
                     frozenset(), frozenset())

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

    async def store(user: JID, peer: JID, message: ET.Element) -> int | None:
        if not await wanted(user, peer):
            return None
        item_id = writer.ids.next()
        await writer.add((item_id, str(user), time.time(), str(peer.bare),
                          serialize(message, stream_ns="")))
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
            q = parse_query(element)
            items, complete = await fetch(user, q)
        except QueryError as exc:
            await router.bounce(event.stanza, exc.condition, exc.text)
            return True
        queryid = element.get("queryid")
        receipt = None
        for n, item in enumerate(items, 1):
            receipt = router.deliver_tracked(event.sender, result_message(
                event.sender, user, queryid, item))
            if receipt is None:
                return True  # the session ended
            if n % WRITE_BATCH == 0 and not await receipt.written():
                return True
        fin = ET.Element(_q(MAM_NS, "fin"))
        if complete:
            fin.set("complete", "true")
        rsm = ET.SubElement(fin, _q(RSM_NS, "set"))
        if items:
            ET.SubElement(rsm, _q(RSM_NS, "first")).text = str(items[0].id)
            ET.SubElement(rsm, _q(RSM_NS, "last")).text = str(items[-1].id)
        else:
            ET.SubElement(rsm, _q(RSM_NS, "count")).text = "0"
        await router.route(iq_result(event.stanza, fin))
        return True

    async def fetch(user: str, q: Query) -> tuple[list[ArchivedItem], bool]:
        await flush_everywhere()  # the user's latest messages are in the answer
        for anchor in (q.after, q.before):
            if anchor is not None and await archive.get(user, anchor) is None:
                raise QueryError("item-not-found", f"no archived item {anchor}")
        with_bare = str(q.with_jid.bare) if q.with_jid is not None else None
        newest_first = q.before is not None or q.last_page
        # One more than asked: whether the page reaches the end.
        want = q.limit + 1
        found: list[ArchivedItem] = []
        cursor_before, cursor_after = q.before, q.after
        # A full-JID filter is applied to the bare JID's items: read on
        # until the page is full or the archive ends (bounded by MAX_PAGE).
        for _ in range(MAX_PAGE):
            batch = await archive.page(user, before=cursor_before, after=cursor_after,
                                       with_jid=with_bare, start=q.start, end=q.end,
                                       limit=want, newest_first=newest_first)
            for item in batch:
                if q.with_jid is None or not q.with_jid.resource or \
                        resource_matches(item, q.with_jid):
                    found.append(item)
            if len(batch) < want or len(found) >= want:
                break
            if newest_first:
                cursor_before = batch[-1].id
            else:
                cursor_after = batch[-1].id
        complete = len(found) <= q.limit
        found = found[:q.limit]
        if newest_first:
            found.reverse()
        return found, complete

    def resource_matches(item: ArchivedItem, peer: JID) -> bool:
        try:
            message = ET.fromstring(item.value)
        except ET.ParseError:
            return False
        return str(peer) in (message.get("from"), message.get("to"))

    def result_message(to: JID, user: str, queryid: str | None,
                       item: ArchivedItem) -> ET.Element:
        message = ET.Element(MESSAGE, {"to": str(to), "from": user})
        attrs = {"id": str(item.id)}
        if queryid is not None:
            attrs["queryid"] = queryid
        result = ET.SubElement(message, _q(MAM_NS, "result"), attrs)
        forwarded = ET.SubElement(result, _q(FORWARD_NS, "forwarded"))
        ET.SubElement(forwarded, _q(DELAY_NS, "delay"), {"stamp": stamp(item.at)})
        try:
            forwarded.append(ET.fromstring(item.value))
        except ET.ParseError:
            module.log.error("unreadable archived message %d of %s", item.id, user)
        return message

    async def form(event: StanzaEvent) -> bool:
        """XEP-0313 §4.1.1: the fields a query form may use."""
        if event.stanza[0].tag != _q(MAM_NS, "query"):
            return False
        query_element = ET.Element(_q(MAM_NS, "query"))
        x = ET.SubElement(query_element, _q(DATA_NS, "x"), {"type": "form"})
        form_type = ET.SubElement(x, _q(DATA_NS, "field"), {"var": "FORM_TYPE",
                                                            "type": "hidden"})
        ET.SubElement(form_type, _q(DATA_NS, "value")).text = MAM_NS
        for var, kind in (("with", "jid-single"), ("start", "text-single"),
                          ("end", "text-single")):
            ET.SubElement(x, _q(DATA_NS, "field"), {"var": var, "type": kind})
        await router.route(iq_result(event.stanza, query_element))
        return True

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
    module.on_bus(flush_message, channel="flush")
    module.spawn(retention)
    module.spawn(writer.run)
    module.spawn(load_prefs_users)

