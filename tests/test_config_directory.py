"""Server configuration held in the directory (docs/directory.md): the
mapping's completeness, `mlink config import|export` round trips, a
server started from a server entry (embedded directory and a real slapd),
changes made in the directory applied without a restart and observed by
a client, and bad values refused with a line naming entry and attribute
while the running configuration stays.

Synchronisation is on what the server logs (a reload is logged once every
shard has applied it), never on sleeps."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from mlink.config import load_config
from mlink.config_directory import SHAPES, Places, config_entries, entries_tree
from mlink.config_dirschema import main as schema_main
from mlink.config_dirschema import schema_attributes, xml_name
from mlink.config_model import Config, ConfigurationSourceConfig
from mlink.directory.embedded import EmbeddedPort
from mlink.directory.ldif import Entry
from mlink.directory.port import Add, Modification
from tests.ldap_fixtures import Slapd, private_slapd
from tests.rawclient import RawClient, expect_stream_error, ping, read_stanza, stanza_error_of
from tests.serverproc import (
    ALICE,
    ALICE_PW,
    BOB,
    DOMAIN,
    MlinkProcess,
    free_ports,
    mlink,
    serve,
    stop,
)

ENTRY = "cn=xmpp,dc=localhost"
# A stanza over the lowered limit and well under the default one.
BIG_BODY = 20_000
LOWERED_LIMIT = 10_000
RELOADED = r"configuration reloaded by (\d+) of \1 shard"
REFUSED = "configuration reload refused: "
# A groupchat message under the MUC default (16 KiB) and over the limit set
# in the directory below.
MUC_BODY = 5000
MUC_LIMIT = 1000


def bootstrap_text(entry: str, directory: str) -> str:
    return (f'<mlink>\n  <configuration source="directory" entry="{entry}"/>\n'
            f"  {directory}\n  <data dir=\".\"/>\n</mlink>\n")


EMBEDDED = '<directory><embedded file="directory.ldif" base="dc=localhost"/></directory>'


def init_setup(setup: Path, cert_files: tuple[Path, Path], domain: str = DOMAIN,
               ports: list[int] | None = None) -> Path:
    """`mlink init` (the full XML file) on `ports` (c2s, tls, ws; default
    port 0, which only one shard can serve), with alice and bob; the
    directory's changes polled fast so a test waits little."""
    cert, key = cert_files
    c2s, tls, ws = (str(p) for p in ports or [0, 0, 0])
    mlink("init", str(setup), "--domain", domain, "--c2s-port", c2s, "--tls-port", tls,
          "--ws-port", ws, "--tls-cert", str(cert), "--tls-key", str(key),
          "--address", "127.0.0.1")
    config = setup / "mlink.xml"
    # The file's <directory> as the bootstrap files below have it.
    config.write_text(fast_changes(config.read_text()))
    if domain == DOMAIN:
        listing = setup / "users.txt"
        listing.write_text(f"{ALICE} {ALICE_PW}\n{BOB} bob-secret\n")
        mlink("user", "import", str(listing), "--config", str(config))
    return config


def fast_changes(directory: str) -> str:
    return directory.replace("<directory", '<directory changes-seconds="0.2"', 1)


def standalone(config: Config) -> Config:
    return dataclasses.replace(config, path=None, configuration=ConfigurationSourceConfig())


def set_limit(path: Path, value: int, out: Path) -> Path:
    text = path.read_text()
    text, n = re.subn(r'stanza-bytes="\d+"', f'stanza-bytes="{value}"', text)
    assert n == 1
    out.write_text(text)
    return out


def embedded_modify(ldif: Path, dn: str, attribute: str, value: str) -> None:
    """An edit of the embedded directory by another process (as `ldapmodify`
    is for slapd): through the port, which locks and rewrites the file."""
    async def run() -> None:
        port = EmbeddedPort(ldif, "dc=localhost")
        await port.modify(dn, [Modification("replace", attribute, (value,))])
    trio.run(run)


async def embedded_add(ldif: Path, entries: list[Entry]) -> None:
    await EmbeddedPort(ldif, "dc=localhost").write([Add(e) for e in entries])


def muc_message_error(client: RawClient) -> str:
    """The error condition of a MUC_BODY groupchat message to a room that
    does not exist: too large is checked first (policy-violation), else
    there is no such room (item-not-found)."""
    stanza_id = "m-" + uuid.uuid4().hex[:8]
    client.send(f"<message to='nosuchroom@conference.{DOMAIN}' type='groupchat' "
                f"id='{stanza_id}'><body>{'y' * MUC_BODY}</body></message>")
    return stanza_error_of(read_stanza(client, "message", stanza_id))[1]


