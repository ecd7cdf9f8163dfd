"""XEP-0157 contact addresses against a real server: the serverinfo form
in the server's disco#info, and the XEP-0115 hash in the stream features
covering it (computed here independently, per XEP-0115 §5.4)."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rawclient import RawClient, parse_stanzas
from tests.serverproc import MlinkProcess, start_mlink

DOMAIN = "localhost"
INFO = "http://jabber.org/protocol/disco#info"
DATA = "jabber:x:data"
MODULE = ('<modules><module name="contact_addresses">'
          "<abuse>mailto:abuse@example.org xmpp:abuse@example.org</abuse>"
          "<security>mailto:security@example.org</security></module></modules>")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("contact") / "s"
    with start_mlink(setup, DOMAIN, cert_files, users={"alice@localhost": "alice-pw"},
                     edit_config=lambda t: t.replace("<data ", MODULE + "\n  <data ", 1)) as p:
        yield p


def xep0115_ver(query) -> str:  # type: ignore[no-untyped-def]
    """XEP-0115 §5.1/§5.4 from a disco#info result, written from the XEP."""
    s = ""
    ids = sorted((i.get("category", ""), i.get("type", ""), i.get("{http://www.w3.org/XML/"
                 "1998/namespace}lang", ""), i.get("name", ""))
                 for i in query.findall(f"{{{INFO}}}identity"))
    s += "".join(f"{c}/{t}/{lang}/{n}<" for c, t, lang, n in ids)
    s += "".join(f"{v}<" for v in sorted(f.get("var") for f in query.findall(f"{{{INFO}}}feature")))
    forms = []
    for form in query.findall(f"{{{DATA}}}x"):
        fields = {f.get("var"): sorted(v.text or "" for v in f.findall(f"{{{DATA}}}value"))
                  for f in form.findall(f"{{{DATA}}}field")}
        forms.append((fields.pop("FORM_TYPE")[0], fields))
    for form_type, fields in sorted(forms):
        s += f"{form_type}<"
        for var in sorted(fields):
            s += f"{var}<" + "".join(f"{v}<" for v in fields[var])
    return base64.b64encode(hashlib.sha1(s.encode()).digest()).decode()


def test_addresses_in_disco_and_in_the_caps_hash(server, ca_file):
    client = RawClient(server.c2s_port, ca_file)
    client.authenticate(DOMAIN, "alice@localhost", "alice-pw")
    client.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    client.read_until("</iq>")
    client.send(f"<iq type='get' id='d' to='{DOMAIN}'><query xmlns='{INFO}'/></iq>")
    text = client.read_until(r"id=['\"]d['\"].*?</iq>")
    iq = next(s for s in parse_stanzas(text) if s.get("id") == "d")
    query = iq.find(f"{{{INFO}}}query")
    assert query is not None
    form = query.find(f"{{{DATA}}}x")
    assert form is not None and form.get("type") == "result"
    fields = {f.get("var"): [v.text for v in f.findall(f"{{{DATA}}}value")]
              for f in form.findall(f"{{{DATA}}}field")}
    assert fields == {"FORM_TYPE": ["http://jabber.org/network/serverinfo"],
                      "abuse-addresses": ["mailto:abuse@example.org", "xmpp:abuse@example.org"],
                      "security-addresses": ["mailto:security@example.org"]}
    client.close()
    # The hash a new stream announces covers the form.
    fresh = RawClient(server.c2s_port, ca_file)
    announced = fresh.authenticate(DOMAIN, "alice@localhost", "alice-pw")
    ver = re.search(r"<c [^>]*ver=['\"]([^'\"]+)['\"]", announced)
    assert ver and ver.group(1) == xep0115_ver(query), announced
    fresh.close()
