"""XEP-0215 external service discovery against a real server: configured
STUN/TURN services, TURN REST credentials a TURN server would accept, the
type filter and the credentials request; bad URIs refused at load."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlink.modules.external_services import parse_services
from tests.rawclient import RawClient, parse_stanzas, stanza_error_of
from tests.serverproc import MlinkProcess, mlink, start_mlink

DOMAIN = "localhost"
NS = "urn:xmpp:extdisco:2"
SECRET = "turn-shared-secret"
USERS = {"alice@localhost": "alice-pw"}
SERVICES = ("stun:stun.example.org turn:turn.example.org?transport=udp "
            "turns:turn.example.org:5350?transport=tcp stun:[2001:db8::1]:3479")
MODULE = (f'<modules><module name="external_services"><services>{SERVICES}</services>'
          f"<secret>{SECRET}</secret><ttl>3600</ttl></module></modules>")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("extdisco") / "s"
    with start_mlink(setup, DOMAIN, cert_files, users=USERS,
                     edit_config=lambda t: t.replace("<data ", MODULE + "\n  <data ", 1)) as p:
        yield p


def ask(client: RawClient, payload: str, stanza_id: str):  # type: ignore[no-untyped-def]
    client.send(f"<iq type='get' id='{stanza_id}' to='{DOMAIN}'>{payload}</iq>")
    text = client.read_until(rf"id=['\"]{stanza_id}['\"].*?</iq>|id=['\"]{stanza_id}['\"][^>]*/>")
    return next(s for s in parse_stanzas(text) if s.get("id") == stanza_id)


def test_services_and_turn_credentials(server, ca_file):
    client = RawClient(server.c2s_port, ca_file)
    client.login(DOMAIN, "alice@localhost", "alice-pw")
    info = ask(client, "<query xmlns='http://jabber.org/protocol/disco#info'/>", "d")
    assert any(f.get("var") == NS for f in info.iter("{http://jabber.org/protocol/disco#info}"
                                                       "feature"))
    reply = ask(client, f"<services xmlns='{NS}'/>", "s1")
    services = reply.findall(f"{{{NS}}}services/{{{NS}}}service")
    seen = [(s.get("type"), s.get("host"), s.get("port"), s.get("transport")) for s in services]
    assert seen == [("stun", "stun.example.org", "3478", "udp"),
                    ("turn", "turn.example.org", "3478", "udp"),
                    ("turn", "turn.example.org", "5350", "tcp"),
                    ("stun", "2001:db8::1", "3479", "udp")]
    assert services[0].get("username") is None
    turn = services[1]
    username, password = turn.get("username", ""), turn.get("password", "")
    expiry, _, user = username.partition(":")
    assert user == "alice@localhost" and turn.get("restricted") == "1"
    assert 3500 < int(expiry) - time.time() <= 3600
    # What a TURN server with the same secret computes (TURN REST API).
    expected = base64.b64encode(hmac.new(SECRET.encode(), username.encode(),
                                         hashlib.sha1).digest()).decode()
    assert password == expected
    only_turn = ask(client, f"<services xmlns='{NS}' type='turn'/>", "s2")
    assert {s.get("type") for s in only_turn.iter(f"{{{NS}}}service")} == {"turn"}
    creds = ask(client, f"<credentials xmlns='{NS}'><service host='turn.example.org' "
                        "type='turn' port='5350'/></credentials>", "c1")
    service = creds.find(f"{{{NS}}}credentials/{{{NS}}}service")
    assert service is not None and service.get("port") == "5350" and service.get("password")
    missing = ask(client, f"<credentials xmlns='{NS}'><service host='other.example' "
                          "type='turn'/></credentials>", "c2")
    assert stanza_error_of(missing)[1] == "item-not-found"
    client.close()


def test_bad_uris_are_refused_when_the_configuration_is_read(tmp_path, cert_files):
    with pytest.raises(ValueError, match="'http://x' is not a stun"):
        parse_services("stun:ok.example http://x")
    assert parse_services("turns:t.example")[0].port == 5349
    cert, key = cert_files
    mlink("init", str(tmp_path / "s"), "--domain", DOMAIN, "--tls-cert", str(cert),
          "--tls-key", str(key))
    config = tmp_path / "s" / "mlink.xml"
    config.write_text(config.read_text().replace(
        "<data ", '<modules><module name="external_services"><services>turn:bad_host'
        "</services></module></modules>\n  <data ", 1))
    checked = mlink("check", "--config", str(config), check=False)
    assert checked.returncode != 0
    assert re.search(r"mlink\.xml:\d+: .*'turn:bad_host' is not a stun", checked.stderr + checked.stdout)