def big_message_refused(server: MlinkProcess, ca_file: Path) -> None:
    client = RawClient(server.c2s_port, ca_file)
    try:
        client.login(server.domain, ALICE, ALICE_PW, resource="big")
        client.send(f"<message to='{BOB}'><body>{'x' * BIG_BODY}</body></message>")
        expect_stream_error(client, "policy-violation")
    finally:
        client.close()


def big_message_accepted(server: MlinkProcess, ca_file: Path) -> None:
    client = RawClient(server.c2s_port, ca_file)
    try:
        client.login(server.domain, ALICE, ALICE_PW, resource="big-ok")
        client.send(f"<message to='{BOB}'><body>{'x' * BIG_BODY}</body></message>")
        assert ping(client, server.domain).get("type") == "result"
    finally:
        client.close()


# -- the mapping -----------------------------------------------------------------------


def test_schema_files_are_generated_from_the_configuration_schema() -> None:
    """Every setting has an attribute in conf/mlink-config.*, whose name
    maps back to the setting: the two cannot drift."""
    assert schema_main(["--check"]) == 0
    attributes = schema_attributes()
    for name, item in attributes.items():
        assert xml_name(name) == item.xml, name
        assert xml_name(name.lower()) == item.xml, name  # LDAP names have no case
    known = {item.xml for item in attributes.values()}
    for tag, names in SHAPES.attributes.items():
        assert names <= known, (tag, names - known)
    for tag, names in SHAPES.texts.items():
        assert names <= known, (tag, names - known)
    assert xml_name("mlinkCfgNoSuchSetting") is None


def test_bad_entries_are_named_with_their_attribute(tmp_path: Path,
                                                    cert_files: tuple[Path, Path]) -> None:
    config = load_config(init_setup(tmp_path / "s", cert_files, domain="example.com"))
    entries = config_entries(config, "cn=a,dc=x", tmp_path)
    places = Places("ldap://h")
    tree = entries_tree(entries, "cn=a,dc=x", places)
    assert tree.find("domain") is not None and tree.find("listen") is not None
    limits = next(e for e in entries if e.dn.startswith("cn=limits,"))
    limits.attrs["mlinkCfgUnknownThing"] = ["1"]
    with pytest.raises(Exception, match=r"^ldap://h/cn=limits,cn=a,dc=x: mlinkCfgUnknownThing: "
                                        r"not an mlink configuration attribute"):
        entries_tree(entries, "cn=a,dc=x", Places("ldap://h"))
    del limits.attrs["mlinkCfgUnknownThing"]
    limits.attrs["mlinkCfgStanzaBytes"] = ["1", "2"]
    with pytest.raises(Exception, match="mlinkCfgStanzaBytes: takes one value, found 2"):
        entries_tree(entries, "cn=a,dc=x", Places("ldap://h"))
    limits.attrs["mlinkCfgStanzaBytes"] = ["1"]
    limits.dn = "ou=limits,cn=a,dc=x"
    with pytest.raises(Exception, match="ou=limits,cn=a,dc=x: not a configuration entry"):
        entries_tree(entries, "cn=a,dc=x", Places("ldap://h"))
    with pytest.raises(Exception, match="cn=b,dc=x: no such entry"):
        entries_tree(entries, "cn=b,dc=x", Places("ldap://h"))
    limits.dn = "cn=limits-1,cn=a,dc=x"
    with pytest.raises(Exception, match="<limits> appears once in <mlink>: name the entry "
                                        "cn=limits"):
        entries_tree(entries, "cn=a,dc=x", Places("ldap://h"))
    limits.dn = "cn=limits,cn=a,dc=x"
    limits.attrs["mlinkCfgStanzaBytes"] = [b"\xff\xfe"]
    with pytest.raises(Exception, match="mlinkCfgStanzaBytes: value is not UTF-8 text"):
        entries_tree(entries, "cn=a,dc=x", Places("ldap://h"))
    limits.attrs["mlinkCfgStanzaBytes"] = ["1" * (1024 * 1024 + 1)]
    with pytest.raises(Exception, match=r"^ldap://h/cn=a,dc=x: its entries hold more than "
                                        "1048576 bytes"):
        entries_tree(entries, "cn=a,dc=x", Places("ldap://h"))


