"""The sans-IO c2s state machine, driven byte by byte without sockets."""

from __future__ import annotations

import base64
import re

import pytest

from mlink.sasl.registry import UNAVAILABLE
from mlink.sasl.secrets import derive_secret
from mlink.stream import c2s

HEADER = (
    "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    "xmlns:stream='http://etherx.jabber.org/streams' to='{to}' version='1.0'>"
)


def make(tls_active: bool = True, tls_required: bool = True) -> c2s.C2SStream:
    return c2s.C2SStream(
        c2s.StreamSettings(
            domains=frozenset({"example.com"}),
            tls_available=True,
            tls_required=tls_required,
            tls_active=tls_active,
        )
    )


def send(stream: c2s.C2SStream, text: str) -> tuple[list, str]:
    events = stream.receive_data(text.encode())
    return events, stream.data_to_send().decode()


def open_stream(stream: c2s.C2SStream, to: str = "example.com") -> str:
    events, out = send(stream, HEADER.format(to=to))
    assert events == []
    return out


def plain_login(stream: c2s.C2SStream, password_ok: bool = True) -> str:
    open_stream(stream)
    token = base64.b64encode(b"\0alice\0secret").decode()
    events, _ = send(stream, f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
    assert [(e.jid, e.request.kind, e.request.detail["password"]) for e in events] == [("alice@example.com", "password", "secret")]
    events = stream.credential_provided(password_ok)
    return stream.data_to_send().decode()


def bound(resource: str = "phone") -> c2s.C2SStream:
    stream = make()
    assert "<success" in plain_login(stream)
    open_stream(stream)
    events, _ = send(stream, "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                             f"<resource>{resource}</resource></bind></iq>")
    assert events == [c2s.BindRequested(resource)]
    stream.bind_done(resource)
    assert f"<jid>alice@example.com/{resource}</jid>" in stream.data_to_send().decode()
    return stream


def stream_error(out: str) -> str:
    match = re.search(r"<stream:error><([a-z-]+) xmlns='urn:ietf:params:xml:ns:xmpp-streams'", out)
    assert match, out
    assert out.endswith("</stream:stream>")
    return match.group(1)


@pytest.mark.parametrize(
    "header, condition",
    [
        (HEADER.format(to="other.org"), "host-unknown"),
        (HEADER.replace(" to='{to}'", ""), "improper-addressing"),
        (HEADER.format(to="example.com").replace("version='1.0'", "version='0.9'"),
         "unsupported-version"),
        (HEADER.format(to="example.com").replace(" version='1.0'>", ">"), "unsupported-version"),
        (HEADER.format(to="example.com").replace("jabber:client", "jabber:server"),
         "invalid-namespace"),
        (HEADER.format(to="example.com").replace("etherx.jabber.org/streams", "wrong.example/s"),
         "invalid-namespace"),
        (HEADER.format(to="example.com").replace("stream:", "s:").replace("xmlns:stream", "xmlns:s"),
         "bad-namespace-prefix"),
    ],
)
def test_bad_headers_get_their_stream_error_after_our_header(header, condition):
    stream = make()
    events, out = send(stream, header)
    assert out.startswith("<?xml version='1.0'?><stream:stream ")
    assert stream_error(out) == condition
    assert events == [c2s.StreamEnded(condition, peer_closed=False)]


def test_features_before_tls_offer_only_required_starttls():
    stream = make(tls_active=False)
    out = open_stream(stream)
    assert "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>" in out
    assert "mechanisms" not in out
    events, out = send(stream, "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><message/>")
    assert events == [c2s.StartTLS()]
    assert out == "<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
    stream.tls_started({"tls-server-end-point": b"x" * 32})
    out = open_stream(stream)
    assert "starttls" not in out
    mechs = re.findall(r"<mechanism>([^<]+)</mechanism>", out)
    assert mechs == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]
    assert "<channel-binding type='tls-server-end-point'/>" in out


def test_auth_before_tls_is_encryption_required():
    stream = make(tls_active=False)
    open_stream(stream)
    _, out = send(stream, "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGEAYg==</auth>")
    assert "<encryption-required/>" in out


def test_without_tls_required_plain_is_offered_in_the_clear():
    stream = c2s.C2SStream(c2s.StreamSettings(frozenset({"example.com"}), False, False))
    out = open_stream(stream)
    assert "<mechanism>PLAIN</mechanism>" in out and "starttls" not in out


def test_stanza_before_authentication_is_not_authorized():
    stream = make()
    open_stream(stream)
    events, out = send(stream, "<message to='bob@example.com'><body>hi</body></message>")
    assert stream_error(out) == "not-authorized"


@pytest.mark.parametrize(
    "auth, condition",
    [
        ("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='X-UNKNOWN'/>", "invalid-mechanism"),
        ("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='DIGEST-MD5'/>", "invalid-mechanism"),
        ("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>!!!</auth>", "incorrect-encoding"),
        ("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
         + base64.b64encode(b"no-nul-here").decode() + "</auth>", "malformed-request"),
        ("<abort xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>", "aborted"),
    ],
)
def test_sasl_failures(auth, condition):
    stream = make()
    open_stream(stream)
    _, out = send(stream, auth)
    assert out.startswith(f"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><{condition}/>")
    assert stream.state is c2s.State.NEGOTIATING  # the client may try again


def test_wrong_password_then_right_one_on_the_same_stream():
    stream = make()
    out = plain_login(stream, password_ok=False)
    assert "<not-authorized/>" in out
    token = base64.b64encode(b"\0alice\0secret").decode()
    events, _ = send(stream, f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
    stream.credential_provided(True)
    assert "<success" in stream.data_to_send().decode()


def test_directory_down_is_temporary_auth_failure():
    stream = make()
    open_stream(stream)
    token = base64.b64encode(b"\0alice\0secret").decode()
    send(stream, f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
    stream.credential_provided(UNAVAILABLE)
    assert "<temporary-auth-failure/>" in stream.data_to_send().decode()


def test_scram_sha_256_exchange():
    stream = make()
    open_stream(stream)
    first = "n,,n=alice,r=clientnonce"
    events, _ = send(stream, "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>"
                             + base64.b64encode(first.encode()).decode() + "</auth>")
    assert [(e.jid, e.request.kind, e.request.detail["mechanism"]) for e in events] == [("alice@example.com", "scram-secret", "SCRAM-SHA-256")]
    secret = derive_secret("SCRAM-SHA-256", "pencil", b"salt" * 4, 4096)
    stream.credential_provided(secret)
    out = stream.data_to_send().decode()
    assert out.startswith("<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>")


def test_bind_bad_resource_is_bad_request_and_stream_survives():
    stream = make()
    plain_login(stream)
    open_stream(stream)
    events, out = send(stream, "<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                               "<resource>bad\u200bres</resource></bind></iq>")
    assert events == []
    assert "<bad-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>" in out
    assert "type='error'" in out and "id='b1'" in out
    events, _ = send(stream, "<iq type='set' id='b2'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    assert events == [c2s.BindRequested(None)]


def test_after_bind_stanzas_are_stamped_and_legacy_session_answered():
    stream = bound()
    events, out = send(stream, "<iq type='set' id='s'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
    assert events == [] and out == "<iq type='result' id='s'/>"
    events, _ = send(stream, "<message to='bob@example.com'><body>hi</body></message>")
    [ev] = events
    assert ev.element.get("from") == "alice@example.com/phone"


def test_spoofed_from_is_invalid_from():
    stream = bound()
    _, out = send(stream, "<message from='bob@example.com/x' to='carol@example.com'/>")
    assert stream_error(out) == "invalid-from"


def test_closing_handshake():
    stream = bound()
    events, out = send(stream, "</stream:stream>")
    assert events == [c2s.StreamEnded(None, peer_closed=True)]
    assert out == "</stream:stream>"


def test_unknown_top_level_element_is_unsupported_stanza_type():
    stream = bound()
    _, out = send(stream, "<foo xmlns='urn:example'/>")
    assert stream_error(out) == "unsupported-stanza-type"


def test_malformed_xml_is_not_well_formed():
    stream = bound()
    events, out = send(stream, "<message><body></message>")
    assert stream_error(out) == "not-well-formed"
    assert events == [c2s.StreamEnded("not-well-formed", peer_closed=False)]


def test_server_close_with_conflict():
    stream = bound()
    ended = stream.close("conflict", "replaced")
    assert ended.condition == "conflict"
    assert stream_error(stream.data_to_send().decode()) == "conflict"


def test_failures_past_the_limit_end_the_stream_with_policy_violation():
    """RFC 6120 §6.4.5: the last failure allowed is followed by a stream
    error; a failure that is the server's fault does not count."""
    stream = c2s.C2SStream(c2s.StreamSettings(
        domains=frozenset({"example.com"}), tls_available=True, tls_required=True,
        tls_active=True, max_auth_failures=2))
    open_stream(stream)
    token = base64.b64encode(b"\0alice\0secret").decode()
    auth = f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>"
    send(stream, auth)
    stream.credential_provided(UNAVAILABLE)  # temporary-auth-failure: not counted
    send(stream, auth)
    stream.credential_provided(False)
    assert stream.state is c2s.State.NEGOTIATING
    send(stream, auth)
    events = stream.credential_provided(False)
    out = stream.data_to_send().decode()
    assert [type(e) for e in events] == [c2s.AuthFailed, c2s.StreamEnded]
    assert events[1].condition == "policy-violation"
    assert "<not-authorized/>" in out and "<policy-violation" in out
    assert stream.state is c2s.State.CLOSED


def test_stanza_in_progress_ignores_idle_streams_and_keepalives():
    stream = make()
    plain_login(stream)
    assert not stream.stanza_in_progress
    send(stream, HEADER.format(to="example.com"))
    assert not stream.stanza_in_progress
    for partial, expected in [(" ", False), ("<iq type='get' id='1'", True),
                              (" to='example.com'>", True), ("<ping xmlns='urn:xmpp:ping'/>", True),
                              ("</iq>", False), ("\n", False), ("<presence/><pres", True),
                              ("ence/>", False)]:
        stream._parser.feed(partial.encode())
        assert stream.stanza_in_progress is expected, partial
