"""`mlink import` / `mlink export` (XEP-0227) as an administrator moving a
server uses them: users of a Prosody export log in to mlink with their old
passwords and find their rosters; bad files are one line and exit 2 with
nothing imported; an mlink export moves users and their offline messages
to another mlink, and back into Prosody.

The files in tests/data/xep0227 were written by Prosody 0.12's
`prosody-migrator` and ejabberd 23.01's `export_piefxis` (make_exports.py
there made them; README.md says how)."""

from __future__ import annotations

import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path
from unittest import mock

import pytest
import trio

from mlink.admin import xep0227
from mlink.config import load_config
from tests import prosodyproc
from tests import test_im_services as services
from tests.ldap_fixtures import private_slapd
from tests.rawclient import CLIENT_NS, RawClient
from tests.scramclient import scram_auth
from tests.serverproc import DOMAIN, MlinkProcess, mlink, serve, start_mlink, stop
from tests.test_directory_rosters import directory_xml
from tests.test_im_services import ALICE, BOB, USERS, Client, body_of

DATA = Path(__file__).parent / "data" / "xep0227"
# The passwords the users had on Prosody (make_exports.py).
OLD = {"alice@localhost": "alice-old-pw", "bob@localhost": "bob-old-pw",
       "carol@localhost": "carol-old-pw"}
ROSTER_NS = "jabber:iq:roster"
BOOKMARKS_NS = "storage:bookmarks"
# erin's password in a file that holds it in clear.
CLEAR_PASSWORD = "erin-clear-pw"
# Exit status of an import refused for its input (mlink/admin/cli.py).
BAD_INPUT = 2


class OldClient(Client):
    """A logged-in client of a migrated user, with the old password."""

    def __init__(self, server: MlinkProcess, ca_file: Path, user: str) -> None:
        with mock.patch.dict(services.USERS, {user: OLD[user]}):
            super().__init__(server, ca_file, user)


def init_for_serve(setup: Path, cert_files: tuple[Path, Path]) -> None:
    """`mlink init` as start_mlink does it (ports chosen by the kernel, the
    tests' certificate), for a setup filled before it is served."""
    cert, key = cert_files
    mlink("init", str(setup), "--c2s-port", "0", "--tls-port", "0", "--ws-port", "0",
          "--tls-cert", str(cert), "--tls-key", str(key))


def roster_of(client: Client) -> dict[str, ET.Element]:
    reply = client.iq("get", f"<query xmlns='{ROSTER_NS}'/>")
    assert reply.get("type") == "result", ET.tostring(reply)
    return {item.get("jid", ""): item for item in reply.iter(f"{{{ROSTER_NS}}}item")}


def groups_of(item: ET.Element) -> set[str]:
    return {g.text or "" for g in item.findall(f"{{{ROSTER_NS}}}group")}


def scram_login(server: MlinkProcess, ca_file: Path, user: str, password: str,
                mechanism: str) -> str:
    raw = RawClient(server.c2s_port, ca_file)
    try:
        raw.starttls(DOMAIN)
        return scram_auth(raw, user, password, mechanism)
    finally:
        raw.close()


def plain_login_fails(server: MlinkProcess, ca_file: Path, user: str, password: str) -> bool:
    raw = RawClient(server.c2s_port, ca_file)
    try:
        raw.starttls(DOMAIN)
        return "<failure" in raw.auth_plain(user, password)
    finally:
        raw.close()


@pytest.mark.parametrize(("export", "mechanism"), [("prosody-sha1", "SCRAM-SHA-1"),
                                                   ("prosody-sha256", "SCRAM-SHA-256"),
                                                   ("ejabberd", "SCRAM-SHA-1")])