def test_hostile_subtrees_are_refused(embedded_setup: tuple[Path, Path]) -> None:
    """A bootstrap element held in the directory, and a subtree too large
    to be a configuration (a wrong DN naming a whole directory), are
    refused with one line; nothing is read half."""
    _, boot = embedded_setup
    ldif = boot.parent / "directory.ldif"

    def element(dn: str, **attrs: str) -> Entry:
        return Entry(dn, {"objectClass": ["top", "mlinkConfigElement"], "cn": [dn[3:].split(",")[0]],
                          **{k: [v] for k, v in attrs.items()}})

    trio.run(embedded_add, ldif, [element(f"cn=directory,{ENTRY}", mlinkCfgBackend="ldap")])
    done = mlink("check", "--config", str(boot), check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert f"/cn=directory,{ENTRY}: <directory> belongs in the bootstrap file" in done.stderr
    trio.run(embedded_add, ldif,
             [element(f"cn=group-{i},cn=directory,{ENTRY}") for i in range(1001)])
    done = mlink("check", "--config", str(boot), check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert f"/{ENTRY}: cannot read the configuration: more than 1000 entries" in done.stderr


# -- embedded directory ------------------------------------------------------------------


@pytest.fixture
def embedded_setup(tmp_path: Path, cert_files: tuple[Path, Path]) -> Iterator[tuple[Path, Path]]:
    """(the full XML file, the bootstrap file) of one setup directory,
    with the configuration imported into the embedded directory; fixed free
    ports, so that the server can run two shards."""
    setup = tmp_path / "setup"
    full = init_setup(setup, cert_files, ports=free_ports(3))
    boot = setup / "boot.xml"
    boot.write_text(bootstrap_text(ENTRY, fast_changes(EMBEDDED)))
    done = mlink("config", "import", str(full), "--config", str(boot))
    assert f"/{ENTRY} (" in done.stdout
    yield full, boot


def test_import_export_round_trip(embedded_setup: tuple[Path, Path], tmp_path: Path) -> None:
    full, boot = embedded_setup
    # Non-default settings of every shape: texts, module options, a
    # disabled module, an element holding attributes (<log>).
    text = full.read_text().replace("<domain>localhost</domain>",
                                    "<domain>localhost</domain><domain>other.example</domain>")
    text, n = re.subn(r'<log level="info"', '<log level="debug"', text)
    assert n == 1
    text = text.replace("</mlink>", "<modules>"
                        '<module name="carbons" enabled="false"/>'
                        '<module name="muc"><max-occupants>50</max-occupants></module>'
                        "</modules><websocket><origin>https://a.example</origin>"
                        "<origin>https://b.example</origin></websocket></mlink>")
    richer = full.with_name("richer.xml")
    richer.write_text(text)
    mlink("config", "import", str(richer), "--config", str(boot))
    assert standalone(load_config(boot)) == standalone(load_config(richer))
    out = tmp_path / "exported.xml"
    done = mlink("config", "export", str(out), "--config", str(boot))
    assert str(out) in done.stdout
    assert out.stat().st_mode & 0o777 == 0o600  # may hold secrets
    assert standalone(load_config(out)) == standalone(load_config(richer))
    # Importing what is there changes nothing; exporting over a file needs --force.
    again = mlink("config", "import", str(out), "--config", str(boot))
    assert "already holds this configuration" in again.stdout
    refused = mlink("config", "export", str(out), "--config", str(boot), check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "exists (use --force" in refused.stderr
    mlink("config", "export", str(out), "--config", str(boot), "--force")
    printed = mlink("config", "export", "-", "--config", str(boot))
    assert "<module name=\"muc\">" in printed.stdout


def test_invalid_import_changes_nothing(embedded_setup: tuple[Path, Path]) -> None:
    full, boot = embedded_setup
    ldif = boot.parent / "directory.ldif"
    before = ldif.read_bytes()
    cases = {
        "bad-value.xml": (full.read_text().replace('stanza-bytes="262144"', 'stanza-bytes="12"'),
                          "'stanza-bytes' on <limits> must be at least"),
        "not-xml.xml": ("<mlink><domain>", "XML syntax error"),
        "bootstrap.xml": (boot.read_text(), "is a bootstrap file"),
        "huge.xml": ("<mlink>" + " " * (1024 * 1024 + 10) + "</mlink>", "larger than"),
    }
    for name, (text, problem) in cases.items():
        path = boot.parent / name
        path.write_text(text)
        done = mlink("config", "import", str(path), "--config", str(boot), check=False)
        assert done.returncode == 1, name
        assert done.stderr.startswith(f"mlink: {path}"), done.stderr
        assert problem in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr
    assert ldif.read_bytes() == before
    # Not a bootstrap file, no action: one line each.
    for args in (["config", "export", "x.xml", "--config", str(full)], ["config"]):
        done = mlink(*args, check=False)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr


def test_bad_directory_value_refuses_to_start(embedded_setup: tuple[Path, Path]) -> None:
    _, boot = embedded_setup
    ldif = boot.parent / "directory.ldif"
    embedded_modify(ldif, f"cn=limits,{ENTRY}", "mlinkCfgStanzaBytes", "lots")
    done = mlink("serve", "--config", str(boot), check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(
        f"mlink: embedded:{ldif}/cn=limits,{ENTRY}: mlinkCfgStanzaBytes: "
        "'stanza-bytes' on <limits> must be a whole number, not 'lots'"), done.stderr
    # A setting that belongs in the bootstrap file is refused where it is.
    boot.write_text(boot.read_text().replace("<data", '<listen type="c2s" port="0"/><data'))
    done = mlink("check", "--config", str(boot), check=False)
    assert done.returncode == 1 and f"{boot}:4: <listen> is read from the directory" \
        in done.stderr, done.stderr


def test_server_follows_its_entry_live(embedded_setup: tuple[Path, Path],
                                       ca_file: Path) -> None:
    full, boot = embedded_setup
    ldif = boot.parent / "directory.ldif"
    # Two shards: the supervisor checks the change once, each shard reads
    # and applies it (RELOADED is logged once both have).
    server = serve(boot, DOMAIN, shards=2)
    try:
        established = RawClient(server.c2s_port, ca_file)
        established.login(DOMAIN, ALICE, ALICE_PW, resource="before")
        big_message_accepted(server, ca_file)
        # The first read of the entry matched what the server started with.
        assert server.log.find("changed in the directory: reloading") is None
        # A MUC setting added in the directory (a module entry, as an
        # administrator's ldapadd would): the service applies it live.
        assert muc_message_error(established) == "item-not-found"  # not too large: no room
        mark = server.log.mark()
        trio.run(embedded_add, ldif, [
            Entry(f"cn=modules,{ENTRY}", {"objectClass": ["top", "mlinkConfigElement"],
                                          "cn": ["modules"]}),
            Entry(f"cn=module-1,cn=modules,{ENTRY}", {
                "objectClass": ["top", "mlinkConfigElement"], "cn": ["module-1"],
                "mlinkCfgName": ["muc"], "mlinkCfgMaxMessageBytes": [str(MUC_LIMIT)]})])
        server.wait_for_log(RELOADED, since=mark)
        assert muc_message_error(established) == "policy-violation"
        # `mlink config import` against the running server: applied live.
        mark = server.log.mark()
        lowered = set_limit(full, LOWERED_LIMIT, full.with_name("lowered.xml"))
        mlink("config", "import", str(lowered), "--config", str(boot))
        server.wait_for_log(RELOADED, since=mark)
        big_message_refused(server, ca_file)
        # A bad value edited in the directory: refused, named, old value kept.
        mark = server.log.mark()
        embedded_modify(ldif, f"cn=limits,{ENTRY}", "mlinkCfgStanzaBytes", "9x")
        line = server.wait_for_log(REFUSED + r"(.*)", since=mark).group(1)
        assert line.startswith(f"embedded:{ldif}/cn=limits,{ENTRY}: mlinkCfgStanzaBytes: "), line
        assert server.log.find(RELOADED, since=mark) is None
        status = mlink("status", "--config", str(boot)).stdout
        assert f"last configuration change refused: {line}" in status, status
        big_message_refused(server, ca_file)
        # A listener moved to another address: closed and reopened on both
        # shards, live; the session accepted on the old one stays.
        mark = server.log.mark()
        embedded_modify(ldif, f"cn=limits,{ENTRY}", "mlinkCfgStanzaBytes", str(LOWERED_LIMIT))
        server.wait_for_log(RELOADED, since=mark)
        mark = server.log.mark()
        embedded_modify(ldif, f"cn=listen-1,{ENTRY}", "mlinkCfgAddress", "127.0.0.2")
        server.wait_for_log(RELOADED, since=mark)
        for shard in (0, 1):
            server.wait_for_log(rf"shard-{shard} .*listening for c2s .* on 127\.0\.0\.2 port "
                                f"{server.c2s_port}", since=mark)
        status = mlink("status", "--config", str(boot)).stdout
        assert f"c2s 127.0.0.2:{server.c2s_port}" in status, status
        assert "needs a restart" not in status and "refused" not in status
        moved = RawClient(server.c2s_port, ca_file, host="127.0.0.2")
        try:
            moved.login(DOMAIN, ALICE, ALICE_PW, resource="moved")
        finally:
            moved.close()
        with pytest.raises(ConnectionRefusedError):
            RawClient(server.c2s_port, ca_file)
        # The established session was never disturbed.
        assert ping(established, DOMAIN).get("type") == "result"
        established.close()
        assert server.proc.poll() is None
    finally:
        assert stop(server) == 0, server.log.text()


# -- a real slapd ------------------------------------------------------------------------------


@pytest.fixture
def ldap_served(slapd: Slapd, tmp_path: Path, cert_files: tuple[Path, Path]
                ) -> Iterator[tuple[MlinkProcess, Path, str]]:
    """A server whose configuration is the entry `cn=xmpp-...` in a real
    slapd (imported with `mlink config import`): (server, bootstrap, DN)."""
    if not slapd.running:
        slapd.start()
    entry = f"cn=xmpp-{tmp_path.name[-20:].replace('_', '-')},{slapd.base_dn}"
    directory = fast_changes(
        f'<directory backend="ldap"><ldap base="{slapd.base_dn}" bind-dn="{slapd.bind_dn}" '
        f'bind-password="{slapd.bind_password}" pool-size="2" timeout="2">'
        f"<server>{slapd.url}</server></ldap></directory>")
    setup = tmp_path / "setup"
    full = init_setup(setup, cert_files, domain="example.com")
    boot = setup / "boot.xml"
    boot.write_text(bootstrap_text(entry, directory))
    mlink("config", "import", str(full), "--config", str(boot))
    found = slapd.search(entry, attrs=("mlinkCfgStanzaBytes",), scope="one")
    assert any(e.first("mlinkCfgStanzaBytes") == "262144" for e in found), found
    server = serve(boot, "example.com", shards=1)
    try:
        yield server, boot, entry
    finally:
        code = stop(server)
        if not slapd.running:
            slapd.start()
        slapd.ldapdelete(entry, recursive=True)
        assert code == 0, server.log.text()


def ldap_big(server: MlinkProcess, ca_file: Path, expect_refused: bool) -> None:
    """alice@example.com (conf/users.ldif) sends a BIG_BODY message."""
    client = RawClient(server.c2s_port, ca_file)
    try:
        client.login("example.com", "alice@example.com", "alice-secret", resource="r")
        client.send(f"<message to='bob@example.com'><body>{'x' * BIG_BODY}</body></message>")
        if expect_refused:
            expect_stream_error(client, "policy-violation")
        else:
            assert ping(client, "example.com").get("type") == "result"
    finally:
        client.close()


def set_ldap_limit(slapd: Slapd, entry: str, value: object) -> None:
    slapd.ldapmodify(f"dn: cn=limits,{entry}\nchangetype: modify\n"
                     f"replace: mlinkCfgStanzaBytes\nmlinkCfgStanzaBytes: {value}\n")


def test_ldapmodify_applies_without_restart(slapd: Slapd, ldap_served: tuple[MlinkProcess,
                                                                            Path, str],
                                            tmp_path: Path, ca_file: Path) -> None:
    server, boot, entry = ldap_served
    # What slapd hands back (bonsai reads numbers and TRUE as int and bool)
    # compares equal to what was written: a second import changes nothing.
    again = mlink("config", "import", str(boot.parent / "mlink.xml"), "--config", str(boot))
    assert "already holds this configuration" in again.stdout, again.stdout
    ldap_big(server, ca_file, expect_refused=False)
    mark = server.log.mark()
    set_ldap_limit(slapd, entry, LOWERED_LIMIT)
    server.wait_for_log(RELOADED, since=mark)
    ldap_big(server, ca_file, expect_refused=True)
    # An invalid value: refused with entry and attribute, old value kept.
    mark = server.log.mark()
    set_ldap_limit(slapd, entry, 12)
    line = server.wait_for_log(REFUSED + r"(.*)", since=mark).group(1)
    assert line.startswith(f"{slapd.url}/cn=limits,{entry}: mlinkCfgStanzaBytes: "
                           "'stanza-bytes' on <limits> must be at least"), line
    ldap_big(server, ca_file, expect_refused=True)
    # The old value back, and a domain added: that needs a restart.
    mark = server.log.mark()
    slapd.ldapmodify(f"dn: cn=limits,{entry}\nchangetype: modify\n"
                     f"replace: mlinkCfgStanzaBytes\nmlinkCfgStanzaBytes: {LOWERED_LIMIT}\n"
                     f"\ndn: {entry}\nchangetype: modify\nadd: mlinkCfgDomain\n"
                     "mlinkCfgDomain: second.example\n")
    server.wait_for_log(r"domains \(<domain>\) changed in the directory entry .*"
                        "needs a restart", since=mark)
    # A deleted child entry is noticed (a poll, not modifyTimestamp).
    mark = server.log.mark()
    slapd.ldapdelete(f"cn=listen-2,{entry}")
    server.wait_for_log(r"stopped listening for tls ", since=mark)
    # Export gives what the directory holds now.
    out = tmp_path / "now.xml"
    mlink("config", "export", str(out), "--config", str(boot))
    now = load_config(out)
    assert now.domains == ("example.com", "second.example")
    assert now.limits.max_stanza_bytes == LOWERED_LIMIT


def test_directory_outage_keeps_the_running_configuration(
        slapd: Slapd, ldap_served: tuple[MlinkProcess, Path, str], ca_file: Path) -> None:
    """slapd stopped under a running server: the outage is logged once,
    sessions stay, the configuration in force stays; when slapd is back, a
    change made meanwhile is applied."""
    server, _, entry = ldap_served
    established = RawClient(server.c2s_port, ca_file)
    established.login("example.com", "alice@example.com", "alice-secret", resource="stay")
    mark = server.log.mark()
    with slapd.stopped():
        server.wait_for_log(rf"configuration entry {re.escape(entry)}: cannot read the "
                            "directory", since=mark)
        assert ping(established, "example.com").get("type") == "result"
    server.wait_for_log(rf"configuration entry {re.escape(entry)}: directory reachable again",
                        since=mark)
    assert len(re.findall("cannot read the directory", server.log.text()[0:])) == 1
    mark = server.log.mark()
    set_ldap_limit(slapd, entry, LOWERED_LIMIT)
    server.wait_for_log(RELOADED, since=mark)
    assert server.log.find(REFUSED, since=0) is None
    ldap_big(server, ca_file, expect_refused=True)
    assert ping(established, "example.com").get("type") == "result"
    established.close()


def test_console_status_page_shows_waiting_and_refused_changes() -> None:
    """The console's status page (its template, as the console renders it)
    names the settings waiting for a restart and the last refused change,
    escaped."""
    import jinja2

    from mlink.console.app import TEMPLATES, _duration

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
    status = {"version": "x", "pid": 1, "uptime": 5.0, "shards": [],
              "configuration": {"source": f"the directory entry {ENTRY}",
                                "restart_needed": ["listeners (<listen>)"],
                                "reload_refused": "ldap://h/cn=limits: mlinkCfgX: <bad>"}}
    html = env.get_template("status.html").render(
        status=status, duration=_duration, session=None, flash=None, errors={}, csrf="")
    assert (f"Configuration (the directory entry {ENTRY}) changed; these settings need a "
            "restart to apply: listeners (&lt;listen&gt;).") in html
    assert "Last configuration change refused: ldap://h/cn=limits: mlinkCfgX: &lt;bad&gt;" in html
    status["configuration"] = {"source": "f", "restart_needed": [], "reload_refused": None}
    html = env.get_template("status.html").render(
        status=status, duration=_duration, session=None, flash=None, errors={}, csrf="")
    assert "restart to apply" not in html and "refused" not in html


GARBAGE = ["", " ", "-1", "0", "99999999999999999999", "x" * 5000, "<a/>&amp;", "\u0000",
           "true", "dc=", "ldap://", "../../etc/passwd", "\u00e9\u4e2d"]


def test_any_value_anywhere_is_a_one_line_error_or_accepted(tmp_path: Path,
                                                            cert_files: tuple[Path, Path]
                                                            ) -> None:
    """Hostile values in every attribute of every entry, and every
    configuration attribute on an entry it does not belong to: each gives
    a Config or a one-line ConfigError naming the entry, never another
    exception."""
    from mlink.config import ConfigError
    from mlink.config_directory import bootstrap_of, build_config

    setup = tmp_path / "s"
    full = load_config(init_setup(setup, cert_files, domain="example.com"))
    boot_path = setup / "boot.xml"
    boot_path.write_text(bootstrap_text(ENTRY, EMBEDDED))
    boot = bootstrap_of(boot_path)
    base = config_entries(full, ENTRY, setup)
    assert standalone(build_config(boot, base)).limits == full.limits
    tried = refused = 0

    def attempt(entries: list[Entry], dn: str) -> None:
        nonlocal tried, refused
        tried += 1
        try:
            build_config(boot, entries)
        except ConfigError as exc:
            refused += 1
            assert "\n" not in str(exc)
            assert str(exc).startswith(f"embedded:{setup / 'directory.ldif'}/"), str(exc)

    for index, entry in enumerate(base):
        for name in [n for n in entry.attrs if n.lower() not in ("objectclass", "cn")]:
            for value in GARBAGE:
                entries = [e.copy() for e in base]
                entries[index].attrs[name] = [value]
                attempt(entries, entry.dn)
        for name in list(schema_attributes())[::7]:
            entries = [e.copy() for e in base]
            entries[index].attrs[name] = ["1"]
            attempt(entries, entry.dn)
    assert tried > 100 and refused > tried // 2, (tried, refused)
    # The same over-long path in the file is one line too (it was an OSError).
    text = (setup / "mlink.xml").read_text()
    bad, n = re.subn(r'<tls certificate="[^"]*"', f'<tls certificate="{"x" * 5000}"', text)
    assert n == 1
    (setup / "long.xml").write_text(bad)
    with pytest.raises(ConfigError, match=r"long\.xml:\d+: 'certificate' on <tls>: cannot use "):
        load_config(setup / "long.xml")


# -- secrets in the directory ------------------------------------------------------------------

PUSH_SECRET = "push-secret-from-a-file-0123"
INLINE_SECRET = "inline-component-secret-0123"
TURN_SECRET = "turn-shared-secret-0123456"


def with_secrets(full: Path) -> None:
    """Add a component whose secret is in a file (0600, beside the file), one
    whose secret is inline, and a TURN secret (external_services)."""
    secret = full.parent / "push-secret"
    secret.write_text(PUSH_SECRET + "\n")
    secret.chmod(0o600)
    text = full.read_text()
    extra = ('  <components port="0">\n'
             '    <component name="push.example.com" secret-file="push-secret"/>\n'
             f'    <component name="other.example.com" secret="{INLINE_SECRET}"/>\n'
             "  </components>\n"
             '  <modules><module name="external_services">'
             "<services>turn:turn.example.org</services>"
             f"<secret>{TURN_SECRET}</secret></module></modules>\n")
    text = text.replace("</mlink>", extra + "</mlink>")
    full.write_text(text)


def ldap_bootstrap(slapd: Slapd, tmp_path: Path, cert_files: tuple[Path, Path]
                   ) -> tuple[Path, Path, str]:
    """A full configuration with secrets and a bootstrap naming an entry in
    the real slapd: (full file, bootstrap, entry DN)."""
    if not slapd.running:
        slapd.start()
    entry = f"cn=sec-{tmp_path.name[-20:].replace('_', '-')},{slapd.base_dn}"
    directory = (
        f'<directory backend="ldap"><ldap base="{slapd.base_dn}" bind-dn="{slapd.bind_dn}" '
        f'bind-password="{slapd.bind_password}" pool-size="2" timeout="2">'
        f"<server>{slapd.url}</server></ldap></directory>")
    setup = tmp_path / "setup"
    full = init_setup(setup, cert_files, domain="example.com")
    with_secrets(full)
    boot = setup / "boot.xml"
    boot.write_text(bootstrap_text(entry, directory))
    return full, boot, entry


def test_secret_file_stays_a_reference_through_import_and_export(
        slapd: Slapd, tmp_path: Path, cert_files: tuple[Path, Path]) -> None:
    """`secret-file` is imported as mlinkCfgSecretFile (the file's name),
    never as the secret it holds, and exported as `secret-file` again; the
    configuration read back holds the secret (read from the file)."""
    full, boot, entry = ldap_bootstrap(slapd, tmp_path, cert_files)
    try:
        mlink("config", "import", str(full), "--config", str(boot))
        components = {e.first("mlinkCfgName"): e for e in slapd.search(
            entry, "(objectClass=mlinkConfigElement)", scope="sub")
            if e.first("mlinkCfgName") in ("push.example.com", "other.example.com")}
        push = components["push.example.com"]
        assert push.first("mlinkCfgSecretFile") == "push-secret", push.attrs
        assert not push.get("mlinkCfgSecret"), push.attrs
        # An inline secret stays inline: there is no file to name.
        assert components["other.example.com"].first("mlinkCfgSecret") == INLINE_SECRET
        everything = slapd._tool("ldapsearch", "-LLL", "-o", "ldif-wrap=no", "-b", entry)
        assert PUSH_SECRET not in everything

        out = tmp_path / "exported.xml"
        mlink("config", "export", str(out), "--config", str(boot))
        text = out.read_text()
        assert PUSH_SECRET not in text
        # Relative to where the exported file lies, as every path is.
        assert 'secret-file="setup/push-secret"' in text
        back = {c.name: c for c in load_config(out).components.components}
        assert back["push.example.com"].secret == PUSH_SECRET
        assert back["push.example.com"].secret_file == full.parent / "push-secret"
        # Exported beside the bootstrap: the reference is relative again.
        beside = boot.parent / "exported.xml"
        mlink("config", "export", str(beside), "--config", str(boot))
        assert 'secret-file="push-secret"' in beside.read_text()
        # What came from FILE comes back (<directory> is the bootstrap's).
        exported, original = load_config(beside), load_config(full)
        assert dataclasses.replace(standalone(exported), directory=original.directory) == \
            standalone(original)
    finally:
        slapd.ldapdelete(entry, recursive=True)


def test_users_and_anonymous_cannot_read_the_configuration(
        slapd: Slapd, tmp_path: Path, cert_files: tuple[Path, Path]) -> None:
    """The shipped ACL (conf/mlink-acl.ldif, the tests' slapd): alice, an
    ordinary user, and anonymous clients see no configuration entry, so no
    component or TURN secret; the service account reads it (the import
    and export above run as it) and `mlink check` passes."""
    full, boot, entry = ldap_bootstrap(slapd, tmp_path, cert_files)
    alice = f"mail=alice@example.com,{slapd.users_dn}"
    try:
        mlink("config", "import", str(full), "--config", str(boot))
        # The rootdn sees the secrets: they are there to be hidden.
        held = slapd._tool("ldapsearch", "-LLL", "-o", "ldif-wrap=no", "-b", entry)
        assert INLINE_SECRET in held and TURN_SECRET in held
        as_alice = slapd.run_as(alice, slapd.users["alice@example.com"], "ldapsearch",
                                "-LLL", "-o", "ldif-wrap=no", "-b", slapd.base_dn,
                                "(|(mlinkCfgSecret=*)(objectClass=mlinkServer)"
                                "(objectClass=mlinkConfigElement))", "*")
        assert as_alice.strip() == "", as_alice
        with pytest.raises(RuntimeError, match=r"\(32\)"):  # noSuchObject: not even there
            slapd.run_as(alice, slapd.users["alice@example.com"], "ldapsearch", "-LLL",
                         "-b", entry, "-s", "base", "mlinkCfgSecret")
        anonymous = subprocess.run(
            ["ldapsearch", "-x", "-LLL", "-H", slapd.url, "-b", slapd.base_dn,
             "(objectClass=mlinkConfigElement)", "*"],
            capture_output=True, text=True, timeout=30)
        assert anonymous.stdout.strip() == "", anonymous.stdout
        checked = mlink("check", "--config", str(boot))
        assert "directory answers" in checked.stdout
    finally:
        slapd.ldapdelete(entry, recursive=True)


def test_check_fails_when_anonymous_can_read_the_configuration(
        tmp_path: Path, cert_files: tuple[Path, Path]) -> None:
    """An ACL that protects passwords but shows the configuration entries:
    `mlink check` fails with one line naming the entry."""
    with private_slapd(tmp_path / "slapd", open_config_acl=True) as own:
        full, boot, entry = ldap_bootstrap(own, tmp_path, cert_files)
        mlink("config", "import", str(full), "--config", str(boot))
        result = mlink("check", "--config", str(boot), check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"anonymous clients can read the server configuration entry {entry}" in lines[0]
