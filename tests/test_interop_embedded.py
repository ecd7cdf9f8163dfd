"""slixmpp logs in to `mlink serve` on the embedded directory, every way."""

from __future__ import annotations

import pytest

from tests.slixclient import slixmpp_login

MECHANISMS = ["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256-PLUS"]


@pytest.mark.parametrize("direct_tls", [False, True], ids=["starttls", "direct-tls"])
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_slixmpp_login(embedded_server, ca_file, mechanism, direct_tls):
    port = embedded_server.tls_port if direct_tls else embedded_server.c2s_port
    mark = embedded_server.log.mark()
    result = slixmpp_login("alice@localhost", "alice-secret", port, mechanism, ca_file,
                           direct_tls=direct_tls, tls12=mechanism.endswith("-PLUS"))
    assert result.bound_jid is not None and result.bound_jid.startswith("alice@localhost/")
    assert result.pong
    # The server says which mechanism it ran: no silent fallback to another.
    embedded_server.wait_for_log(f"authenticated {result.bound_jid.split('/')[0]} with {mechanism}$", mark)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_slixmpp_wrong_password_fails(embedded_server, ca_file, mechanism):
    result = slixmpp_login("alice@localhost", "wrong", embedded_server.c2s_port, mechanism, ca_file)
    assert result.failed_auth and result.bound_jid is None