def test_prosody_users_log_in_with_old_passwords_and_see_their_rosters(
        tmp_path: Path, cert_files, ca_file, export: str, mechanism: str) -> None:
    with start_mlink(tmp_path / "s", DOMAIN, cert_files) as server:
        # Imported while the server runs, as an administrator would.
        out = mlink("import", str(DATA / export), "--config", str(server.config))
        assert out.stdout.startswith("imported 3 accounts (3 new, 0 updated, 0 unchanged)")
        assert "4 roster items, 1 subscription requests, 1 vCards, 1 private XML" in out.stdout
        assert mlink("user", "list", "--config", str(server.config)).stdout.split() == sorted(OLD)
        # The SCRAM hash Prosody stored, and PLAIN (checked against it).
        assert scram_login(server, ca_file, "alice", OLD["alice@localhost"], mechanism) \
            == "success"
        assert scram_login(server, ca_file, "bob", "not-the-password", mechanism) \
            .startswith("not-authorized")
        assert plain_login_fails(server, ca_file, "carol@localhost", "wrong")
        alice = OldClient(server, ca_file, "alice@localhost")
        roster = roster_of(alice)
        assert set(roster) == {"bob@localhost", "carol@localhost", "dave@elsewhere.example"}
        bob = roster["bob@localhost"]
        assert (bob.get("subscription"), bob.get("name"), groups_of(bob)) == \
            ("both", "Bob", {"Friends", "Tea"})
        carol = roster["carol@localhost"]
        assert (carol.get("subscription"), carol.get("ask"), groups_of(carol)) == \
            ("none", "subscribe", {"Work"})
        private = alice.iq("get", "<query xmlns='jabber:iq:private'>"
                                  f"<storage xmlns='{BOOKMARKS_NS}'/></query>")
        conference = private.find(f".//{{{BOOKMARKS_NS}}}conference")
        assert conference is not None and conference.get("name") == "Tea party", \
            ET.tostring(private)
        vcard = alice.iq("get", "<vCard xmlns='vcard-temp'/>")
        assert vcard.findtext(".//{vcard-temp}NICKNAME") == "al", ET.tostring(vcard)
        alice.close()
        if mechanism == "SCRAM-SHA-1":
            # Only SHA-1 secrets came from Prosody: a SCRAM-SHA-256 client
            # fails until one PLAIN login (above) has derived the others.
            server.wait_for_log(r"SCRAM secrets of alice@localhost renewed")
            assert scram_login(server, ca_file, "alice", OLD["alice@localhost"],
                               "SCRAM-SHA-256") == "success"
            assert scram_login(server, ca_file, "bob", OLD["bob@localhost"],
                               "SCRAM-SHA-256").startswith("not-authorized")
        # carol was offline when alice asked: the request waits for her.
        carol_client = OldClient(server, ca_file, "carol@localhost")
        carol_client.send("<presence/>")
        request = carol_client.expect(
            lambda s: s.tag == f"{{{CLIENT_NS}}}presence" and s.get("type") == "subscribe",
            "alice's subscription request")
        assert request.get("from", "").startswith("alice@localhost")
        if export == "ejabberd":
            # ejabberd exports offline messages (Prosody 0.12's migrator cannot).
            message = carol_client.expect(lambda s: s.tag == f"{{{CLIENT_NS}}}message",
                                          "alice's offline message")
            assert (message.get("from"), body_of(message)) == \
                ("alice@localhost/mig", "Tea at five?")
        carol_client.close()


def test_import_twice_changes_nothing_the_second_time(tmp_path: Path) -> None:
    mlink("init", str(tmp_path / "s"))
    cfg = str(tmp_path / "s" / "mlink.xml")
    mlink("import", str(DATA / "prosody-sha1"), "--config", cfg)
    mlink("export", str(tmp_path / "first.xml"), "--config", cfg)
    again = mlink("import", str(DATA / "prosody-sha1"), "--config", cfg)
    assert again.stdout.strip() == (
        "imported 3 accounts (0 new, 0 updated, 3 unchanged); written: 0 roster items, "
        "0 subscription requests, 0 vCards, 0 private XML elements, 0 offline messages")
    mlink("export", str(tmp_path / "second.xml"), "--config", cfg)
    assert (tmp_path / "second.xml").read_bytes() == (tmp_path / "first.xml").read_bytes()


GOOD_USER = ("<user name='zed' password='zed-pw'><query xmlns='jabber:iq:roster'>"
             "<item jid='amy@localhost' subscription='both'/></query></user>")


def pie(users: str, host: str = "localhost") -> str:
    return (f"<server-data xmlns='urn:xmpp:pie:0'>\n<host jid='{host}'>\n{GOOD_USER}\n"
            f"{users}\n</host>\n</server-data>\n")


