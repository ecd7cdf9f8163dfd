"""The web console (issue 17, items 2 and 5) in a browser: Playwright
driving Debian's Chromium against a real `mlink serve` with two domains on
the embedded directory. An administrator creates a user who then logs in
over XMPP, kicks a session whose client sees the stream end; a domain
administrator sees only their domain, even through forged URLs and form
fields; a POST without the CSRF token or a session is refused; /metrics
speaks OpenMetrics. Every page visited is saved as a screenshot."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.console_browser import browser, console_url, csrf_of, log_in, new_page, screenshot
from tests.rawclient import RawClient, expect_stream_error, ping
from tests.serverproc import MlinkProcess, mlink, start_mlink

__all__ = ["browser"]  # the fixture, used by name

DOMAIN, OTHER = "example.com", "example.org"
ROOT, ROOT_PW = f"root@{DOMAIN}", "root-Passw0rd"
ORG_ADMIN, ORG_ADMIN_PW = f"orgadmin@{OTHER}", "orgadmin-Passw0rd"
BOB, BOB_PW = f"bob@{DOMAIN}", "bob-Passw0rd"
OLGA, OLGA_PW = f"olga@{OTHER}", "olga-Passw0rd"
GONE, GONE_PW = f"gone@{DOMAIN}", "gone-Passw0rd"
USERS = {ROOT: ROOT_PW, ORG_ADMIN: ORG_ADMIN_PW, BOB: BOB_PW, OLGA: OLGA_PW, GONE: GONE_PW}
CONSOLE = (f'<console port="0"><admin jid="{ROOT}"/>'
           f'<admin jid="{ORG_ADMIN}" domain="{OTHER}"/></console>')


def _two_domains(text: str) -> str:
    text = text.replace(f"<domain>{DOMAIN}</domain>",
                        f"<domain>{DOMAIN}</domain><domain>{OTHER}</domain>", 1)
    return text.replace("</mlink>", CONSOLE + "</mlink>")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("mlink-console")
    with start_mlink(setup, DOMAIN, cert_files, users=USERS, edit_config=_two_domains) as proc:
        yield proc


@pytest.fixture(scope="module")
def base(server: MlinkProcess) -> str:
    return console_url(server)


def xmpp_login(server: MlinkProcess, ca_file: Path, jid: str, password: str,
               resource: str = "desk") -> RawClient:
    client = RawClient(server.c2s_port, ca_file)
    client.login(jid.split("@")[1], jid, password, resource=resource)
    return client


def test_admin_creates_a_user_who_logs_in_over_xmpp(server, base, browser, ca_file):
    page = new_page(browser, base)
    log_in(page, ROOT, ROOT_PW)
    screenshot(page, "users")
    local, password = "newbie-" + uuid.uuid4().hex[:6], "Newbie-Passw0rd"
    form = page.locator("#create-user")
    form.get_by_label("User name").fill(local)
    form.get_by_label("Domain").select_option(DOMAIN)
    form.get_by_label("Password", exact=True).fill(password)
    form.get_by_label("Password again").fill(password)
    form.get_by_role("button", name="Create").click()
    page.wait_for_url(re.compile(rf"/users/{local}@"))
    assert f"Created {local}@{DOMAIN}." in page.locator(".flash").inner_text()
    screenshot(page, "user")
    client = xmpp_login(server, ca_file, f"{local}@{DOMAIN}", password)
    client.close()
    # The audit log names who created whom.
    server.wait_for_log(rf"mlink\.console\.audit: {re.escape(ROOT)} created user {local}@")


def test_bad_values_get_the_fields_message_and_change_nothing(server, base, browser):
    page = new_page(browser, base)
    log_in(page, ROOT, ROOT_PW)
    form = page.locator("#create-user")
    form.get_by_label("User name").fill("bad user@x")
    form.get_by_label("Password", exact=True).fill("short")
    form.get_by_label("Password again").fill("short")
    form.get_by_role("button", name="Create").click()
    errors = page.locator(".field-error").all_inner_texts()
    assert "Not a valid user name (the part before @)." in errors
    assert "At least 8 characters." in errors
    page.goto("/users?q=bad")
    assert "No users found." in page.locator("table").inner_text()


def test_admin_kicks_a_session_and_the_client_sees_the_stream_end(server, base, browser,
                                                                 ca_file):
    client = xmpp_login(server, ca_file, BOB, BOB_PW, resource="laptop")
    try:
        page = new_page(browser, base)
        log_in(page, ROOT, ROOT_PW)
        page.goto("/sessions")
        row = page.locator("tr", has_text=f"{BOB}/laptop")
        screenshot(page, "sessions")
        row.get_by_label("Reason").fill("maintenance")
        row.get_by_role("button", name="Kick").click()
        assert f"{BOB}/laptop" in page.locator(".flash").inner_text()
        text = expect_stream_error(client, "policy-violation")
        assert "maintenance" in text
    finally:
        client.close()
    server.wait_for_log(rf"audit: {re.escape(ROOT)} kicked {re.escape(BOB)}/laptop: maintenance")


def test_deleting_a_user_ends_their_sessions(server, base, browser, ca_file):
    client = xmpp_login(server, ca_file, GONE, GONE_PW)
    try:
        page = new_page(browser, base)
        log_in(page, ROOT, ROOT_PW)
        page.goto(f"/users/{GONE}")
        delete = page.locator("#delete")
        delete.get_by_role("button", name="Delete user").click()
        assert f"Type {GONE} to confirm" in page.locator("#delete").inner_text()
        page.locator("#delete").get_by_label("Type the address to confirm").fill(GONE)
        page.locator("#delete").get_by_role("button", name="Delete user").click()
        page.wait_for_url(re.compile(r"/users$"))
        assert f"Deleted {GONE}" in page.locator(".flash").inner_text()
        text = client.wait_closed()
        assert "not-authorized" in text and "your account was deleted" in text
    finally:
        client.close()
    assert page.goto(f"/users/{GONE}").status == 404
    server.wait_for_log(rf"audit: {re.escape(ROOT)} deleted user {re.escape(GONE)}")


def test_domain_admin_sees_and_changes_only_their_domain(server, base, browser, ca_file):
    page = new_page(browser, base)
    log_in(page, ORG_ADMIN, ORG_ADMIN_PW)
    listing = page.locator("table").inner_text()
    assert OLGA in listing and BOB not in listing and ROOT not in listing
    screenshot(page, "users-delegated")
    # Another domain's user by URL: as if there were no such user.
    response = page.goto(f"/users/{BOB}")
    assert response.status == 404
    assert "no such user" in page.locator("main").inner_text()
    page.goto("/users")
    csrf = csrf_of(page)
    # Forged form fields, with a valid session and CSRF token.
    forged = page.request.post("/users", form={
        "csrf": csrf, "local": "intruder", "domain": DOMAIN,
        "password": "Intruder-Passw0rd", "confirm": "Intruder-Passw0rd"})
    assert forged.status == 400 and "Not a domain you administer." in forged.text()
    reset = page.request.post(f"/users/{BOB}/password", form={
        "csrf": csrf, "password": "Stolen-Passw0rd", "confirm": "Stolen-Passw0rd"})
    assert reset.status == 404
    delete = page.request.post(f"/users/{BOB}/delete", form={"csrf": csrf, "confirm": BOB})
    assert delete.status == 404
    kick = page.request.post("/sessions/kick", form={"csrf": csrf, "jid": f"{BOB}/laptop"})
    assert kick.status == 400 and "No such session." in kick.text()
    # Nothing changed: Bob's password still works, no intruder exists.
    xmpp_login(server, ca_file, BOB, BOB_PW).close()
    admin = new_page(browser, base)
    log_in(admin, ROOT, ROOT_PW)
    admin.goto("/users?q=intruder")
    assert "No users found." in admin.locator("table").inner_text()


def test_posts_without_csrf_token_or_session_are_refused(server, base, browser):
    page = new_page(browser, base)
    log_in(page, ROOT, ROOT_PW)
    fields = {"local": "nocsrf", "domain": DOMAIN, "password": "NoCsrf-Passw0rd",
              "confirm": "NoCsrf-Passw0rd"}
    refused = page.request.post("/users", form=fields)
    assert refused.status == 403 and "security token" in refused.text()
    wrong = page.request.post("/users", form={**fields, "csrf": "x" * 43})
    assert wrong.status == 403
    cross = page.request.post("/users", form={**fields, "csrf": csrf_of(page)},
                              headers={"Origin": "https://evil.example"})
    assert cross.status == 403
    stranger = new_page(browser, base)
    no_session = stranger.request.post("/users", form={**fields, "csrf": "x"})
    assert no_session.status == 403
    page.goto("/users?q=nocsrf")
    assert "No users found." in page.locator("table").inner_text()
    server.wait_for_log(r"audit: .* without a valid CSRF token")


def test_cookies_are_secure_httponly_samesite_strict(server, base, browser):
    page = new_page(browser, base)
    log_in(page, ROOT, ROOT_PW)
    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["__Host-mlink-console"]
    assert session["secure"] and session["httpOnly"] and session["sameSite"] == "Strict"
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(re.compile(r"/login$"))
    screenshot(page, "login")
    assert page.goto("/users").url.endswith("/login")


def test_status_page_and_metrics(server, base, browser, ca_file):
    client = xmpp_login(server, ca_file, OLGA, OLGA_PW)
    ping(client, OTHER)
    client.close()
    page = new_page(browser, base)
    log_in(page, ROOT, ROOT_PW)
    page.goto("/status")
    assert "ready" in page.locator("table").first.inner_text()
    screenshot(page, "status")
    metrics = page.request.get("/metrics")
    assert metrics.status == 200
    assert metrics.headers["content-type"].startswith("application/openmetrics-text")
    body = metrics.text()
    assert body.rstrip().endswith("# EOF")
    assert re.search(r'mlink_logins_total\{mechanism="PLAIN",outcome="ok",shard="\d+"\} [1-9]',
                     body), body
    assert re.search(r'mlink_stanzas_total\{direction="in",kind="iq",shard="\d+"\} [1-9]', body)
    assert re.search(r'mlink_stanzas_total\{direction="out",kind="iq",shard="\d+"\} [1-9]', body)
    assert 'mlink_shard_up{shard="0"} 1.0' in body
    assert re.search(r'mlink_directory_request_seconds_count\{operation="password-login",'
                     r'shard="\d+"\} [1-9]', body)


def test_persistent_rooms_by_domain(server, base, browser):
    team, org = f"team@conference.{DOMAIN}", f"org@conference.{OTHER}"
    mlink("room", "create", team, "--owner", ROOT, "--name", "Team", "--members-only",
          "--config", str(server.config))
    mlink("room", "create", org, "--owner", OLGA, "--name", "Org", "--config",
          str(server.config))
    delegated = new_page(browser, base)
    log_in(delegated, ORG_ADMIN, ORG_ADMIN_PW)
    delegated.goto("/rooms")
    listing = delegated.locator("table").inner_text()
    assert org in listing and team not in listing
    forged = delegated.request.post("/rooms/destroy", form={"csrf": csrf_of(delegated),
                                                           "jid": team})
    assert forged.status == 400 and "No such room." in forged.text()
    page = new_page(browser, base)
    log_in(page, ROOT, ROOT_PW)
    page.goto("/rooms")
    row = page.locator("tr", has_text=team)
    assert "members-only" in row.inner_text() and f"owner: {ROOT}" in row.inner_text()
    screenshot(page, "rooms")
    row.get_by_role("button", name="Destroy").click()
    assert f"Destroyed {team}" in page.locator(".flash").inner_text()
    assert team not in page.locator("table").inner_text()
    assert org in page.locator("table").inner_text()
    server.wait_for_log(rf"audit: {re.escape(ROOT)} destroyed room {re.escape(team)}")
