"""Personal eventing (XEP-0163) on the wire: raw clients publish, read,
configure and get notified, with entity capabilities (XEP-0115) deciding
who is told. Access models, publish-options preconditions, and the latest
items sent to a new session."""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlink.modules.pep.caps import Caps, verifies
from tests.rawclient import RawClient, read_stanza, read_stanza_text, stanza_error_of
from tests.serverproc import DOMAIN, MlinkProcess, start_mlink

PUBSUB = "http://jabber.org/protocol/pubsub"
EVENT = "http://jabber.org/protocol/pubsub#event"
ERRORS = "http://jabber.org/protocol/pubsub#errors"
NICK = "http://jabber.org/protocol/nick"
DEVICES = "eu.siacs.conversations.axolotl.devicelist"
BOOKMARKS = "urn:xmpp:bookmarks:1"
CAPS_NODE = "https://example.org/test-client"
USERS = {f"{name}@{DOMAIN}": f"{name}-pw" for name in
         ("alice", "bob", "carol", "dave", "erin", "frank", "gina", "hank", "ivan", "judy")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    with start_mlink(tmp_path_factory.mktemp("pep"), DOMAIN, cert_files, users=USERS) as proc:
        yield proc


def client_ver(features: list[str]) -> str:
    """XEP-0115 §5.1 for one identity and no forms, written out here
    independently of the server's code."""
    text = "client/pc//Test<" + "".join(f + "<" for f in sorted(features))
    return base64.b64encode(hashlib.sha1(text.encode()).digest()).decode()


class Client:
    def __init__(self, server: MlinkProcess, ca_file: Path, name: str,
                 notify: tuple[str, ...] = (), lie: bool = False) -> None:
        self.raw = RawClient(server.c2s_port, ca_file)
        self.bare = f"{name}@{DOMAIN}"
        self.jid = self.raw.login(DOMAIN, name, USERS[self.bare],
                                  resource="r-" + uuid.uuid4().hex[:8])
        # One feature of its own: a ver no other client has, so the server
        # asks this one (a known ver is never asked again).
        self.features = ["http://jabber.org/protocol/caps",
                         "http://jabber.org/protocol/disco#info",
                         f"urn:example:client:{uuid.uuid4().hex}",
                         *(f"{node}+notify" for node in notify)]
        self.lie = lie  # announce a ver that its disco#info does not hash to
        self.backlog = ""  # text read while waiting for something else

    def send(self, text: str) -> None:
        self.raw.send(text)

    def roster(self) -> None:
        self.send("<iq type='get' id='roster'><query xmlns='jabber:iq:roster'/></iq>")
        read_stanza(self.raw, "iq", "roster")

    def available(self) -> None:
        """Initial presence with caps; answers the server's caps query."""
        ver = client_ver(self.features)
        if self.lie:
            ver = client_ver(self.features + ["urn:example:extra"])
        self.send(f"<presence><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' "
                  f"node='{CAPS_NODE}' ver='{ver}'/></presence>")
        if any(f.endswith("+notify") for f in self.features):
            self.answer_caps_query(ver)

    def answer_caps_query(self, ver: str) -> None:
        text = self.raw.read_until(r"<iq [^>]*id='caps-[0-9a-f]+'[^>]*>.*?</iq>")
        match = re.search(r"<iq [^>]*id='(caps-[0-9a-f]+)'", text)
        assert match and f"node='{CAPS_NODE}#{ver}'" in text, text
        features = "".join(f"<feature var='{f}'/>" for f in self.features)
        self.send(f"<iq type='result' id='{match.group(1)}' to='{DOMAIN}'>"
                  f"<query xmlns='http://jabber.org/protocol/disco#info' "
                  f"node='{CAPS_NODE}#{ver}'><identity category='client' type='pc' "
                  f"name='Test'/>{features}</query></iq>")

    def iq(self, kind: str, body: str, to: str = "") -> ET.Element:
        stanza_id = "q-" + uuid.uuid4().hex[:8]
        target = f" to='{to}'" if to else ""
        self.send(f"<iq type='{kind}' id='{stanza_id}'{target}>{body}</iq>")
        stanza, text = read_stanza_text(self.raw, "iq", stanza_id)
        self.backlog += text  # notifications that came with the answer
        return stanza

    def publish(self, node: str, item_id: str, payload: str, options: str = "") -> ET.Element:
        extra = f"<publish-options>{options}</publish-options>" if options else ""
        return self.iq("set", f"<pubsub xmlns='{PUBSUB}'><publish node='{node}'>"
                              f"<item id='{item_id}'>{payload}</item></publish>{extra}</pubsub>")

    def items(self, owner: str, node: str, extra: str = "") -> ET.Element:
        return self.iq("get", f"<pubsub xmlns='{PUBSUB}'><items node='{node}'{extra}/></pubsub>",
                       to=owner)

    def event(self, node: str, marker: str) -> ET.Element:
        """The notification of `node` carrying `marker` (already read, or next)."""
        pattern = rf"<message [^>]*type='headline'[^>]*>.*?{re.escape(marker)}.*?</message>"
        if re.search(pattern, self.backlog, re.S):
            text, self.backlog = self.backlog, ""
        else:
            text = self.backlog + self.raw.read_until(pattern)
            self.backlog = ""
        for stanza in ET.fromstring(f"<r xmlns='jabber:client'>{_messages(text)}</r>"):
            items = stanza.find(f"{{{EVENT}}}event/{{{EVENT}}}items")
            if items is not None and items.get("node") == node and marker in ET.tostring(
                    stanza, encoding="unicode"):
                return stanza
        raise AssertionError(f"no {node} event with {marker!r} in {text!r}")

    def close(self) -> None:
        self.raw.close()


def _messages(text: str) -> str:
    return "".join(m.group(0) for m in re.finditer(r"<message\b.*?</message>", text, re.S))


def befriend(a: Client, b: Client) -> None:
    """Mutual presence subscription (RFC 6121 §3.1), both clients online."""
    for x, y in ((a, b), (b, a)):
        x.send(f"<presence to='{y.bare}' type='subscribe'/>")
        y.raw.read_until(rf"<presence (?=[^>]*from='{re.escape(x.bare)}')"
                         r"(?=[^>]*type='subscribe')")
        y.send(f"<presence to='{x.bare}' type='subscribed'/>")
        x.raw.read_until(rf"<presence (?=[^>]*from='{re.escape(y.bare)}')"
                         r"(?=[^>]*type='subscribed')")
    for x, y in ((a, b), (b, a)):
        roster = x.iq("get", "<query xmlns='jabber:iq:roster'/>")
        items = {i.get("jid"): i.get("subscription") for i in roster.iter(
            "{jabber:iq:roster}item")}
        assert items.get(y.bare) == "both", items


def error_with(reply: ET.Element, condition: str, app: str | None) -> None:
    assert stanza_error_of(reply)[1] == condition, ET.tostring(reply)
    if app is not None:
        assert reply.find(f".//{{{ERRORS}}}{app}") is not None, ET.tostring(reply)


@pytest.fixture
def clients(server: MlinkProcess, ca_file: Path) -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


def test_notifications_follow_caps_and_presence_subscription(
        server: MlinkProcess, ca_file: Path, clients: list[Client]) -> None:
    alice = Client(server, ca_file, "alice", notify=(NICK,))
    bob = Client(server, ca_file, "bob", notify=(NICK,))
    carol = Client(server, ca_file, "carol", notify=(NICK,))  # not a contact
    clients += [alice, bob, carol]
    for c in (alice, bob, carol):
        c.roster()
    for c in (alice, bob, carol):
        c.available()
    befriend(alice, bob)

    token = uuid.uuid4().hex
    result = alice.publish(NICK, "current", f"<nick xmlns='{NICK}'>Al {token}</nick>")
    assert result.get("type") == "result", ET.tostring(result)
    for c in (alice, bob):  # the owner and the subscribed contact, both +notify
        event = c.event(NICK, token)
        assert event.get("from") == alice.bare and event.get("to") == c.jid
        item = event.find(f"{{{EVENT}}}event/{{{EVENT}}}items/{{{EVENT}}}item")
        assert item is not None and item.get("id") == "current"
    # carol may not read a presence-model node, and is never told.
    error_with(carol.items(alice.bare, NICK), "not-authorized", "presence-subscription-required")
    reply = bob.items(alice.bare, NICK)
    assert token in ET.tostring(reply, encoding="unicode")
    # The notifications were routed before alice's result: whatever carol
    # was sent came before the answer to her ping (one shard, one order).
    carol.send(f"<iq type='get' id='after' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert token not in carol.backlog + carol.raw.read_until(r"id='after'")


def test_open_node_readable_by_anyone_and_preconditions(
        server: MlinkProcess, ca_file: Path, clients: list[Client]) -> None:
    dave = Client(server, ca_file, "dave")
    erin = Client(server, ca_file, "erin")  # no relation to dave
    clients += [dave, erin]
    open_form = ("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
                 "<value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
                 "<field var='pubsub#access_model'><value>{}</value></field></x>")
    devices = "<list xmlns='eu.siacs.conversations.axolotl'><device id='4711'/></list>"
    ok = dave.publish(DEVICES, "current", devices, open_form.format("open"))
    assert ok.get("type") == "result", ET.tostring(ok)
    got = erin.items(dave.bare, DEVICES)
    assert got.get("type") == "result" and "4711" in ET.tostring(got, encoding="unicode")
    # Publishing again with other preconditions: refused, node unchanged.
    clash = dave.publish(DEVICES, "current", devices, open_form.format("whitelist"))
    error_with(clash, "conflict", "precondition-not-met")
    assert erin.items(dave.bare, DEVICES).get("type") == "result"
    # Only the owner publishes.
    foreign = erin.iq("set", f"<pubsub xmlns='{PUBSUB}'><publish node='{DEVICES}'>"
                             f"<item id='x'>{devices}</item></publish></pubsub>", to=dave.bare)
    error_with(foreign, "forbidden", None)
    # The account lists the node to whoever may read it.
    listing = erin.iq("get", "<query xmlns='http://jabber.org/protocol/disco#items'/>",
                      to=dave.bare)
    nodes = [i.get("node") for i in listing.iter("{http://jabber.org/protocol/disco#items}item")]
    assert DEVICES in nodes


def test_bookmarks_whitelist_many_items_retract_and_delete(
        server: MlinkProcess, ca_file: Path, clients: list[Client]) -> None:
    """XEP-0402 bookmarks: whitelist, max items; the owner reads them all,
    nobody else does; retract and delete."""
    frank = Client(server, ca_file, "frank")
    erin = Client(server, ca_file, "erin")
    clients += [frank, erin]
    options = ("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
               "<value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
               "<field var='pubsub#persist_items'><value>true</value></field>"
               "<field var='pubsub#max_items'><value>max</value></field>"
               "<field var='pubsub#access_model'><value>whitelist</value></field></x>")
    rooms = [f"room{i}@conference.{DOMAIN}" for i in range(3)]
    for room in rooms:
        reply = frank.publish(BOOKMARKS, room, f"<conference xmlns='{BOOKMARKS}' "
                                               "autojoin='true'/>", options)
        assert reply.get("type") == "result", ET.tostring(reply)
    mine = frank.items(frank.bare, BOOKMARKS)
    ids = [i.get("id") for i in mine.iter(f"{{{PUBSUB}}}item")]
    assert ids == rooms
    assert [i.get("id") for i in frank.items(frank.bare, BOOKMARKS, " max_items='1'")
            .iter(f"{{{PUBSUB}}}item")] == rooms[-1:]
    error_with(erin.items(frank.bare, BOOKMARKS), "not-allowed", "closed-node")
    gone = frank.iq("set", f"<pubsub xmlns='{PUBSUB}'><retract node='{BOOKMARKS}'>"
                           f"<item id='{rooms[0]}'/></retract></pubsub>")
    assert gone.get("type") == "result", ET.tostring(gone)
    assert [i.get("id") for i in frank.items(frank.bare, BOOKMARKS)
            .iter(f"{{{PUBSUB}}}item")] == rooms[1:]
    form = frank.iq("get", "<pubsub xmlns='http://jabber.org/protocol/pubsub#owner'>"
                           f"<configure node='{BOOKMARKS}'/></pubsub>")
    assert "whitelist" in ET.tostring(form, encoding="unicode")
    deleted = frank.iq("set", "<pubsub xmlns='http://jabber.org/protocol/pubsub#owner'>"
                              f"<delete node='{BOOKMARKS}'/></pubsub>")
    assert deleted.get("type") == "result", ET.tostring(deleted)
    error_with(frank.items(frank.bare, BOOKMARKS), "item-not-found", None)


def test_new_session_gets_the_latest_items(server: MlinkProcess, ca_file: Path,
                                           clients: list[Client]) -> None:
    """XEP-0163 §4.3.3: a contact's client that comes online asking for
    nick notifications gets the latest nick at once; a client whose caps do
    not verify gets nothing (it cannot poison the shared caps entry)."""
    gina = Client(server, ca_file, "gina")
    hank = Client(server, ca_file, "hank")
    clients += [gina, hank]
    for c in (gina, hank):
        c.roster()
        c.available()
    befriend(gina, hank)
    hank.close()
    token = uuid.uuid4().hex
    assert gina.publish(NICK, "current", f"<nick xmlns='{NICK}'>{token}</nick>").get(
        "type") == "result"
    liar = Client(server, ca_file, "hank", notify=(NICK,), lie=True)
    clients.append(liar)
    liar.roster()
    liar.available()
    fresh = Client(server, ca_file, "hank", notify=(NICK,))
    clients.append(fresh)
    fresh.roster()
    fresh.available()
    assert fresh.event(NICK, token).get("from") == gina.bare
    liar.send(f"<iq type='get' id='after' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert token not in liar.backlog + liar.raw.read_until(r"id='after'")


def test_caps_verification_example_from_the_xep() -> None:
    """XEP-0115 §5.3's complex example (identities in two languages, an
    extended form) hashes to its published ver; one feature more does not."""
    query = ET.fromstring(
        "<query xmlns='http://jabber.org/protocol/disco#info'>"
        "<identity xml:lang='en' category='client' name='Psi 0.11' type='pc'/>"
        "<identity xml:lang='el' category='client' name='&#936; 0.11' type='pc'/>"
        "<feature var='http://jabber.org/protocol/caps'/>"
        "<feature var='http://jabber.org/protocol/disco#info'/>"
        "<feature var='http://jabber.org/protocol/disco#items'/>"
        "<feature var='http://jabber.org/protocol/muc'/>"
        "<x xmlns='jabber:x:data' type='result'>"
        "<field var='FORM_TYPE' type='hidden'><value>urn:xmpp:dataforms:softwareinfo</value>"
        "</field><field var='ip_version'><value>ipv4</value><value>ipv6</value></field>"
        "<field var='os'><value>Mac</value></field>"
        "<field var='os_version'><value>10.5.1</value></field>"
        "<field var='software'><value>Psi</value></field>"
        "<field var='software_version'><value>0.11</value></field></x></query>")
    caps = Caps("sha-1", "http://psi-im.org", "q07IKJEyjvHSyhy//CH0CxmKi8w=")
    assert verifies(caps, query)
    ET.SubElement(query, "{http://jabber.org/protocol/disco#info}feature", {"var": "x"})
    assert not verifies(caps, query)


AVATAR_METADATA = "urn:xmpp:avatar:metadata"


def test_a_vcard_photo_is_announced_as_a_pep_avatar(
        server: MlinkProcess, ca_file: Path, clients: list[Client]) -> None:
    """XEP-0398: the account says the vCard photo and the PEP avatar are
    kept as one; a photo set through vcard-temp reaches the contacts that
    asked for avatar metadata notifications, and PEP serves it."""
    ivan = Client(server, ca_file, "ivan", notify=(AVATAR_METADATA,))
    judy = Client(server, ca_file, "judy", notify=(AVATAR_METADATA,))
    clients += [ivan, judy]
    for c in (ivan, judy):
        c.roster()
    for c in (ivan, judy):
        c.available()
    befriend(ivan, judy)
    info = judy.iq("get", "<query xmlns='http://jabber.org/protocol/disco#info'/>", to=ivan.bare)
    features = {f.get("var") for f in info.iter("{http://jabber.org/protocol/disco#info}feature")}
    assert "urn:xmpp:pep-vcard-conversion:0" in features, features

    photo = b"\xff\xd8\xff\xe0" + uuid.uuid4().bytes * 8  # JPEG magic, unique content
    digest = hashlib.sha1(photo).hexdigest()
    encoded = base64.b64encode(photo).decode()
    reply = ivan.iq("set", "<vCard xmlns='vcard-temp'><NICKNAME>g</NICKNAME><PHOTO>"
                           f"<TYPE>image/jpeg</TYPE><BINVAL>{encoded}</BINVAL></PHOTO></vCard>")
    assert reply.get("type") == "result", ET.tostring(reply)
    event = judy.event(AVATAR_METADATA, digest)
    info_el = event.find(f".//{{{AVATAR_METADATA}}}info")
    assert info_el is not None and info_el.get("id") == digest
    assert info_el.get("bytes") == str(len(photo)) and info_el.get("type") == "image/jpeg"
    data = judy.items(ivan.bare, "urn:xmpp:avatar:data")
    assert encoded in ET.tostring(data, encoding="unicode")