BAD_FILES = {
    "syntax": (pie("<user name='amy' password='x'>"), 5, "XML syntax error: mismatched tag"),
    "entity bomb": ("<?xml version='1.0'?>\n<!DOCTYPE lolz [<!ENTITY lol 'lol'>]>\n"
                    "<server-data xmlns='urn:xmpp:pie:0'>&lol;</server-data>", 2,
                    "forbidden XML construct: a DOCTYPE declaration"),
    "foreign host": (pie("", host="elsewhere.example"), 2, "not a domain this server serves"),
    "subscription": (pie("<user name='amy' password='x'><query xmlns='jabber:iq:roster'>"
                         "<item jid='zed@localhost' subscription='maybe'/></query></user>"),
                     4, "subscription 'maybe'"),
    "scram base64": (pie("<user name='amy'><scram-credentials xmlns='urn:xmpp:pie:0#scram' "
                         "mechanism='SCRAM-SHA-1'><iter-count>4096</iter-count><salt>c2FsdA=="
                         "</salt><stored-key>%%%</stored-key><server-key>AAAA</server-key>"
                         "</scram-credentials></user>"), 4, "<stored-key> is not base64"),
    "no credentials": (pie("<user name='amy'/>"), 4, "neither a password nor SCRAM"),
    "duplicate user": (pie(GOOD_USER), 4, "given twice"),
    "not pie": ("<roster/>", 1, "not a XEP-0227 file"),
    "include outside": ("<server-data xmlns='urn:xmpp:pie:0' "
                        "xmlns:xi='http://www.w3.org/2001/XInclude'>\n"
                        "<xi:include href='/etc/passwd'/></server-data>", 2,
                        "only a file name beside this file is followed"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_is_one_line_exit_2_and_nothing_is_imported(tmp_path: Path, case: str) -> None:
    mlink("init", str(tmp_path / "s"))
    cfg = str(tmp_path / "s" / "mlink.xml")
    text, line, problem = BAD_FILES[case]
    bad = tmp_path / "export.xml"
    bad.write_text(text)
    proc = mlink("import", str(bad), "--config", cfg, check=False)
    assert proc.returncode == BAD_INPUT, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"mlink: {bad}:{line}: "), lines[0]
    assert problem in lines[0]
    # zed, fine and first in the file, was not imported either.
    assert mlink("user", "list", "--config", cfg).stdout == ""


def test_an_export_moves_users_and_offline_messages_to_another_mlink(
        tmp_path: Path, cert_files, ca_file) -> None:
    users = {ALICE: USERS[ALICE], BOB: USERS[BOB]}
    with start_mlink(tmp_path / "old", DOMAIN, cert_files, users=users) as old:
        alice = Client(old, ca_file, ALICE)
        alice.iq("set", f"<query xmlns='{ROSTER_NS}'><item jid='{BOB}' name='Bobby'>"
                        "<group>Team</group></item></query>")
        for n in range(3):
            alice.message(BOB, f"while you were away {n}")
        assert alice.sync() == []
        alice.close()
        # Exported while the server runs.
        out = mlink("export", str(tmp_path / "all.xml"), "--config", str(old.config))
        assert out.stdout.strip() == f"exported 2 accounts to {tmp_path / 'all.xml'}"
    new_setup = tmp_path / "new"
    init_for_serve(new_setup, cert_files)
    imported = mlink("import", str(tmp_path / "all.xml"), "--config",
                     str(new_setup / "mlink.xml"))
    assert "3 offline messages" in imported.stdout
    # A server that kept clear passwords (ejabberd's `plain` format).
    clear = tmp_path / "clear.xml"
    clear.write_text("<server-data xmlns='urn:xmpp:pie:0'><host jid='localhost'>"
                     f"<user name='erin' password='{CLEAR_PASSWORD}'/></host></server-data>")
    mlink("import", str(clear), "--config", str(new_setup / "mlink.xml"))
    assert CLEAR_PASSWORD not in (new_setup / "directory.ldif").read_text()
    new = serve(new_setup / "mlink.xml", DOMAIN)
    try:
        bob = Client(new, ca_file, BOB)
        bob.send("<presence/>")
        got = [bob.expect(lambda s: s.tag == f"{{{CLIENT_NS}}}message", f"message {n}")
               for n in range(3)]
        assert [body_of(m) for m in got] == [f"while you were away {n}" for n in range(3)]
        bob.close()
        alice = Client(new, ca_file, ALICE)
        item = roster_of(alice)[BOB]
        assert (item.get("name"), groups_of(item)) == ("Bobby", {"Team"})
        alice.close()
        for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-1"):
            assert scram_login(new, ca_file, "erin", CLEAR_PASSWORD, mechanism) == "success"
        erin = RawClient(new.c2s_port, ca_file)
        assert erin.login(DOMAIN, "erin@localhost", CLEAR_PASSWORD).startswith("erin@localhost/")
        erin.close()
    finally:
        assert stop(new) == 0, new.log.text()


def test_an_mlink_export_imports_back_into_prosody(tmp_path: Path) -> None:
    """mlink export --per-user → prosody-migrator (xep0227 → internal) →
    Prosody: the users log in with their passwords and have their rosters."""
    assert prosodyproc.available(), "Debian's prosody is missing (tools/setup --test installs it)"
    mlink("init", str(tmp_path / "s"))
    cfg = str(tmp_path / "s" / "mlink.xml")
    mlink("import", str(DATA / "prosody-sha1"), "--config", cfg)
    out = mlink("export", "--per-user", str(tmp_path / "pie"), "--config", cfg)
    assert out.stdout.strip() == f"exported 3 accounts to 3 files in {tmp_path / 'pie'}"
    setup = prosodyproc.new_setup(tmp_path / "prosody", DOMAIN)
    setup.migrate(False, tmp_path / "pie")
    with prosodyproc.running(setup):
        assert prosodyproc.login_ok(setup, "alice", OLD["alice@localhost"])
        assert not prosodyproc.login_ok(setup, "alice", "not-the-password")
        client = prosodyproc.PlainClient(setup.port, DOMAIN, "alice", OLD["alice@localhost"])
        reply = client.iq("r", f"<iq type='get' id='r'><query xmlns='{ROSTER_NS}'/></iq>")
        client.close()
    assert "bob@localhost" in reply and "Friends" in reply and "subscription='both'" in reply


def test_a_prosody_export_imports_into_an_ldap_directory(tmp_path: Path, cert_files,
                                                         ca_file) -> None:
    """On LDAP the accounts are entries with the imported RFC 5803 secrets
    in authPassword (no userPassword: no password is known), and SCRAM
    with the old password works."""
    with private_slapd(tmp_path / "slapd", samples=False) as slapd, \
            start_mlink(tmp_path / "s", DOMAIN, cert_files, ldap=directory_xml(slapd)) as server:
        cfg = str(server.config)
        out = mlink("import", str(DATA / "prosody-sha1"), "--config", cfg)
        assert out.stdout.startswith("imported 3 accounts (3 new, 0 updated, 0 unchanged)")
        assert mlink("user", "list", "--config", cfg).stdout.split() == sorted(OLD)
        for user in ("alice", "carol"):
            assert scram_login(server, ca_file, user, OLD[f"{user}@localhost"],
                               "SCRAM-SHA-1") == "success"
        assert scram_login(server, ca_file, "bob", "alice-old-pw", "SCRAM-SHA-1") \
            .startswith("not-authorized")
        again = mlink("import", str(DATA / "prosody-sha1"), "--config", cfg)
        assert again.stdout.startswith("imported 3 accounts (0 new, 0 updated, 3 unchanged)")


MAM_PIE = "urn:xmpp:pie:0#mam"


def test_a_section_added_later_moves_its_data_both_ways(tmp_path: Path, monkeypatch) -> None:
    """The hook rooms and archives will use: a Section added to SECTIONS
    parses its element, writes in the import's transaction and adds its
    elements to the export; without it the element is only counted as
    skipped."""
    mlink("init", str(tmp_path / "s"))
    config = load_config(tmp_path / "s" / "mlink.xml")
    source = tmp_path / "in.xml"
    source.write_text(
        "<server-data xmlns='urn:xmpp:pie:0'><host jid='localhost'>"
        "<user name='zed' password='zed-pw'><archive xmlns='urn:xmpp:pie:0#mam'>"
        "<result xmlns='urn:xmpp:mam:2' id='a1'/><result xmlns='urn:xmpp:mam:2' id='a2'/>"
        "</archive></user></host></server-data>")
    summary, plan = trio.run(xep0227.run_import, config, source)
    assert summary.line(plan.skipped).endswith("; skipped: 1 <archive>")

    def parse(ctx: object, user: xep0227.UserData, elem: ET.Element) -> None:
        user.extra.setdefault("archive", []).extend(r.get("id") for r in elem)

    def write(conn: sqlite3.Connection, user: xep0227.UserData) -> int:
        for item in user.extra["archive"]:
            conn.execute("INSERT INTO module_archive (module, store, user, at, value) "
                         "VALUES ('test', 'archive', ?, 0, ?)", (user.jid, str(item).encode()))
        return len(user.extra["archive"])

    def export(conn: sqlite3.Connection) -> dict[str, list[ET.Element]]:
        out: dict[str, list[ET.Element]] = {}
        for user, value in conn.execute("SELECT user, value FROM module_archive ORDER BY id"):
            box = ET.Element(f"{{{MAM_PIE}}}archive", {"ids": bytes(value).decode()})
            out.setdefault(user, []).append(box)
        return out

    section = xep0227.Section("archive", (f"{{{MAM_PIE}}}archive",), parse, write, export)
    monkeypatch.setattr(xep0227, "SECTIONS", (*xep0227.SECTIONS, section))
    summary, plan = trio.run(xep0227.run_import, config, source)
    assert summary.line(plan.skipped).endswith("0 offline messages, 2 other items")
    trio.run(xep0227.run_export, config, tmp_path / "out.xml", False)
    exported = ET.parse(tmp_path / "out.xml").getroot()
    assert [a.get("ids") for a in exported.iter(f"{{{MAM_PIE}}}archive")] == ["a1", "a2"]


def test_size_limits_are_one_line_errors(tmp_path: Path, monkeypatch) -> None:
    """A file over the size an import reads, or a stanza over the element
    limit, is refused before anything is written (limits lowered here;
    the real ones are 256 MiB and 4 MiB)."""
    big_message = "x" * 2000
    source = tmp_path / "big.xml"
    source.write_text(
        "<server-data xmlns='urn:xmpp:pie:0'><host jid='localhost'>\n"
        "<user name='zed' password='zed-pw'><offline-messages>\n"
        f"<message xmlns='jabber:client' to='zed@localhost'><body>{big_message}</body>"
        "</message></offline-messages></user></host></server-data>")
    domains = frozenset({"localhost"})
    monkeypatch.setattr(xep0227, "MAX_ELEMENT_BYTES", 1000)
    with pytest.raises(xep0227.MigrationError) as element:
        xep0227.read_plan(source, domains)
    assert str(element.value).startswith(f"{source}:3: offline message of ")
    monkeypatch.setattr(xep0227, "MAX_FILE_BYTES", 1000)
    with pytest.raises(xep0227.MigrationError) as whole:
        xep0227.read_plan(source, domains)
    assert str(whole.value).startswith(f"{source}: ") and "larger than the 1000" in \
        str(whole.value)


def test_export_and_import_refuse_a_store_of_another_schema_version(tmp_path: Path) -> None:
    """A store written by another mlink (here: a newer one) is neither read
    nor migrated: one line, and the file is as it was."""
    from mlink.store import SCHEMA_VERSION

    mlink("init", str(tmp_path / "s"))
    cfg = str(tmp_path / "s" / "mlink.xml")
    mlink("import", str(DATA / "prosody-sha1"), "--config", cfg)
    db = tmp_path / "s" / "mlink.sqlite3"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    for command in (["export", str(tmp_path / "out.xml")],
                    ["import", str(DATA / "prosody-sha1")]):
        proc = mlink(*command, "--config", cfg, check=False)
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr.splitlines() == [
            f"mlink: {db}: store schema version {SCHEMA_VERSION + 1}, but this mlink has "
            f"version {SCHEMA_VERSION}: run it with the mlink the server runs (a server "
            "start migrates the store)"], proc.stderr
    assert not (tmp_path / "out.xml").exists()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    conn.close()


def test_offline_messages_lose_the_old_servers_archive_ids(tmp_path: Path) -> None:
    """A stanza-id the old server's archive gave (by the user or the domain)
    names nothing in this server's archive: left out on import; one by a
    room (another entity) is kept."""
    mlink("init", str(tmp_path / "s"))
    cfg = tmp_path / "s" / "mlink.xml"
    source = tmp_path / "offline.xml"
    source.write_text(pie(
        "<user name='amy' password='amy-pw'><offline-messages>"
        "<message xmlns='jabber:client' from='zed@localhost/x' to='amy@localhost' type='chat'>"
        "<body>kept</body><stanza-id xmlns='urn:xmpp:sid:0' by='amy@localhost' id='old-1'/>"
        "<stanza-id xmlns='urn:xmpp:sid:0' by='localhost' id='old-2'/>"
        "<stanza-id xmlns='urn:xmpp:sid:0' by='room@conference.localhost' id='r-1'/>"
        "</message></offline-messages></user>"))
    out = mlink("import", str(source), "--config", str(cfg))
    assert "1 offline messages" in out.stdout, out.stdout
    with sqlite3.connect(tmp_path / "s" / "mlink.sqlite3") as conn:
        (stanza,) = [bytes(row[0]).decode() for row in conn.execute(
            "SELECT stanza FROM offline_message WHERE user = 'amy@localhost'")]
    assert "<body>kept</body>" in stanza
    assert "old-1" not in stanza and "old-2" not in stanza and "r-1" in stanza
