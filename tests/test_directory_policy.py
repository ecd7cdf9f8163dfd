"""The directory's password policy governs every mechanism (issue 13):
against a slapd with the ppolicy overlay (3 failures lock the account),
SCRAM logins are refused for locked and expired accounts and told why,
wrong SCRAM proofs count towards the lockout, an expiry warning reaches
the user, and secrets derived from a password changed outside mlink stop
working at once (the next PLAIN login renews them)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ldap_fixtures import Slapd, private_slapd
from tests.rawclient import RawClient
from tests.scramclient import plain_auth, scram_auth
from tests.serverproc import MlinkProcess, start_mlink

DOMAIN = "example.com"
POLICY_DN = "cn=default,ou=Policies,dc=example,dc=com"
# Policies assigned per user (pwdPolicySubentry): one whose passwords are
# always within the warning period, one whose passwords expire at once.
WARN_POLICY_DN = "cn=warn,ou=Policies,dc=example,dc=com"
EXPIRE_POLICY_DN = "cn=expire,ou=Policies,dc=example,dc=com"
EXTRA_POLICIES = f"""dn: {WARN_POLICY_DN}
objectClass: top
objectClass: device
objectClass: pwdPolicy
cn: warn
pwdAttribute: userPassword
pwdMaxAge: 432000
pwdExpireWarning: 864000

