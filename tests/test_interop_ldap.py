"""slixmpp logs in to `mlink serve` backed by a real slapd, every way; the
directory going away gives temporary-auth-failure and nothing breaks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.rawclient import RawClient, sasl_failure
from tests.serverproc import MlinkProcess, mlink, start_mlink
from tests.slixclient import slixmpp_login

MECHANISMS = ["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256-PLUS"]


@pytest.fixture(scope="module")
def ldap_server(slapd, tmp_path_factory, cert_files) -> Iterator[MlinkProcess]:
    directory = (
        '<directory backend="ldap">'
        f'<ldap base="{slapd.base_dn}" bind-dn="{slapd.bind_dn}" '
        f'bind-password="{slapd.bind_password}" pool-size="4" timeout="2">'
        f"<server>{slapd.url}</server></ldap></directory>"
    )
    setup = tmp_path_factory.mktemp("mlink-ldap")
    with start_mlink(setup, "example.com", cert_files, ldap=directory) as server:
        yield server


@pytest.mark.parametrize("direct_tls", [False, True], ids=["starttls", "direct-tls"])
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_slixmpp_login_against_slapd(ldap_server, ca_file, mechanism, direct_tls):
    port = ldap_server.tls_port if direct_tls else ldap_server.c2s_port
    mark = ldap_server.log.mark()
    result = slixmpp_login("alice@example.com", "alice-secret", port, mechanism, ca_file,
                           direct_tls=direct_tls, tls12=mechanism.endswith("-PLUS"))
    assert result.bound_jid is not None and result.bound_jid.startswith("alice@example.com/")
    assert result.pong
    ldap_server.wait_for_log(f"authenticated alice@example.com with {mechanism}$", mark)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_wrong_password_against_slapd(ldap_server, ca_file, mechanism):
    result = slixmpp_login("alice@example.com", "nope", ldap_server.c2s_port, mechanism, ca_file)
    assert result.failed_auth and result.bound_jid is None


def test_user_without_scram_secret_gets_one_at_her_first_plain_login(
        ldap_server, slapd, ca_file):
    """fran is provisioned by another tool: userPassword, no authPassword.
    SCRAM fails until a PLAIN login (checked by a bind) derives her secrets;
    from then on SCRAM works too."""
    jid, dn = "fran@example.com", "mail=fran@example.com,ou=People,dc=example,dc=com"
    slapd.ldapadd(f"dn: {dn}\nobjectClass: inetOrgPerson\ncn: fran\nsn: fran\n"
                  f"mail: {jid}\nuserPassword: fran-secret\n")
    try:
        mark = ldap_server.log.mark()
        scram = slixmpp_login(jid, "fran-secret", ldap_server.c2s_port, "SCRAM-SHA-256",
                              ca_file)
        assert scram.failed_auth and scram.bound_jid is None
        ldap_server.wait_for_log(r"fran@example\.com.*(authPassword|SCRAM)", mark)
        ok = slixmpp_login(jid, "fran-secret", ldap_server.c2s_port, "PLAIN", ca_file)
        assert ok.bound_jid is not None
        ldap_server.wait_for_log(r"SCRAM secrets of fran@example\.com renewed", mark)
        again = slixmpp_login(jid, "fran-secret", ldap_server.c2s_port, "SCRAM-SHA-256",
                              ca_file)
        assert again.bound_jid is not None
    finally:
        slapd.ldapdelete(dn)


def test_user_added_with_the_cli_logs_in_with_scram(ldap_server, ca_file):
    mlink("user", "add", "dave@example.com", "--password", "dave-secret",
          "--config", str(ldap_server.config))
    try:
        listed = mlink("user", "list", "--config", str(ldap_server.config)).stdout.split()
        assert "dave@example.com" in listed
        result = slixmpp_login("dave@example.com", "dave-secret", ldap_server.c2s_port,
                               "SCRAM-SHA-256", ca_file)
        assert result.bound_jid is not None
    finally:
        mlink("user", "delete", "dave@example.com", "--config", str(ldap_server.config))
    gone = slixmpp_login("dave@example.com", "dave-secret", ldap_server.c2s_port, "PLAIN", ca_file)
    assert gone.failed_auth


def test_directory_down_gives_temporary_auth_failure_then_recovers(ldap_server, slapd, ca_file):
    with slapd.stopped():
        for mechanism in ("PLAIN", "SCRAM-SHA-256"):
            client = RawClient(ldap_server.c2s_port, ca_file)
            try:
                client.starttls("example.com")
                if mechanism == "PLAIN":
                    reply = client.auth_plain("alice", "alice-secret")
                else:
                    client.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' "
                                "mechanism='SCRAM-SHA-256'>biwsbj1hbGljZSxyPWFiY2RlZmdo</auth>")
                    reply = client.read_until(r"</failure>|</challenge>")
                assert sasl_failure(reply) == "temporary-auth-failure", reply
            finally:
                client.close()
    # slapd is back: logins work again without restarting mlink.
    result = slixmpp_login("alice@example.com", "alice-secret", ldap_server.c2s_port,
                           "SCRAM-SHA-256", ca_file)
    assert result.bound_jid is not None
    result = slixmpp_login("bob@example.com", "bob-secret", ldap_server.c2s_port, "PLAIN", ca_file)
    assert result.bound_jid is not None
