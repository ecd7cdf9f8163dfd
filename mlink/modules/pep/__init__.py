"""Personal eventing (XEP-0163): every account is a publish-subscribe
service with the XEP-0060 subset clients use it for — OMEMO device lists
and bundles (open nodes), user nicknames (XEP-0172), XEP-0402 bookmarks
and XEP-0223 private storage (whitelist nodes, `max` items), moods, tunes.

- publish (the owner only) with auto-create and publish-options
  preconditions (§7.1.5), retract (with `notify`), items retrieval (all, the
  newest `max_items`, or by id), node configuration (get/set), delete and
  purge by the owner, disco#items of the account listing the nodes the
  requester may read;
- notifications (`headline` messages from the owner's bare JID) to the
  owner's resources and to contacts allowed by the node's access model,
  each only when its client announced `<node>+notify` in its entity
  capabilities (`caps.py`); the latest item of every node a new session
  wants, when it sends its first available presence (XEP-0163 §4.3.3);
- items persist in the module store (shared by the shards: any shard
  serves any account); node names and item ids are limited in length,
  items per node and nodes per account in number (`node.py`).

The avatar nodes (XEP-0084) stay with the `avatar` module, which keeps the
photo in the directory; it fires `pep/published` so contacts are notified
here. Not offered: explicit subscriptions (PEP subscribes through
presence), affiliations and whitelists of other JIDs, collection nodes,
roster-group access (`roster` is read as `presence`). XEP-0411's
conversion between XEP-0402 bookmarks and the older stores is the
`bookmarks` module's, through `access.NodeAccess`.
"""

from __future__ import annotations

import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from mlink.hooks import StanzaEvent
from mlink.jid import JID, parse_jid
from mlink.modules.pep.access import ACCESS, CHANGED, NodeAccess
from mlink.modules.pep.caps import DISCO_INFO_NS, CapsMemory, caps_of, notify_nodes, verifies
from mlink.modules.pep.node import (
    ERRORS_NS,
    EVENT_NS,
    MAX_NODES_PER_USER,
    OWNER_NS,
    PUBSUB_NS,
    NodeConfig,
    PubSubError,
    check_name,
    may_read,
    refusal,
)
from mlink.modules.util import iq_result
from mlink.router.rosters import rosters_of
from mlink.stream.errors import stanza_error

if TYPE_CHECKING:
    from mlink.module import Module
    from mlink.router.sessions import SessionInfo

CLIENT_NS = "jabber:client"
DISCO_ITEMS_NS = "http://jabber.org/protocol/disco#items"
# The event other modules fire after publishing an item of their own nodes
# (payload: owner bare JID, node, the <item/> element), to notify contacts.
PUBLISHED_EVENT = "pep/published"
# Below the avatar module's handlers (priority 0), which take their nodes.
PRIORITY = -10
# Above the disco module's account answer, for the node listing.
DISCO_PRIORITY = 10
# A client that does not answer its own caps query within this many
# seconds gets no notifications until its next presence.
CAPS_QUERY_TIMEOUT = 10.0
# XEP-0060 features this service offers (disco#info of every account).
FEATURES = ("publish", "auto-create", "publish-options", "access-presence", "access-open",
            "access-whitelist", "retrieve-items", "retract-items", "delete-nodes",
            "purge-nodes", "config-node", "persistent-items", "last-published",
            "filtered-notifications", "multi-items", "item-ids")


def _p(tag: str, ns: str = PUBSUB_NS) -> str:
    return f"{{{ns}}}{tag}"