dn: {EXPIRE_POLICY_DN}
objectClass: top
objectClass: device
objectClass: pwdPolicy
cn: expire
pwdAttribute: userPassword
pwdMaxAge: 1
pwdGraceAuthNLimit: 0
"""
USERS = {f"{name}@{DOMAIN}": f"{name}-Passw0rd!" for name in
         ("locky", "changer", "warned", "expiring", "mover")}
# A password expires a second after it is set; poll for it this long.
EXPIRY_DEADLINE = 15.0
# The renewal after a PLAIN login runs in the background; poll this long.
RENEWAL_DEADLINE = 15.0


# Passwords changed by a test, for the tests after it.
PASSWORDS: dict[str, str] = {}


def current_password(jid: str) -> str:
    return PASSWORDS.get(jid, USERS[jid])


def user_dn(jid: str) -> str:
    return f"mail={jid},ou=People,dc=example,dc=com"


@pytest.fixture(scope="module")
def policy_slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    work = tmp_path_factory.mktemp("ppolicy")
    extra = work / "policies.ldif"
    extra.write_text(EXTRA_POLICIES)
    with private_slapd(work / "slapd", extra, ppolicy=True) as server:
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
    setup = tmp_path_factory.mktemp("mlink-ppolicy")
    with start_mlink(setup, DOMAIN, cert_files, users=USERS, ldap=directory) as proc:
        yield proc


def connect(server: MlinkProcess, ca_file: Path) -> RawClient:
    client = RawClient(server.c2s_port, ca_file)
    client.starttls(DOMAIN)
    return client


def scram(server: MlinkProcess, ca_file: Path, jid: str, password: str) -> str:
    client = connect(server, ca_file)
    try:
        return scram_auth(client, jid.split("@")[0], password)
    finally:
        client.close()


def plain(server: MlinkProcess, ca_file: Path, jid: str, password: str) -> str:
    client = connect(server, ca_file)
    try:
        return plain_auth(client, jid, password)
    finally:
        client.close()


def test_wrong_scram_proofs_lock_the_account_for_every_mechanism(server, ca_file):
    jid = f"locky@{DOMAIN}"
    right = USERS[jid]
    assert scram(server, ca_file, jid, right) == "success"
    for _ in range(3):  # the policy's pwdMaxFailure
        assert scram(server, ca_file, jid, "wrong-" + uuid.uuid4().hex) == "not-authorized"
    # The directory counted them: it refuses the right password now, and
    # says why (slapd's password-policy control, for PLAIN's bind).
    assert plain(server, ca_file, jid, right) == "account-disabled: this account is locked"
    outcome = scram(server, ca_file, jid, right)
    assert outcome.startswith("account-disabled: ") and "locked" in outcome
    # A wrong password learns nothing about the account's state.
    assert scram(server, ca_file, jid, "wrong") == "not-authorized"


def test_password_changed_outside_mlink_stops_old_scram_secrets(server, policy_slapd, ca_file):
    jid = f"changer@{DOMAIN}"
    old, new = USERS[jid], "Changed-Passw0rd-" + uuid.uuid4().hex[:6]
    assert scram(server, ca_file, jid, old) == "success"
    # The user changes the password with another application (a bind as
    # themselves, as ldappasswd or a self-service page would).
    policy_slapd.run_as(user_dn(jid), old, "ldappasswd", "-s", new, user_dn(jid))
    assert scram(server, ca_file, jid, old) == "not-authorized"
    assert plain(server, ca_file, jid, old).startswith("not-authorized")
    assert scram(server, ca_file, jid, new) == "not-authorized"  # secrets are stale
    assert plain(server, ca_file, jid, new) == "success"  # ...and renewed by this login
    deadline = time.monotonic() + RENEWAL_DEADLINE
    while (outcome := scram(server, ca_file, jid, new)) != "success":
        assert time.monotonic() < deadline, outcome
    assert scram(server, ca_file, jid, old) == "not-authorized"


def test_expiry_warning_reaches_the_user_after_login(server, policy_slapd, ca_file):
    jid = f"warned@{DOMAIN}"
    policy_slapd.ldapmodify(f"dn: {user_dn(jid)}\nchangetype: modify\n"
                            f"replace: pwdPolicySubentry\npwdPolicySubentry: {WARN_POLICY_DN}\n")
    # Set the password again so pwdChangedTime starts now under the policy.
    fresh = "Warned-Passw0rd-" + uuid.uuid4().hex[:6]
    policy_slapd.run_as(user_dn(jid), USERS[jid], "ldappasswd", "-s", fresh, user_dn(jid))
    PASSWORDS[jid] = fresh
    assert plain(server, ca_file, jid, fresh) == "success"  # renews the secrets
    deadline = time.monotonic() + RENEWAL_DEADLINE
    while True:
        client = connect(server, ca_file)
        if scram_auth(client, "warned", fresh) == "success":
            break
        client.close()
        assert time.monotonic() < deadline
    client.open(DOMAIN)
    client.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    text = client.read_until(r"type='headline'.*?</message>")
    assert "Your password expires in 4 days" in text
    client.close()


def test_expired_password_is_refused_with_credentials_expired(server, policy_slapd, ca_file):
    jid = f"expiring@{DOMAIN}"
    password = USERS[jid]
    assert scram(server, ca_file, jid, password) == "success"
    # The administrator gives the user a policy under which the password,
    # set more than a second ago, has expired.
    policy_slapd.ldapmodify(f"dn: {user_dn(jid)}\nchangetype: modify\n"
                            f"replace: pwdPolicySubentry\npwdPolicySubentry: {EXPIRE_POLICY_DN}\n")
    deadline = time.monotonic() + EXPIRY_DEADLINE
    expired = "credentials-expired: the password has expired: change it"
    while (outcome := scram(server, ca_file, jid, password)) != expired:
        assert time.monotonic() < deadline, outcome
    # A wrong password is told nothing about it by SCRAM; PLAIN is checked
    # by a bind, and slapd's policy says why for the right password.
    assert scram(server, ca_file, jid, "wrong") == "not-authorized"
    assert plain(server, ca_file, jid, password).startswith("credentials-expired")


def test_an_account_locked_by_the_administrator_loses_its_sessions(server, policy_slapd,
                                                                   ca_file):
    jid = f"warned@{DOMAIN}"
    client = RawClient(server.c2s_port, ca_file)
    client.login(DOMAIN, jid, current_password(jid), resource="r1")
    policy_slapd.ldapmodify(f"dn: {user_dn(jid)}\nchangetype: modify\n"
                            "replace: pwdAccountLockedTime\npwdAccountLockedTime: 000001010000Z\n")
    text = client.read_until(r"</stream:stream>", EXPIRY_DEADLINE)
    assert "not-authorized" in text and "your account was disabled" in text


def test_in_band_password_change_follows_the_directory_rules(server, ca_file):
    """XEP-0077 as Profanity's /changepassword sends it: the directory's
    quality rule (pwdMinLength 8) refuses a short password with its reason;
    a good one works at once for PLAIN and SCRAM, the old one nowhere."""
    jid = f"mover@{DOMAIN}"
    old, new = USERS[jid], "Moved-Passw0rd-" + uuid.uuid4().hex[:6]
    client = RawClient(server.c2s_port, ca_file)
    client.login(DOMAIN, jid, old, resource="r1")
    register = "<query xmlns='jabber:iq:register'><username>mover</username>"
    client.send(f"<iq type='set' id='c1' to='{DOMAIN}'>{register}<password>short</password>"
                "</query></iq>")
    refused = client.read_until(r"id='c1'.*?</iq>")
    assert "type='error'" in refused and "not-acceptable" in refused
    assert "quality" in refused.lower()
    client.send(f"<iq type='set' id='c2' to='{DOMAIN}'>{register}<password>{new}</password>"
                "</query></iq>")
    assert "type='result'" in client.read_until(r"id='c2'")
    client.close()
    assert scram(server, ca_file, jid, new) == "success"
    assert plain(server, ca_file, jid, new) == "success"
    assert scram(server, ca_file, jid, old) == "not-authorized"
    assert plain(server, ca_file, jid, old).startswith("not-authorized")
