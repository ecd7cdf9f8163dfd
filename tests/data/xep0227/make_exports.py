"""Regenerate the exports in this directory with the real tools.

    cd <checkout> && PYTHONPATH=$PWD .venv/bin/python tests/data/xep0227/make_exports.py \
        [prosody] [ejabberd]

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

ejabberd (Debian's 23.01, `apt-get install ejabberd`; the system service
is left alone) runs as its own node from a temp directory owned by the
ejabberd user: `ejabberdctl register` the same users, the same XMPP
session, `ejabberdctl export_piefxis`, whose files go to ejabberd/ here
unchanged.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from tests import prosodyproc  # noqa: E402
from tests.prosodyproc import PlainClient  # noqa: E402
from tests.serverproc import free_ports  # noqa: E402

DOMAIN = "localhost"
PASSWORDS = {"alice": "alice-old-pw", "bob": "bob-old-pw", "carol": "carol-old-pw"}
ROSTER_NS = "jabber:iq:roster"
VCARD = ("<vCard xmlns='vcard-temp'><FN>Alice Liddell</FN><N><FAMILY>Liddell</FAMILY>"
         "<GIVEN>Alice</GIVEN></N><NICKNAME>al</NICKNAME><EMAIL><INTERNET/>"
         "<USERID>alice@example.org</USERID></EMAIL><TITLE>Explorer</TITLE></vCard>")
BOOKMARKS = ("<storage xmlns='storage:bookmarks'><conference jid='tea@conference.example.org'"
             " name='Tea party' autojoin='true'><nick>alice</nick></conference></storage>")


def ping(client: PlainClient, n: int) -> None:
    """A round trip: everything the client sent before is handled (Prosody
    delivers to local users synchronously, so the contact's side too)."""
    client.iq(f"ping{n}", f"<iq type='get' id='ping{n}' to='{DOMAIN}'>"
                          "<ping xmlns='urn:xmpp:ping'/></iq>")


def populate(port: int) -> None:
    alice = PlainClient(port, DOMAIN, "alice", PASSWORDS["alice"])
    bob = PlainClient(port, DOMAIN, "bob", PASSWORDS["bob"])
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
            populate(setup.port)
        out = Path(tmp) / "xep0227"
        setup.migrate(True, out)
        if target.exists():
            shutil.rmtree(target)
        target.mkdir()
        for file in sorted(out.glob("*.xml")):
            shutil.copyfile(file, target / file.name)
            print(f"wrote {target / file.name}")


EJABBERD_CONFIG = """\
# Written by make_exports.py: a private ejabberd for XEP-0227 fixtures.
hosts:
  - {domain}
loglevel: info
listen:
  -
    port: {port}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    starttls_required: false
auth_method: internal
auth_password_format: scram
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
api_permissions:
  "console commands":
    from: ejabberd_ctl
    who: all
    what: "*"
modules:
  mod_disco: {{}}
  mod_offline: {{}}
  mod_ping: {{}}
  mod_private: {{}}
  mod_roster: {{}}
  mod_vcard: {{}}
"""
# The ejabberd node of this run (not the system's ejabberd@localhost).
EJABBERD_NODE = "xep0227-fixtures@localhost"


def ejabberd_export(target: Path) -> None:
    """ejabberd (Debian's, `auth_password_format: scram` as Debian ships
    it) in a temp directory owned by its user: `ejabberdctl register`,
    the same XMPP session as for Prosody, `ejabberdctl export_piefxis`."""
    import pwd

    (port,) = free_ports(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("conf", "spool", "logs", "out"):
            (root / name).mkdir()
        (root / "conf" / "ejabberd.yml").write_text(
            EJABBERD_CONFIG.format(domain=DOMAIN, port=port))
        (root / "conf" / "ejabberdctl.cfg").write_text(
            f'EJABBERD_PID_PATH={root}/spool/ejabberd.pid\n')
        user = pwd.getpwnam("ejabberd")
        os.chmod(root, 0o755)
        for path in [root, *root.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        ctl = ["ejabberdctl", "--config-dir", str(root / "conf"),
               "--config", str(root / "conf" / "ejabberd.yml"),
               "--ctl-config", str(root / "conf" / "ejabberdctl.cfg"),
               "--logs", str(root / "logs"), "--spool", str(root / "spool"),
               "--node", EJABBERD_NODE]

        def run(*args: str) -> str:
            proc = subprocess.run([*ctl, *args], capture_output=True, text=True,
                                  timeout=EJABBERD_TIMEOUT, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"ejabberdctl {' '.join(args)}: {proc.stdout}{proc.stderr}")
            return proc.stdout

        run("start")
        try:
            run("started")
            for name, password in PASSWORDS.items():
                run("register", name, DOMAIN, password)
            populate(port)
            run("export_piefxis", str(root / "out"))
        finally:
            subprocess.run([*ctl, "stop"], capture_output=True, timeout=EJABBERD_TIMEOUT,
                           check=False)
            subprocess.run([*ctl, "stopped"], capture_output=True, timeout=EJABBERD_TIMEOUT,
                           check=False)
        if target.exists():
            shutil.rmtree(target)
        target.mkdir()
        for file in sorted((root / "out").iterdir()):
            shutil.copyfile(file, target / file.name)
            print(f"wrote {target / file.name}")


# ejabberd takes a few seconds to start (Erlang, Mnesia).
EJABBERD_TIMEOUT = 120


def main() -> None:
    wanted = set(sys.argv[1:]) or {"prosody", "ejabberd"}
    if "prosody" in wanted:
        if not prosodyproc.available():
            sys.exit("make_exports: prosody, prosodyctl and prosody-migrator are needed")
        print(f"Prosody {prosodyproc.version()}")
        for hash_name in ("SHA-1", "SHA-256"):
            export(hash_name, HERE / f"prosody-{hash_name.lower().replace('-', '')}")
    if "ejabberd" in wanted:
        if not shutil.which("ejabberdctl"):
            sys.exit("make_exports: ejabberdctl is needed (apt-get install ejabberd)")
        ejabberd_export(HERE / "ejabberd")


if __name__ == "__main__":
    main()