def setup(module: Module) -> None:
    router = module.router
    configs = module.store.map("nodes")  # owner -> node -> NodeConfig
    items = module.store.map("items")  # owner -> node\0id -> seq\npayload
    known_caps = module.store.map("caps")  # "" -> "hash ver" -> nodes
    memory = CapsMemory()
    waiting: dict[str, trio.MemorySendChannel[ET.Element]] = {}

    # -- the store ----------------------------------------------------------------

    async def node_config(owner: str, node: str) -> NodeConfig | None:
        raw = await configs.get(owner, node)
        return NodeConfig.decode(raw) if raw is not None else None

    async def node_items(owner: str, node: str) -> list[tuple[str, ET.Element]]:
        """(id, payload) of a node's items, oldest first."""
        prefix = node + "\0"
        found = []
        for key, value in (await items.items(owner)).items():
            if key.startswith(prefix):
                seq, _, payload = value.partition(b"\n")
                found.append((seq, key[len(prefix):], payload))
        found.sort()
        return [(item_id, ET.fromstring(payload)) for _, item_id, payload in found]

    async def store_item(owner: str, node: str, config: NodeConfig, item_id: str,
                         payload: ET.Element) -> None:
        seq = b"%020d" % time.time_ns()
        await items.set(owner, f"{node}\0{item_id}", seq + b"\n" + ET.tostring(payload))
        stored = await node_items(owner, node)
        for old_id, _ in stored[: max(0, len(stored) - config.kept())]:
            await items.set(owner, f"{node}\0{old_id}", None)

    async def drop_items(owner: str, node: str) -> None:
        for item_id, _ in await node_items(owner, node):
            await items.set(owner, f"{node}\0{item_id}", None)

    # -- who may read, who is told --------------------------------------------------

    async def subscribed(owner: str, requester: JID) -> bool:
        """Whether `requester` receives `owner`'s presence (RFC 6121)."""
        roster = await rosters_of(module).get(owner)
        item = roster.items.get(str(requester.bare))
        return item is not None and item.subscription in ("from", "both")

    async def notify_set(info: SessionInfo) -> frozenset[str]:
        caps = caps_of(info.presence) if info.available else None
        if caps is None:
            return frozenset()
        nodes = memory.get(caps.key)
        if nodes is None:
            raw = await known_caps.get("", caps.key)
            if raw is None:
                return frozenset()
            nodes = frozenset(raw.decode().split("\n")) - {""}
            memory.put(caps.key, nodes)
        return nodes

    async def notify(owner: str, node: str, config: NodeConfig, event: ET.Element) -> None:
        """Send `event` (an <event/> payload) to every available resource
        that may read the node and asked for its notifications."""
        owner_jid = parse_jid(owner)
        roster = await rosters_of(module).get(owner)
        # XEP-0163 §4.3.1: PEP's implicit subscribers are the contacts with
        # a presence subscription to the owner, whatever the access model
        # (which may exclude some of them: a whitelist node, the owner only).
        readers = [owner_jid] + [
            parse_jid(contact) for contact, item in roster.items.items()
            if item.subscription in ("from", "both") and may_read(config, False, True)]
        for bare in readers:
            for info in router.resources(bare):
                if node in await notify_set(info):
                    await router.route(headline(owner, info.jid, event))

    def headline(owner: str, to: JID, event: ET.Element) -> ET.Element:
        """A notification (XEP-0060 §7.1.2.1): a headline from the owner."""
        message = ET.Element(_p("message", CLIENT_NS), {
            "type": "headline", "from": owner, "to": str(to), "id": uuid.uuid4().hex})
        message.append(event)
        return message

    def items_event(node: str, item_id: str, payload: ET.Element | None) -> ET.Element:
        event = ET.Element(_p("event", EVENT_NS))
        listing = ET.SubElement(event, _p("items", EVENT_NS), {"node": node})
        item = ET.SubElement(listing, _p("item", EVENT_NS), {"id": item_id})
        if payload is not None:
            item.append(payload)
        return event

    # -- answering -------------------------------------------------------------------

    async def refuse(event: StanzaEvent, exc: PubSubError) -> None:
        error = stanza_error(event.stanza, exc.condition, exc.text)
        if exc.app is not None or exc.feature is not None:
            err = error.find(_p("error", CLIENT_NS))
            if err is not None:
                attrs = {"feature": exc.feature} if exc.feature else {}
                ET.SubElement(err, _p(exc.app or "unsupported", ERRORS_NS), attrs)
        await router.route(error)

    def single(event: StanzaEvent, ns: str) -> ET.Element:
        pubsub = event.stanza[0]
        if pubsub.tag != _p("pubsub", ns) or len(pubsub) == 0:
            raise PubSubError("bad-request", "expected a pubsub request")
        return pubsub

    RequestWork = Callable[[StanzaEvent, ET.Element, str], Awaitable[ET.Element | None]]

    async def answering(event: StanzaEvent, ns: str, work: RequestWork,
                        changes: bool = False) -> bool:
        """Run `work` on the request inside the iq's <pubsub/> (namespace
        `ns`) and answer: its result, or the error it raised. With
        `changes`, a request that succeeded is first announced to other
        modules (`access.CHANGED`), so what it causes (bookmarks converted)
        is done when the client hears of its success."""
        try:
            request = single(event, ns)[0]
            name = request.tag.rpartition("}")[2]
            reply = await work(event, request, name)
        except PubSubError as exc:
            await refuse(event, exc)
            return True
        if changes and request.get("node") and name in ("publish", "retract", "delete",
                                                        "purge"):
            await module.fire(CHANGED, (str(event.sender.bare), request.get("node")))
        await router.route(iq_result(event.stanza, reply))
        return True

    async def set_request(event: StanzaEvent, request: ET.Element, name: str
                          ) -> ET.Element | None:
        owner = str(event.sender.bare)
        pubsub = event.stanza[0]
        if name == "publish":
            return await publish(owner, request, pubsub.find(_p("publish-options")))
        if name == "retract":
            await retract(owner, request)
        elif name == "create":
            await create(owner, request, pubsub.find(_p("configure")))
        else:
            raise PubSubError("feature-not-implemented", f"{name} is not offered here",
                              "unsupported", feature=name)
        return None

    async def handle_set(event: StanzaEvent) -> bool:
        return await answering(event, PUBSUB_NS, set_request, changes=True)

    async def publish(owner: str, request: ET.Element, options: ET.Element | None
                      ) -> ET.Element:
        node = check_name("node", request.get("node"))
        entries = request.findall(_p("item"))
        if len(entries) != 1 or len(entries[0]) != 1:
            raise PubSubError("bad-request", "publish one item with one payload",
                              "invalid-payload")
        item_id = entries[0].get("id") or uuid.uuid4().hex
        check_name("item", item_id)
        form = options.find("{jabber:x:data}x") if options is not None else None
        config = await node_config(owner, node)
        if config is None:
            if len(await configs.items(owner)) >= MAX_NODES_PER_USER:
                raise PubSubError("not-allowed", f"at most {MAX_NODES_PER_USER} nodes per "
                                  "account")
            config = NodeConfig().with_form(form) if form is not None else NodeConfig()
            await configs.set(owner, node, config.encode())
        elif form is not None and not config.matches(form):
            raise PubSubError("conflict", "the node exists with another configuration",
                              "precondition-not-met")
        payload = entries[0][0]
        await store_item(owner, node, config, item_id, payload)
        await notify(owner, node, config, items_event(node, item_id, payload))
        reply = ET.Element(_p("pubsub"))
        done = ET.SubElement(reply, _p("publish"), {"node": node})
        ET.SubElement(done, _p("item"), {"id": item_id})
        return reply

    async def retract(owner: str, request: ET.Element) -> None:
        node = check_name("node", request.get("node"))
        config = await node_config(owner, node)
        if config is None:
            raise PubSubError("item-not-found", "no such node")
        wanted = [check_name("item", i.get("id")) for i in request.findall(_p("item"))]
        if not wanted:
            raise PubSubError("bad-request", "name the item to retract", "item-required")
        stored = {item_id for item_id, _ in await node_items(owner, node)}
        if any(item_id not in stored for item_id in wanted):
            raise PubSubError("item-not-found", "no such item")
        for item_id in wanted:
            await items.set(owner, f"{node}\0{item_id}", None)
        if request.get("notify") in ("1", "true"):
            event = ET.Element(_p("event", EVENT_NS))
            listing = ET.SubElement(event, _p("items", EVENT_NS), {"node": node})
            for item_id in wanted:
                ET.SubElement(listing, _p("retract", EVENT_NS), {"id": item_id})
            await notify(owner, node, config, event)

    async def create(owner: str, request: ET.Element, configure: ET.Element | None) -> None:
        node = check_name("node", request.get("node"))
        if await node_config(owner, node) is not None:
            raise PubSubError("conflict", "the node exists")
        form = configure.find("{jabber:x:data}x") if configure is not None else None
        if len(await configs.items(owner)) >= MAX_NODES_PER_USER:
            raise PubSubError("not-allowed", f"at most {MAX_NODES_PER_USER} nodes per account")
        config = NodeConfig().with_form(form) if form is not None else NodeConfig()
        await configs.set(owner, node, config.encode())

    async def get_request(event: StanzaEvent, request: ET.Element, name: str) -> ET.Element:
        if request.tag != _p("items"):
            raise PubSubError("feature-not-implemented", f"{name} is not offered here",
                              "unsupported", feature=name)
        return await get_items(str(event.to.bare), event.sender, request)

    async def handle_get(event: StanzaEvent) -> bool:
        return await answering(event, PUBSUB_NS, get_request)

    async def get_items(owner: str, requester: JID, request: ET.Element) -> ET.Element:
        node = check_name("node", request.get("node"))
        config = await node_config(owner, node)
        if config is None:
            raise PubSubError("item-not-found", "no such node")
        is_owner = str(requester.bare) == owner
        if not may_read(config, is_owner, not is_owner and await subscribed(owner, requester)):
            raise refusal(config)
        stored = await node_items(owner, node)
        wanted = [i.get("id") for i in request.findall(_p("item"))]
        if wanted:
            stored = [(i, p) for i, p in stored if i in wanted]
        elif (limit := request.get("max_items")) is not None:
            if not limit.isdigit():
                raise PubSubError("bad-request", "max_items must be a number")
            stored = stored[len(stored) - int(limit):] if int(limit) else []
        reply = ET.Element(_p("pubsub"))
        listing = ET.SubElement(reply, _p("items"), {"node": node})
        for item_id, payload in stored:
            ET.SubElement(listing, _p("item"), {"id": item_id}).append(payload)
        return reply

    async def owner_request(event: StanzaEvent, request: ET.Element, name: str
                            ) -> ET.Element | None:
        owner = str(event.sender.bare)
        node = check_name("node", request.get("node"))
        config = await node_config(owner, node)
        if config is None:
            raise PubSubError("item-not-found", "no such node")
        if name == "configure" and event.type == "get":
            reply = ET.Element(_p("pubsub", OWNER_NS))
            ET.SubElement(reply, _p("configure", OWNER_NS), {"node": node}).append(
                config.to_form())
            return reply
        if name == "configure":
            form = request.find("{jabber:x:data}x")
            if form is None:
                raise PubSubError("bad-request", "a configuration form is required")
            if form.get("type") != "cancel":
                await configs.set(owner, node, config.with_form(form).encode())
        elif name in ("delete", "purge") and event.type == "set":
            await drop_items(owner, node)
            if name == "delete":
                await configs.set(owner, node, None)
                removal = ET.Element(_p("event", EVENT_NS))
                ET.SubElement(removal, _p("delete", EVENT_NS), {"node": node})
                await notify(owner, node, config, removal)
        else:
            raise PubSubError("feature-not-implemented", f"{name} is not offered here",
                              "unsupported", feature=name)
        return None

    async def handle_owner(event: StanzaEvent) -> bool:
        return await answering(event, OWNER_NS, owner_request, changes=event.type == "set")

    # -- for other modules (XEP-0411 bookmarks conversion) ----------------------------

    async def lent_items(owner: str, node: str) -> list[tuple[str, ET.Element]]:
        return await node_items(owner, node) if await node_config(owner, node) else []

    async def lent_publish(owner: str, node: str, item_id: str, payload: ET.Element,
                           config: NodeConfig) -> None:
        found = await node_config(owner, node)
        if found is None:
            await configs.set(owner, node, config.encode())
            found = config
        await store_item(owner, node, found, item_id, payload)
        await notify(owner, node, found, items_event(node, item_id, payload))

    async def lent_retract(owner: str, node: str, wanted: list[str]) -> None:
        config = await node_config(owner, node)
        if config is None:
            return
        stored = {item_id for item_id, _ in await node_items(owner, node)}
        gone = [item_id for item_id in wanted if item_id in stored]
        for item_id in gone:
            await items.set(owner, f"{node}\0{item_id}", None)
        if gone:
            event = ET.Element(_p("event", EVENT_NS))
            listing = ET.SubElement(event, _p("items", EVENT_NS), {"node": node})
            for item_id in gone:
                ET.SubElement(listing, _p("retract", EVENT_NS), {"id": item_id})
            await notify(owner, node, config, event)

    access = NodeAccess(lent_items, lent_publish, lent_retract)
    module.shared(ACCESS, lambda: access)

    async def refuse_foreign_set(event: StanzaEvent) -> bool:
        """Only the owner publishes to an account's nodes."""
        await refuse(event, PubSubError("forbidden", "only the account's owner may change "
                                        "its nodes"))
        return True

    async def disco_items(event: StanzaEvent) -> bool:
        """The nodes of the account the requester may read (XEP-0163 §4)."""
        query = event.stanza[0]
        if query.get("node"):
            return False
        owner = str(event.to.bare)
        is_owner = str(event.sender.bare) == owner
        reader = is_owner or await subscribed(owner, event.sender)
        reply = ET.Element(f"{{{DISCO_ITEMS_NS}}}query")
        for node, raw in sorted((await configs.items(owner)).items()):
            if may_read(NodeConfig.decode(raw), is_owner, reader):
                ET.SubElement(reply, f"{{{DISCO_ITEMS_NS}}}item", {"jid": owner, "node": node})
        await router.route(iq_result(event.stanza, reply))
        return True

    # -- entity capabilities and the last items at login ----------------------------------

    async def caps_reply(event: StanzaEvent) -> bool:
        """The answers to our caps queries (iq result/error to the domain)."""
        if event.type not in ("result", "error"):
            return False
        channel = waiting.pop(event.stanza.get("id", ""), None)
        if channel is None:
            return False
        channel.send_nowait(event.stanza)
        return True

    async def learn_caps(info: SessionInfo, presence: ET.Element) -> frozenset[str]:
        caps = caps_of(presence)
        if caps is None:
            return frozenset()
        nodes = memory.get(caps.key)
        if nodes is not None:
            return nodes
        raw = await known_caps.get("", caps.key)
        if raw is not None:
            nodes = frozenset(raw.decode().split("\n")) - {""}
            memory.put(caps.key, nodes)
            return nodes
        query_id = "caps-" + uuid.uuid4().hex
        ask = ET.Element(_p("iq", CLIENT_NS), {"type": "get", "id": query_id,
                                              "from": info.jid.domain, "to": str(info.jid)})
        ET.SubElement(ask, f"{{{DISCO_INFO_NS}}}query", {"node": f"{caps.node}#{caps.ver}"})
        send, receive = trio.open_memory_channel[ET.Element](1)
        waiting[query_id] = send
        try:
            await router.route(ask)
            with trio.move_on_after(CAPS_QUERY_TIMEOUT):
                answer = await receive.receive()
                query = answer.find(f"{{{DISCO_INFO_NS}}}query")
                if answer.get("type") == "result" and query is not None and verifies(caps, query):
                    features = frozenset(f.get("var", "") for f in
                                         query.findall(f"{{{DISCO_INFO_NS}}}feature"))
                    nodes = notify_nodes(features)
                    await known_caps.set("", caps.key, "\n".join(sorted(nodes)).encode())
                    memory.put(caps.key, nodes)
                    return nodes
                module.log.info("caps of %s not verified (ver %s)", info.jid, caps.ver)
        finally:
            waiting.pop(query_id, None)
        return frozenset()

    async def last_items(info: SessionInfo, nodes: frozenset[str]) -> None:
        """XEP-0163 §4.3.3: the latest item of each node the new session
        asks notifications for, from its own account and every contact
        whose presence it receives."""
        if not nodes:
            return
        user = str(info.jid.bare)
        roster = await rosters_of(module).get(user)
        owners = [user] + [c for c, item in roster.items.items()
                           if item.subscription in ("to", "both")]
        for owner in owners:
            for node, raw in (await configs.items(owner)).items():
                config = NodeConfig.decode(raw)
                if node not in nodes or config.send_last_published_item == "never":
                    continue
                if not may_read(config, owner == user, owner != user):
                    continue
                stored = await node_items(owner, node)
                if stored:
                    item_id, payload = stored[-1]
                    await router.route(headline(owner, info.jid,
                                                items_event(node, item_id, payload)))

    async def presence_sent(event: StanzaEvent) -> bool:
        """A local client's broadcast presence: its first available one
        (or one with new caps) starts the caps lookup and the last items.
        Never consumed: the presence module broadcasts it."""
        origin = event.origin
        if origin is None or event.type is not None or event.to != origin.jid.bare:
            return False
        new_caps = caps_of(event.stanza)
        if new_caps is None:
            return False
        old = caps_of(origin.presence) if origin.available else None
        if old == new_caps:
            return False
        presence = event.stanza

        async def work() -> None:
            nodes = await learn_caps(origin, presence)
            if old is None:
                await last_items(origin, nodes)

        module.spawn(work)
        return False

    async def published_elsewhere(payload: object) -> None:
        """Another module's node item (the avatar's), to notify about."""
        assert isinstance(payload, tuple)
        owner, node, item = payload
        assert isinstance(item, ET.Element)
        payload_element = item[0] if len(item) else None
        await notify(str(owner), str(node), NodeConfig(access_model="open"),
                     items_event(str(node), item.get("id", ""), payload_element))

    for scope in ("self", "bare"):
        module.hook(f"iq-get/{scope}/{PUBSUB_NS}", handle_get, PRIORITY)
        module.hook(f"iq-get/{scope}/{DISCO_ITEMS_NS}", disco_items, DISCO_PRIORITY)
    module.hook(f"iq-set/self/{PUBSUB_NS}", handle_set, PRIORITY)
    module.hook(f"iq-set/bare/{PUBSUB_NS}", refuse_foreign_set, PRIORITY)
    module.hook(f"iq-get/self/{OWNER_NS}", handle_owner, PRIORITY)
    module.hook(f"iq-set/self/{OWNER_NS}", handle_owner, PRIORITY)
    module.hook("iq/host", caps_reply, 100)
    module.hook("pre-presence/bare", presence_sent, 50)
    module.hook(PUBLISHED_EVENT, published_elsewhere)
    module.add_feature(PUBSUB_NS)
    module.add_account_feature(f"{PUBSUB_NS}#publish", identity=("pubsub", "pep", ""))
    for feature in FEATURES:
        module.add_account_feature(f"{PUBSUB_NS}#{feature}")

