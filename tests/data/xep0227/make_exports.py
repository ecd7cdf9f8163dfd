"""Regenerate the Prosody exports in this directory with the real tools.

    cd <checkout> && PYTHONPATH=$PWD .venv/bin/python tests/data/xep0227/make_exports.py

Needs Debian's prosody (0.12: `apt-get install prosody`). For each
password hash Prosody offers (`password_hash`: SHA-1, its default, and
SHA-256) it: writes a private Prosody configuration (tests/prosodyproc.py),
registers alice, bob and carol with `prosodyctl register`, starts Prosody
and has the users, logged in over XMPP, build what an administrator's
server holds (a roster through a real subscription handshake, a roster
item with a name and groups, a pending outbound and a pending inbound
request, a vCard, private XML bookmarks, an offline message), stops it, and
runs `prosody-migrator` from its `internal` storage to its `xep0227`
storage. The per-user files it writes (`<user>@<host>.xml`) are copied to
prosody-<hash>/ here unchanged. Prosody 0.12's xep0227 driver has no
offline-message store, so those files hold no offline messages.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from tests import prosodyproc  # noqa: E402
from tests.prosodyproc import ProsodyClient, ProsodySetup  # noqa: E402

DOMAIN = "localhost"
PASSWORDS = {"alice": "alice-old-pw", "bob": "bob-old-pw", "carol": "carol-old-pw"}
ROSTER_NS = "jabber:iq:roster"
VCARD = ("<vCard xmlns='vcard-temp'><FN>Alice Liddell</FN><N><FAMILY>Liddell</FAMILY>"
         "<GIVEN>Alice</GIVEN></N><NICKNAME>al</NICKNAME><EMAIL><INTERNET/>"
         "<USERID>alice@example.org</USERID></EMAIL><TITLE>Explorer</TITLE></vCard>")
BOOKMARKS = ("<storage xmlns='storage:bookmarks'><conference jid='tea@conference.example.org'"
             " name='Tea party' autojoin='true'><nick>alice</nick></conference></storage>")


def ping(client: ProsodyClient, n: int) -> None:
    """A round trip: everything the client sent before is handled (Prosody
    delivers to local users synchronously, so the contact's side too)."""
    client.iq(f"ping{n}", f"<iq type='get' id='ping{n}' to='{DOMAIN}'>"
                          "<ping xmlns='urn:xmpp:ping'/></iq>")


def populate(setup: ProsodySetup) -> None:
    alice = ProsodyClient(setup, "alice", PASSWORDS["alice"])
    bob = ProsodyClient(setup, "bob", PASSWORDS["bob"])
    assert alice.ok and bob.ok
    alice.iq("r1", f"<iq type='set' id='r1'><query xmlns='{ROSTER_NS}'>"
                   f"<item jid='bob@{DOMAIN}' name='Bob'><group>Friends</group>"
                   "<group>Tea</group></item></query></iq>")
    alice.raw.send(f"<presence/><presence to='bob@{DOMAIN}' type='subscribe'/>")
    ping(alice, 1)
    bob.raw.send(f"<presence/><presence to='alice@{DOMAIN}' type='subscribed'/>"
                 f"<presence to='alice@{DOMAIN}' type='subscribe'/>")
    ping(bob, 2)
    alice.raw.send(f"<presence to='bob@{DOMAIN}' type='subscribed'/>")
    # carol is offline: alice's request waits (ask) in her roster and as a
    # pending inbound request in carol's.
    alice.iq("r2", f"<iq type='set' id='r2'><query xmlns='{ROSTER_NS}'>"
                   f"<item jid='carol@{DOMAIN}' name='Carol'><group>Work</group></item>"
                   "</query></iq>")
    alice.raw.send(f"<presence to='carol@{DOMAIN}' type='subscribe'/>")
    alice.iq("r3", f"<iq type='set' id='r3'><query xmlns='{ROSTER_NS}'>"
                   "<item jid='dave@elsewhere.example' name='Dave'/></query></iq>")
    alice.iq("v1", f"<iq type='set' id='v1'>{VCARD}</iq>")
    alice.iq("p1", f"<iq type='set' id='p1'><query xmlns='jabber:iq:private'>{BOOKMARKS}"
                   "</query></iq>")
    alice.raw.send(f"<message to='carol@{DOMAIN}' type='chat' id='m1'>"
                   "<body>Tea at five?</body></message>")
    ping(alice, 3)
    alice.close()
    bob.close()


def export(hash_name: str, target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        setup = prosodyproc.new_setup(Path(tmp), DOMAIN,
                                      None if hash_name == "SHA-1" else hash_name)
        for user, password in PASSWORDS.items():
            setup.register(user, password)
        with prosodyproc.running(setup):
            populate(setup)
        out = Path(tmp) / "xep0227"
        setup.migrate(True, out)
        if target.exists():
            shutil.rmtree(target)
        target.mkdir()
        for file in sorted(out.glob("*.xml")):
            shutil.copyfile(file, target / file.name)
            print(f"wrote {target / file.name}")


def main() -> None:
    if not prosodyproc.available():
        sys.exit("make_exports: prosody, prosodyctl and prosody-migrator are needed")
    print(f"Prosody {prosodyproc.version()}")
    for hash_name in ("SHA-1", "SHA-256"):
        export(hash_name, HERE / f"prosody-{hash_name.lower().replace('-', '')}")


if __name__ == "__main__":
    main()
