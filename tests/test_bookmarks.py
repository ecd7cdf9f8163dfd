"""Bookmarks in step between XEP-0402 (PEP `urn:xmpp:bookmarks:1`),
XEP-0048 in private XML storage (XEP-0049) and XEP-0048 in PEP
(`storage:bookmarks`), as XEP-0411 and XEP-0402 §5.3 ask, over real
sockets: an old client's list appears to a new client, notified, and the
reverse; what one format cannot hold is kept; bad entries are skipped."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serverproc import DOMAIN, MlinkProcess, start_mlink
from tests.test_pep import PUBSUB, USERS, Client, error_with

NATIVE = "urn:xmpp:bookmarks:1"
LEGACY = "storage:bookmarks"
PRIVATE = "jabber:iq:private"
DISCO_INFO = "http://jabber.org/protocol/disco#info"
OWNER = "http://jabber.org/protocol/pubsub#owner"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    with start_mlink(tmp_path_factory.mktemp("bookmarks"), DOMAIN, cert_files,
                     users=USERS) as proc:
        yield proc


@pytest.fixture
def clients(server: MlinkProcess, ca_file: Path) -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


# XEP-0402 §3.3: what a client publishes bookmarks with.
OPTIONS = ("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
           "<value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
           "<field var='pubsub#persist_items'><value>true</value></field>"
           "<field var='pubsub#max_items'><value>max</value></field>"
           "<field var='pubsub#send_last_published_item'><value>never</value></field>"
           "<field var='pubsub#access_model'><value>whitelist</value></field></x>")


def room(name: str) -> str:
    return f"{name}@conference.{DOMAIN}"


def set_private(client: Client, storage: str) -> None:
    reply = client.iq("set", f"<query xmlns='{PRIVATE}'>{storage}</query>")
    assert reply.get("type") == "result", ET.tostring(reply)


def get_private(client: Client) -> ET.Element:
    reply = client.iq("get", f"<query xmlns='{PRIVATE}'><storage xmlns='{LEGACY}'/></query>")
    found = reply.find(f"{{{PRIVATE}}}query/{{{LEGACY}}}storage")
    assert found is not None, ET.tostring(reply)
    return found


def native_items(client: Client) -> dict[str, ET.Element]:
    reply = client.items(client.bare, NATIVE)
    assert reply.get("type") == "result", ET.tostring(reply)
    return {i.get("id", ""): i[0] for i in reply.iter(f"{{{PUBSUB}}}item")}


def legacy_conferences(storage: ET.Element) -> dict[str, ET.Element]:
    return {c.get("jid", ""): c for c in storage.findall(f"{{{LEGACY}}}conference")}


def test_features_on_the_account(server: MlinkProcess, ca_file: Path,
                                 clients: list[Client]) -> None:
    alice = Client(server, ca_file, "alice")
    clients.append(alice)
    info = alice.iq("get", f"<query xmlns='{DISCO_INFO}'/>", alice.bare)
    features = {f.get("var") for f in info.iter(f"{{{DISCO_INFO}}}feature")}
    assert {f"{NATIVE}#compat", f"{NATIVE}#compat-pep",
            "urn:xmpp:bookmarks-conversion:0"} <= features


def test_an_old_clients_bookmarks_reach_a_new_client_and_back(
        server: MlinkProcess, ca_file: Path, clients: list[Client]) -> None:
    new = Client(server, ca_file, "bob", notify=(NATIVE,))
    old = Client(server, ca_file, "bob")
    clients += [new, old]
    new.available()
    # The old client stores its list in private XML: two rooms and a URL.
    set_private(old, f"<storage xmlns='{LEGACY}'>"
                     f"<conference jid='{room('council')}' autojoin='1' name='Council'>"
                     "<nick>Puck</nick><password>titania</password></conference>"
                     f"<conference jid='{room('lobby')}'/>"
                     "<url name='Home' url='https://example.org/'/></storage>")
    event = new.event(NATIVE, room("council"))  # the new client is told
    assert event.get("from") == new.bare
    items = native_items(new)
    assert sorted(items) == [room("council"), room("lobby")]
    council = items[room("council")]
    assert council.tag == f"{{{NATIVE}}}conference"
    assert (council.get("autojoin"), council.get("name")) == ("true", "Council")
    assert council.findtext(f"{{{NATIVE}}}nick") == "Puck"
    assert council.findtext(f"{{{NATIVE}}}password") == "titania"
    assert items[room("lobby")].get("autojoin") == "false"
    # ... and the XEP-0048 PEP node holds the same list.
    legacy_pep = new.items(new.bare, LEGACY)
    storage = legacy_pep.find(f".//{{{LEGACY}}}storage")
    assert storage is not None and set(legacy_conferences(storage)) == set(items)

    # The new client adds a room and removes one: the old client's storage
    # follows, its URL kept.
    reply = new.publish(NATIVE, room("garden"), f"<conference xmlns='{NATIVE}' "
                                                "autojoin='true' name='Garden'><nick>Bob</nick>"
                                                "</conference>", OPTIONS)
    assert reply.get("type") == "result", ET.tostring(reply)
    gone = new.iq("set", f"<pubsub xmlns='{PUBSUB}'><retract node='{NATIVE}'>"
                         f"<item id='{room('lobby')}'/></retract></pubsub>")
    assert gone.get("type") == "result", ET.tostring(gone)
    storage = get_private(old)
    conferences = legacy_conferences(storage)
    assert sorted(conferences) == [room("council"), room("garden")]
    garden = conferences[room("garden")]
    assert (garden.get("autojoin"), garden.get("name")) == ("true", "Garden")
    assert garden.findtext(f"{{{LEGACY}}}nick") == "Bob"
    assert [u.get("url") for u in storage.findall(f"{{{LEGACY}}}url")] == \
        ["https://example.org/"]
    storage = new.items(new.bare, LEGACY).find(f".//{{{LEGACY}}}storage")
    assert storage is not None and sorted(legacy_conferences(storage)) == \
        [room("council"), room("garden")]

    # Deleting the XEP-0402 node empties the legacy list (the URL stays).
    deleted = new.iq("set", f"<pubsub xmlns='{OWNER}'><delete node='{NATIVE}'/></pubsub>")
    assert deleted.get("type") == "result", ET.tostring(deleted)
    storage = get_private(old)
    assert legacy_conferences(storage) == {}
    assert len(storage.findall(f"{{{LEGACY}}}url")) == 1


def test_extensions_survive_a_round_through_an_old_client(
        server: MlinkProcess, ca_file: Path, clients: list[Client]) -> None:
    carol = Client(server, ca_file, "carol")
    clients.append(carol)
    reply = carol.publish(NATIVE, room("ext"), f"<conference xmlns='{NATIVE}' autojoin='true'>"
                                               "<extensions><state xmlns='urn:example:x'/>"
                                               "</extensions></conference>", OPTIONS)
    assert reply.get("type") == "result", ET.tostring(reply)
    storage = get_private(carol)
    assert set(legacy_conferences(storage)) == {room("ext")}
    # The old client writes the list back as it read it, and adds a room.
    ET.SubElement(storage, f"{{{LEGACY}}}conference", {"jid": room("more")})
    set_private(carol, ET.tostring(storage, encoding="unicode"))
    items = native_items(carol)
    assert sorted(items) == [room("ext"), room("more")]
    assert items[room("ext")].find(f"{{{NATIVE}}}extensions/{{urn:example:x}}state") \
        is not None


def test_xep0048_over_pep_converts_too(server: MlinkProcess, ca_file: Path,
                                      clients: list[Client]) -> None:
    dave = Client(server, ca_file, "dave")
    clients.append(dave)
    reply = dave.publish(LEGACY, "current", f"<storage xmlns='{LEGACY}'>"
                                            f"<conference jid='{room('pep')}' autojoin='true'/>"
                                            "</storage>")
    assert reply.get("type") == "result", ET.tostring(reply)
    assert list(native_items(dave)) == [room("pep")]
    assert list(legacy_conferences(get_private(dave))) == [room("pep")]


def test_bad_legacy_entries_are_skipped_and_others_left_alone(
        server: MlinkProcess, ca_file: Path, clients: list[Client]) -> None:
    erin = Client(server, ca_file, "erin")
    clients.append(erin)
    # Not a room's bare JID (a full JID, a domain, garbage, none): skipped.
    set_private(erin, f"<storage xmlns='{LEGACY}'>"
                      f"<conference jid='{room('ok')}'/>"
                      f"<conference jid='{room('full')}/nick'/>"
                      f"<conference jid='conference.{DOMAIN}'/>"
                      "<conference jid='@@@'/><conference/></storage>")
    assert list(native_items(erin)) == [room("ok")]
    # Other private XML is no bookmark list: nothing converted from it.
    set_private(erin, "<prefs xmlns='urn:example:prefs'><conference jid='x@y'/></prefs>")
    assert list(native_items(erin)) == [room("ok")]
    # Someone else's bookmarks stay out of reach, whichever the format.
    frank = Client(server, ca_file, "frank")
    clients.append(frank)
    error_with(frank.items(erin.bare, NATIVE), "not-allowed", "closed-node")
    error_with(frank.items(erin.bare, LEGACY), "not-allowed", "closed-node")
