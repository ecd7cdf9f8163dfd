"""The console's server configuration page (issue 17, item 2): the form
built from the schema, per-field checks and the XML it writes (no server),
then in a browser against a real `mlink serve`: an administrator lowers
the stanza size limit and a client's next large stanza is refused; a bad
value gets its field's message and the file stays byte for byte; a
setting that needs a restart is reported as such on the page and in the
log; a POST without the CSRF token or a session, and a domain's delegated
administrator, are refused."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlink.config import load_config
from mlink.console.settings import (
    apply_changes,
    build_form,
    changes,
    check_fields,
    field_of_problem,
    parse_tree,
    serialise,
    write_candidate,
)
from tests.console_browser import (
    SCREENSHOTS,
    browser,
    console_url,
    csrf_of,
    log_in,
    new_page,
    screenshot,
)
from tests.rawclient import RawClient, expect_stream_error
from tests.serverproc import MlinkProcess, mlink, serve, start_mlink, stop

__all__ = ["browser"]  # the fixture, used by name

DOMAIN, OTHER = "example.com", "example.org"
ROOT, ROOT_PW = f"root@{DOMAIN}", "root-Passw0rd"
ORG_ADMIN, ORG_ADMIN_PW = f"orgadmin@{OTHER}", "orgadmin-Passw0rd"
BOB, BOB_PW = f"bob@{DOMAIN}", "bob-Passw0rd"
USERS = {ROOT: ROOT_PW, ORG_ADMIN: ORG_ADMIN_PW, BOB: BOB_PW}
CONSOLE = (f'<console port="0"><admin jid="{ROOT}"/>'
           f'<admin jid="{ORG_ADMIN}" domain="{OTHER}"/></console>')
# The limit the administrator sets: low enough that a test stanza passes it
# cheaply, at the RFC 6120 floor's order of magnitude.
NEW_STANZA_LIMIT = 20_000

FILE = """<?xml version="1.0"?>
<mlink>
  <!-- the administrator's note -->
  <domain>example.com</domain>
  <listen type="c2s" port="0"/>
  <tls certificate="cert.pem" key="key.pem"/>
  <limits stanza-bytes="300000"/>
