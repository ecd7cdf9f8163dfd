"""Self-service in the web console (issue 17, item 3), in Chromium, against
a slapd with the password-policy overlay (pwdMinLength 8 with quality
checking, 90-day expiry): the page shows the policy and the expiry date;
a weak password is refused with the directory's own words; a good one
works at once, and the old one stops working for PLAIN and SCRAM; a
profile change made there shows in another user's vCard. With the same
directory: administrators named by a directory group, disabling an
account (ppolicy's administrative lock) ends its sessions, and a directory
that stops answering gives a clear page."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.console_browser import (
    SCREENSHOTS,
    browser,
    console_url,
    log_in,
    new_page,
    screenshot,
)
from tests.ldap_fixtures import Slapd, private_slapd
from tests.rawclient import RawClient, read_stanza
from tests.scramclient import plain_auth, scram_auth
from tests.serverproc import MlinkProcess, start_mlink

__all__ = ["browser"]  # the fixture, used by name

DOMAIN = "example.com"
POLICY_DN = "cn=default,ou=Policies,dc=example,dc=com"
MOVER, MOVER_PW = f"mover@{DOMAIN}", "mover-Passw0rd!"
READER, READER_PW = f"reader@{DOMAIN}", "reader-Passw0rd!"
POSER, POSER_PW = f"poser@{DOMAIN}", "poser-Passw0rd!"
LOCKED, LOCKED_PW = f"locked@{DOMAIN}", "locked-Passw0rd!"
WARNED, WARNED_PW = f"warned@{DOMAIN}", "warned-Passw0rd!"
USERS = {MOVER: MOVER_PW, READER: READER_PW, POSER: POSER_PW, LOCKED: LOCKED_PW,
         WARNED: WARNED_PW}
# A policy under which every password is within its expiry warning.
WARN_POLICY_DN = "cn=warn,ou=Policies,dc=example,dc=com"
WARN_POLICY = f"""dn: {WARN_POLICY_DN}
objectClass: top
objectClass: device
objectClass: pwdPolicy
cn: warn
pwdAttribute: userPassword
pwdMaxAge: 432000
pwdExpireWarning: 864000
"""
PUBLIC_URL = "https://console.example.com:5443"
# The sample data's sales group: alice and bob (conf/groups.ldif).
ADMIN_GROUP = "cn=sales,ou=Groups,dc=example,dc=com"
ALICE, ALICE_PW = f"alice@{DOMAIN}", "alice-secret"
CAROL, CAROL_PW = f"carol@{DOMAIN}", "carol-secret"
VCARD_NS = "vcard-temp"
# The console, and a field users may change (LDAP fields default to `directory`).
EXTRA = (f'<console port="0" public-url="{PUBLIC_URL}"><admin group="{ADMIN_GROUP}"/></console>'
         '<profiles><field name="display_name" policy="update"/></profiles>'
         '<rosters><group dn="cn=engineering,ou=Groups,dc=example,dc=com"/></rosters>')


@pytest.fixture(scope="module")
def policy_slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    work = tmp_path_factory.mktemp("console-ppolicy")
    (work / "policy.ldif").write_text(WARN_POLICY)
    with private_slapd(work / "slapd", work / "policy.ldif", ppolicy=True) as server:
        yield server


@pytest.fixture(scope="module")
def server(policy_slapd: Slapd, tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    s = policy_slapd
    directory = (
        '<directory backend="ldap">'
        f'<ldap base="{s.base_dn}" bind-dn="{s.bind_dn}" bind-password="{s.bind_password}" '
        f'password-policy="{POLICY_DN}" pool-size="4" timeout="5">'
        f"<server>{s.url}</server></ldap></directory>"
    )
    setup = tmp_path_factory.mktemp("mlink-console-ppolicy")
    with start_mlink(setup, DOMAIN, cert_files, users=USERS, ldap=directory,
                     edit_config=lambda t: t.replace("</mlink>", EXTRA + "</mlink>")) as proc:
        try:
            yield proc
        finally:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            (SCREENSHOTS / "selfservice-server.log").write_text(proc.log.text())


def outcome(server: MlinkProcess, ca_file: Path, mechanism: str, jid: str,
            password: str) -> str:
    client = RawClient(server.c2s_port, ca_file)
    try:
        client.starttls(DOMAIN)
        if mechanism == "PLAIN":
            return plain_auth(client, jid, password)
        return scram_auth(client, jid.split("@")[0], password, mechanism)
    finally:
        client.close()


def vcard_of(client: RawClient, jid: str) -> str:
    stanza_id = "v-" + uuid.uuid4().hex[:8]
    client.send(f"<iq type='get' id='{stanza_id}' to='{jid}'><vCard xmlns='{VCARD_NS}'/></iq>")
    reply = read_stanza(client, "iq", stanza_id)
    assert reply.get("type") == "result", reply
    fn = reply.find(f"{{{VCARD_NS}}}vCard/{{{VCARD_NS}}}FN")
    return fn.text or "" if fn is not None else ""


def test_password_change_under_the_directory_policy(server, browser, ca_file):
    base = console_url(server)
    page = new_page(browser, base)
    log_in(page, MOVER, MOVER_PW)
    assert page.url.endswith("/me")
    policy = page.locator("#policy").inner_text()
    assert "expire after 90 days" in policy
    assert re.search(r"Yours expires on \d{4}-\d\d-\d\d", policy), policy
    screenshot(page, "me")
    form = page.locator("#password")

    def change(current: str, new: str) -> None:
        form.get_by_label("Current password").fill(current)
        form.get_by_label("New password").fill(new)
        form.get_by_label("Again").fill(new)
        form.get_by_role("button", name="Change password").click()

    change(MOVER_PW, "short")
    refused = page.locator("#password .field-error").inner_text()
    # slapd's own words for its quality rule (pwdMinLength 8, pwdCheckQuality).
    assert refused.startswith("The directory refused it:") and "quality" in refused.lower()
    screenshot(page, "me-refused")
    new = "Moved-Passw0rd-" + uuid.uuid4().hex[:6]
    change(MOVER_PW, new)
    assert "Your password was changed." in page.locator(".flash").inner_text()
    for mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-1"):
        assert outcome(server, ca_file, mechanism, MOVER, new) == "success", mechanism
        assert outcome(server, ca_file, mechanism, MOVER, MOVER_PW).startswith(
            "not-authorized"), mechanism
    server.wait_for_log(rf"audit: {re.escape(MOVER)} changed own password")


def test_profile_change_in_self_service_shows_in_another_users_vcard(server, browser,
                                                                     ca_file):
    reader = RawClient(server.c2s_port, ca_file)
    reader.login(DOMAIN, READER, READER_PW, resource="r")
    try:
        before = vcard_of(reader, POSER)  # now cached by the shard
        name = "Poser " + uuid.uuid4().hex[:6]
        assert before != name
        page = new_page(browser, console_url(server))
        log_in(page, POSER, POSER_PW)
        page.locator("#profile").get_by_label("display name").fill(name)
        page.locator("#profile").get_by_role("button", name="Save profile").click()
        assert "Profile saved." in page.locator(".flash").inner_text()
        # The console had the shards drop their cached copy: no wait for
        # the cache's lifetime.
        assert vcard_of(reader, POSER) == name
    finally:
        reader.close()


def test_expiry_warning_links_to_self_service(server, policy_slapd, browser, ca_file):
    dn = f"mail={WARNED},ou=People,dc=example,dc=com"
    policy_slapd.ldapmodify(f"dn: {dn}\nchangetype: modify\n"
                            f"replace: pwdPolicySubentry\npwdPolicySubentry: {WARN_POLICY_DN}\n")
    # Set again so that its age counts under the new policy.
    policy_slapd.run_as(dn, WARNED_PW, "ldappasswd", "-s", WARNED_PW, dn)
    client = RawClient(server.c2s_port, ca_file)
    try:
        client.authenticate(DOMAIN, WARNED, WARNED_PW)  # PLAIN: slapd's own warning
        client.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
        text = client.read_until(r"type='headline'.*?</message>")
        assert re.search(r"Your password expires in [45] days", text), text
        assert f"Change it at {PUBLIC_URL}/me" in text
    finally:
        client.close()
    page = new_page(browser, console_url(server))
    log_in(page, WARNED, WARNED_PW)
    policy = page.locator("#policy").inner_text()
    assert "Passwords expire after 5 days." in policy and "Yours expires on" in policy


def test_administrators_are_named_by_a_directory_group(server, browser):
    base = console_url(server)
    admin = new_page(browser, base)
    log_in(admin, ALICE, ALICE_PW)
    assert admin.url.endswith("/users")
    assert LOCKED in admin.locator("table").inner_text()
    admin.goto("/groups")
    groups = admin.locator("main").inner_text()
    assert "engineering" in groups and f"bob@{DOMAIN}" in groups and CAROL in groups
    screenshot(admin, "groups")
    other = new_page(browser, base)
    log_in(other, CAROL, CAROL_PW)
    assert other.url.endswith("/me")
    assert other.goto("/users").status == 403
    assert other.goto("/status").status == 403
    assert other.goto("/groups").status == 403


def test_disabling_an_account_ends_its_sessions(server, browser, ca_file):
    client = RawClient(server.c2s_port, ca_file)
    client.login(DOMAIN, LOCKED, LOCKED_PW, resource="r")
    try:
        page = new_page(browser, console_url(server))
        log_in(page, ALICE, ALICE_PW)
        page.goto(f"/users/{LOCKED}")
        page.get_by_role("button", name="Disable account").click()
        assert f"{LOCKED} disabled." in page.locator(".flash").inner_text()
        assert "this account is locked" in page.locator("main").inner_text()
        text = client.wait_closed()
        assert "not-authorized" in text and "your account was disabled" in text
    finally:
        client.close()
    assert outcome(server, ca_file, "PLAIN", LOCKED, LOCKED_PW).startswith("account-disabled")
    page.get_by_role("button", name="Enable account").click()
    assert f"{LOCKED} enabled." in page.locator(".flash").inner_text()
    assert outcome(server, ca_file, "PLAIN", LOCKED, LOCKED_PW) == "success"
    server.wait_for_log(rf"audit: {re.escape(ALICE)} disabled {re.escape(LOCKED)}")


def test_unreachable_directory_gives_a_clear_page(server, policy_slapd, browser):
    page = new_page(browser, console_url(server))
    log_in(page, ALICE, ALICE_PW)
    with policy_slapd.stopped():
        response = page.goto("/users")
        assert response.status == 503
        assert "The directory cannot be reached right now" in page.locator("main").inner_text()
        assert "Traceback" not in page.content()
        screenshot(page, "directory-down")
    assert page.goto("/users").status == 200