</mlink>
"""


# -- the form and the XML, without a server ---------------------------------------


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    path = tmp_path / "mlink.xml"
    path.write_text(FILE)
    return path


def test_form_comes_from_the_schema(config_file):
    form = build_form(load_config(config_file))
    fields = {f.key: f for f in form.fields}
    assert fields["limits.stanza-bytes"].value == "300000"
    assert fields["limits.stanza-bytes"].editable
    assert "Largest stanza accepted" in fields["limits.stanza-bytes"].doc
    assert fields["log.level"].value == "info" and fields["log.level"].editable
    assert fields["caches.jids"].editable
    # Paths and what could cut the console off are read-only.
    for key in ("tls.certificate", "tls.key", "directory.backend", "console.port",
                "data.dir", "configuration.source", "components.port"):
        assert not fields[key].editable, key
    # Repeated sections are listed as not edited here.
    assert ("<listen>", "repeated or structured") in form.other
    assert ("<modules>", "repeated or structured") in form.other


def test_the_form_fits_the_consoles_field_limit(config_file):
    """The console parses at most 64 fields per form (`_checked_form`'s
    max_fields): a setting added to the schema must not push the
    configuration form past it, or saving would fail."""
    form = build_form(load_config(config_file))
    assert sum(f.editable for f in form.fields) + 1 <= 64


def test_secrets_are_never_shown(tmp_path):
    from mlink.config_model import ComponentConfig
    from mlink.console.settings import _attr_fields

    fields = _attr_fields(ComponentConfig(name="c.example.com", secret="s3cret-s3cret-s3"),
                          "component", tmp_path, read_only=False)
    secret = next(f for f in fields if f.xml == "secret")
    assert secret.secret and secret.value == "set"


def test_unchanged_fields_are_not_changes(config_file):
    form = build_form(load_config(config_file))
    submitted = {f.key: f.value for f in form.fields}
    assert changes(form, submitted) == {}
    # Read-only fields are ignored even when a forged form sends them.
    forged = {**submitted, "tls.certificate": "/etc/passwd", "limits.depth": " 32 "}
    assert changes(form, forged) == {"limits.depth": "32"}


@pytest.mark.parametrize("key, raw, message", [
    ("limits.stanza-bytes", "5", "'stanza-bytes' on <limits> must be at least 10000, not 5"),
    ("limits.stanza-bytes", "lots", "'stanza-bytes' on <limits> must be a whole number, "
                                    "not 'lots'"),
    ("limits.auth-timeout", "-1", "'auth-timeout' on <limits> must be a positive number"),
    ("limits.exempt-loopback", "yes", "'exempt-loopback' on <limits> must be true or false"),
    ("log.level", "loud", "'level' on <log> must be one of debug, info"),
    ("caches.jids", "1\x00", "Control characters are not allowed."),
    ("caches.jids", "9" * 3000, "At most 2000 characters."),
])
def test_bad_values_get_their_fields_message(config_file, key, raw, message):
    form = build_form(load_config(config_file))
    errors = check_fields(form, changes(form, {key: raw}), config_file.parent)
    assert list(errors) == [key] and errors[key].startswith(message), errors


def test_every_bad_field_gets_its_own_message(config_file):
    form = build_form(load_config(config_file))
    errors = check_fields(form, changes(form, {"limits.depth": "0", "caches.jids": "x",
                                               "limits.max-resources": "3"}),
                          config_file.parent)
    assert sorted(errors) == ["caches.jids", "limits.depth"]


def test_changes_are_applied_to_the_files_xml(config_file):
    form = build_form(load_config(config_file))
    root = parse_tree(config_file.read_bytes())
    apply_changes(root, form, {"limits.stanza-bytes": "20000", "log.level": "debug",
                               "limits.depth": ""})
    text = serialise(root).decode()
    assert "<!-- the administrator's note -->" in text
    assert 'stanza-bytes="20000"' in text and '<log level="debug"' in text
    candidate = write_candidate(config_file.parent, text.encode(), 0o640)
    try:
        assert os.stat(candidate).st_mode & 0o777 == 0o640
        config = load_config(candidate)
    finally:
        candidate.unlink()
    assert config.limits.max_stanza_bytes == 20000 and config.log_level == "debug"


def test_a_whole_file_problem_is_mapped_to_its_field(config_file):
    form = build_form(load_config(config_file))
    changed = {"limits.stanza-bytes": "20000"}
    problem = "'stanza-bytes' on <limits> must be at least 40000 (room for output-bytes)"
    assert field_of_problem(form, changed, problem) == "limits.stanza-bytes"
    assert field_of_problem(form, changed, "something else entirely") is None


# -- in a browser, against a real server ------------------------------------------------


def _two_domains(text: str) -> str:
    text = text.replace(f"<domain>{DOMAIN}</domain>",
                        f"<domain>{DOMAIN}</domain><domain>{OTHER}</domain>", 1)
    return text.replace("</mlink>", CONSOLE + "</mlink>")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("mlink-console-config")
    with start_mlink(setup, DOMAIN, cert_files, users=USERS, edit_config=_two_domains) as proc:
        proc.config.chmod(0o600)
        yield proc


@pytest.fixture(scope="module")
def base(server: MlinkProcess) -> str:
    return console_url(server)


def test_bad_value_is_shown_next_to_its_field_and_nothing_is_written(server, base, browser):
    before = server.config.read_bytes()
    page = new_page(browser, base)
    log_in(page, ROOT, ROOT_PW)
    page.goto("/config")
    page.get_by_label("limits.stanza-bytes", exact=True).fill("5")
    page.get_by_label("caches.jids", exact=True).fill("many")
    page.get_by_role("button", name="Save and reload").click()
    stanza = page.locator(".setting", has=page.get_by_label("limits.stanza-bytes", exact=True))
    assert "'stanza-bytes' on <limits> must be at least 10000, not 5" in \
        stanza.locator(".field-error").inner_text()
    jids = page.locator(".setting", has=page.get_by_label("caches.jids", exact=True))
    assert "must be a whole number, not 'many'" in jids.locator(".field-error").inner_text()
    # The bad value stays in its field for the administrator to correct.
    assert page.get_by_label("limits.stanza-bytes", exact=True).input_value() == "5"
    screenshot(page, "config-invalid")
    # The part the docs show: the <limits> fieldset with its messages.
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator("fieldset", has_text="<limits>").screenshot(
        path=str(SCREENSHOTS / "config-invalid-limits.png"))
    assert server.config.read_bytes() == before
    assert not list(server.config.parent.glob(".mlink-console-*"))


def test_a_cross_field_problem_is_shown_at_the_top(server, base, browser):
    """What only the whole-file load can see (a photo limit that cannot fit
    in a stanza) is shown above the form, and nothing is written."""
    before = server.config.read_bytes()
    page = new_page(browser, base)
    log_in(page, ROOT, ROOT_PW)
    page.goto("/config")
    page.get_by_label("profiles.max-photo-bytes", exact=True).fill("10000000")
    page.get_by_role("button", name="Save and reload").click()
    top = page.locator("#config-error").inner_text()
    assert "'max-photo-bytes' 10000000 cannot fit in a stanza" in top
    assert server.config.name in top and ".mlink-console-" not in top
    assert server.config.read_bytes() == before


def test_admin_lowers_the_stanza_limit_and_a_client_sees_it(server, base, browser, ca_file):
    mark = server.log.mark()
    page = new_page(browser, base)
    log_in(page, ROOT, ROOT_PW)
    page.get_by_role("link", name="Configuration").click()
    page.wait_for_url(re.compile(r"/config$"))
    screenshot(page, "config")
    page.get_by_label("limits.stanza-bytes", exact=True).fill(str(NEW_STANZA_LIMIT))
    page.get_by_role("button", name="Save and reload").click()
    result = page.locator("#result").inner_text()
    assert "Saved and reloaded: limits.stanza-bytes." in result
    assert "Nothing changed needs a restart." in result
    assert page.get_by_label("limits.stanza-bytes", exact=True).input_value() == \
        str(NEW_STANZA_LIMIT)
    screenshot(page, "config-saved")
    # Written to the file, its mode kept; the server reloaded it.
    assert f'stanza-bytes="{NEW_STANZA_LIMIT}"' in server.config.read_text()
    assert server.config.stat().st_mode & 0o777 == 0o600
    assert load_config(server.config).limits.max_stanza_bytes == NEW_STANZA_LIMIT
    server.wait_for_log(r"configuration reloaded by 1 of 1 shard", since=mark)
    server.wait_for_log(rf"audit: {re.escape(ROOT)} changed server configuration "
                        rf".*mlink\.xml: limits\.stanza-bytes", since=mark)
    # A new connection gets the new limit: a stanza under the old limit and
    # over the new one ends the stream.
    client = RawClient(server.c2s_port, ca_file)
    try:
        client.login(DOMAIN, BOB, BOB_PW)
        body = "x" * (NEW_STANZA_LIMIT + 1000)
        client.send(f"<message to='{ROOT}' type='chat'><body>{body}</body></message>")
        expect_stream_error(client, "policy-violation")
    finally:
        client.close()


def test_a_setting_that_needs_a_restart_is_reported(server, base, browser):
    mark = server.log.mark()
    page = new_page(browser, base)
    log_in(page, ROOT, ROOT_PW)
    page.goto("/config")
    url = "wss://chat.example.com/xmpp-websocket"
    page.get_by_label("websocket.public-url", exact=True).fill(url)
    page.get_by_role("button", name="Save and reload").click()
    result = page.locator("#result").inner_text()
    assert "Needs a restart to apply: WebSocket settings (<websocket>)." in result
    assert "WebSocket settings (<websocket>)" in page.locator("#pending").inner_text()
    screenshot(page, "config-restart")
    page.screenshot(path=str(SCREENSHOTS / "config-restart-top.png"))  # the viewport only
    server.wait_for_log(r"WebSocket settings \(<websocket>\) changed in .*needs a restart",
                        since=mark)
    server.wait_for_log(rf"audit: {re.escape(ROOT)} changed server configuration .*"
                        r"websocket\.public-url; needs a restart: WebSocket", since=mark)


def test_posts_without_csrf_token_or_session_are_refused(server, base, browser):
    before = server.config.read_bytes()
    page = new_page(browser, base)
    log_in(page, ROOT, ROOT_PW)
    page.goto("/config")
    fields = {"limits.depth": "7"}
    refused = page.request.post("/config", form=fields)
    assert refused.status == 403 and "security token" in refused.text()
    wrong = page.request.post("/config", form={**fields, "csrf": "x" * 43})
    assert wrong.status == 403
    stranger = new_page(browser, base)
    assert stranger.request.post("/config", form={**fields, "csrf": csrf_of(page)}
                                 ).status == 403
    assert server.config.read_bytes() == before


def test_a_delegated_administrator_cannot_see_or_change_it(server, base, browser):
    before = server.config.read_bytes()
    page = new_page(browser, base)
    log_in(page, ORG_ADMIN, ORG_ADMIN_PW)
    assert page.get_by_role("link", name="Configuration").count() == 0
    answer = page.goto("/config")
    assert answer.status == 403
    assert "administrators of every domain" in page.locator("main").inner_text()
    assert "stanza-bytes" not in page.content()
    page.goto("/users")
    posted = page.request.post("/config", form={"limits.depth": "7", "csrf": csrf_of(page)})
    assert posted.status == 403
    assert server.config.read_bytes() == before


def test_a_file_broken_by_hand_since_is_not_overwritten(server, base, browser):
    """The file was edited by hand after the server loaded it, and does not
    parse: the page says so and writes nothing over the administrator's
    edit (it may be half of a change in progress)."""
    good = server.config.read_bytes()
    page = new_page(browser, base)
    log_in(page, ROOT, ROOT_PW)
    page.goto("/config")
    broken = good.replace(b"</mlink>", b"<limits")
    server.config.write_bytes(broken)
    try:
        page.get_by_label("limits.depth", exact=True).fill("32")
        page.get_by_role("button", name="Save and reload").click()
        assert "does not parse as XML any more" in page.locator("#config-error").inner_text()
        assert server.config.read_bytes() == broken
    finally:
        server.config.write_bytes(good)


# -- configuration held in the directory ------------------------------------------------

ENTRY = "cn=xmpp,dc=localhost"
LOCAL = "localhost"
LOCAL_ROOT, LOCAL_BOB = f"root@{LOCAL}", f"bob@{LOCAL}"


def test_directory_source_is_written_to_the_entry(tmp_path, cert_files, browser, ca_file):
    """With `<configuration source="directory">`, the page writes the
    server entry as `mlink config import` does, and the bootstrap file
    stays as it was."""
    setup = tmp_path / "setup"
    cert, key = cert_files
    mlink("init", str(setup), "--domain", LOCAL, "--c2s-port", "0", "--tls-port", "0",
          "--ws-port", "0", "--tls-cert", str(cert), "--tls-key", str(key))
    full = setup / "mlink.xml"
    full.write_text(full.read_text().replace(
        "</mlink>", f'<console port="0"><admin jid="{LOCAL_ROOT}"/></console></mlink>')
        .replace("<directory", '<directory changes-seconds="0.2"', 1))
    listing = setup / "users.txt"
    listing.write_text(f"{LOCAL_ROOT} {ROOT_PW}\n{LOCAL_BOB} {BOB_PW}\n")
    mlink("user", "import", str(listing), "--config", str(full))
    boot = setup / "boot.xml"
    boot.write_text(f'<mlink>\n  <configuration source="directory" entry="{ENTRY}"/>\n'
                    '  <directory changes-seconds="0.2"><embedded file="directory.ldif" '
                    'base="dc=localhost"/></directory>\n  <data dir="."/>\n</mlink>\n')
    mlink("config", "import", str(full), "--config", str(boot))
    boot_before = boot.read_bytes()
    server = serve(boot, LOCAL, shards=1)
    try:
        page = new_page(browser, console_url(server))
        log_in(page, LOCAL_ROOT, ROOT_PW)
        page.goto("/config")
        assert f"the directory entry {ENTRY}" in page.locator("main").inner_text()
        # A bad value: its message, and the entry unchanged.
        page.get_by_label("limits.stanza-bytes", exact=True).fill("12")
        page.get_by_role("button", name="Save and reload").click()
        assert "must be at least 10000, not 12" in page.locator(".field-error").inner_text()
        exported = mlink("config", "export", "-", "--config", str(boot)).stdout
        assert 'stanza-bytes="262144"' in exported or "stanza-bytes" not in exported
        mark = server.log.mark()
        page.get_by_label("limits.stanza-bytes", exact=True).fill(str(NEW_STANZA_LIMIT))
        page.get_by_role("button", name="Save and reload").click()
        assert "Saved and reloaded: limits.stanza-bytes." in page.locator("#result").inner_text()
        server.wait_for_log(r"configuration reloaded by 1 of 1 shard", since=mark)
        server.wait_for_log(rf"audit: {re.escape(LOCAL_ROOT)} changed server configuration "
                            rf"entry {re.escape(ENTRY)}: limits\.stanza-bytes", since=mark)
        exported = mlink("config", "export", "-", "--config", str(boot)).stdout
        assert f'stanza-bytes="{NEW_STANZA_LIMIT}"' in exported
        assert boot.read_bytes() == boot_before
        assert not list(setup.glob(".mlink-console-*"))
        client = RawClient(server.c2s_port, ca_file)
        try:
            client.login(LOCAL, LOCAL_BOB, BOB_PW)
            client.send(f"<message to='{LOCAL_ROOT}'><body>{'x' * (NEW_STANZA_LIMIT + 1000)}"
                        "</body></message>")
            expect_stream_error(client, "policy-violation")
        finally:
            client.close()
    finally:
        assert stop(server) == 0, server.log.text()


def test_a_symlinked_file_is_written_through_its_link(tmp_path, config_file):
    """`os.replace` over a symbolic link would replace the link; the page
    writes the file it points to (as the console's save does)."""
    import trio

    from mlink.console.app import Console

    real_dir = tmp_path / "checkout"
    real_dir.mkdir()
    real = real_dir / "mlink.xml"
    real.write_text(FILE.replace("cert.pem", str(tmp_path / "cert.pem"))
                    .replace("key.pem", str(tmp_path / "key.pem")))
    real.chmod(0o640)
    link = tmp_path / "linked.xml"
    link.symlink_to(real)

    class Holder:
        config_path = link
        config = load_config(link)

    console = object.__new__(Console)
    console.supervisor = Holder()  # type: ignore[assignment]
    form = build_form(Holder.config)
    errors = trio.run(console._write_settings, form, {"limits.depth": "32"})
    assert errors == {}
    assert link.is_symlink() and 'depth="32"' in real.read_text()
    assert real.stat().st_mode & 0o777 == 0o640
    assert not list(tmp_path.glob(".mlink-console-*")) and not list(
        real_dir.glob(".mlink-console-*"))
