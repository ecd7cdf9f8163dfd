"""SASL EXTERNAL with TLS client certificates (XEP-0178), on the wire.

A real server process with `<tls><client-ca>` and a CRL file; raw clients
over STARTTLS and direct TLS present certificates built here with the
`cryptography` library (xmppAddr and rfc822Name SANs, a revoked one, an
expired one, one for an unknown user, one from a CA without a CRL) and
check what the server answers.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mlink.directory import ldif
from mlink.modules.sasl_external import (
    XMPP_ADDR_OID,
    ExternalMechanism,
    Verdict,
    _der_utf8string,
)
from mlink.sasl.events import Challenge, Failure, Success
from mlink.sasl.registry import NeedCredential, SaslStreamInfo
from tests.rawclient import RawClient
from tests.serverproc import ALICE, ALICE_PW, BOB, BOB_PW, DOMAIN, MlinkProcess, start_mlink

SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
CAROL = f"carol@{DOMAIN}"  # no entry in the directory
DORA, DORA_PW = f"dora@{DOMAIN}", "dora-secret"  # locked by an administrator
CA_BASE = "ou=CAs,dc=localhost"  # where the directory-CA server finds its CA entry
DAY = dt.timedelta(days=1)
# Serial numbers of the certificates the CRL lists, and of the others.
REVOKED_SERIAL = 666
END_OF_REPLY = r"</failure>|<success[^>]*(/>|</success>)|</stream:stream>"


class Issuer:
    """A test CA (trustme) that also signs certificates and CRLs built here."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.key = serialization.load_pem_private_key(self.ca.private_key_pem.bytes(), None)
        self.cert = x509.load_pem_x509_certificate(self.ca.cert_pem.bytes())

    def issue(self, directory: Path, name: str, *, xmpp: tuple[str, ...] = (),
              email: tuple[str, ...] = (), serial: int | None = None,
              expired: bool = False) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        start, end = (now - 30 * DAY, now - DAY) if expired else (now - DAY, now + 30 * DAY)
        names: list[x509.GeneralName] = [
            x509.OtherName(XMPP_ADDR_OID, _utf8string(jid)) for jid in xmpp]
        names += [x509.RFC822Name(mail) for mail in email]
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(self.cert.subject)
                   .public_key(key.public_key())
                   .serial_number(serial or x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), True))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        cert = builder.sign(self.key, hashes.SHA256())  # type: ignore[arg-type]
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    def crl(self, path: Path, revoked: tuple[int, ...]) -> Path:
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - DAY).next_update(now + DAY))
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(now - DAY).build())
        crl = builder.sign(self.key, hashes.SHA256())  # type: ignore[arg-type]
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return path


def _utf8string(text: str) -> bytes:
    """A DER UTF8String (short lengths only: test JIDs are short)."""
    body = text.encode()
    assert len(body) < 0x80
    return bytes([0x0C, len(body)]) + body


class Setup:
    def __init__(self, server: MlinkProcess, certs: dict[str, tuple[Path, Path]],
                 ca_file: Path, ldif_path: Path) -> None:
        self.server = server
        self.certs = certs
        self.ca_file = ca_file
        self.ldif_path = ldif_path

    def client(self, cert: str | None, direct_tls: bool = False) -> RawClient:
        port = self.server.tls_port if direct_tls else self.server.c2s_port
        client = RawClient(port, self.ca_file, direct_tls=direct_tls,
                           client_cert=self.certs[cert] if cert else None)
        return client

    def features(self, client: RawClient, direct_tls: bool) -> str:
        return client.open(DOMAIN) if direct_tls else client.starttls(DOMAIN)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory,
          cert_files: tuple[Path, Path], ca_file: Path) -> Iterator[Setup]:
    where = tmp_path_factory.mktemp("external")
    issuer, other = Issuer(), Issuer()
    certs = {
        "alice": issuer.issue(where, "alice", xmpp=(ALICE,)),
        "bob-mail": issuer.issue(where, "bob-mail", email=(BOB,)),
        "both": issuer.issue(where, "both", xmpp=(ALICE, BOB)),
        "revoked": issuer.issue(where, "revoked", xmpp=(ALICE,), serial=REVOKED_SERIAL),
        "expired": issuer.issue(where, "expired", xmpp=(ALICE,), expired=True),
        "carol": issuer.issue(where, "carol", xmpp=(CAROL,)),
        "dora": issuer.issue(where, "dora", xmpp=(DORA,)),
        "no-san": issuer.issue(where, "no-san"),
        "other-ca": other.issue(where, "other-ca", xmpp=(ALICE,)),
    }
    ca_one, ca_two = where / "client-ca.pem", where / "client-ca-2.pem"
    issuer.ca.cert_pem.write_to_path(str(ca_one))
    other.ca.cert_pem.write_to_path(str(ca_two))
    crl = issuer.crl(where / "client-ca.crl", (REVOKED_SERIAL,))

    def edit(text: str) -> str:
        text = re.sub(r"<tls ([^>]*)/>",
                      rf"<tls \1><client-ca>{ca_one}</client-ca>"
                      rf"<client-ca>{ca_two}</client-ca></tls>", text, count=1)
        modules = (f"<modules><module name='sasl_external'><crl>{crl}</crl>"
                   "</module></modules>\n</mlink>")
        return text.replace("</mlink>", modules)

    setup_dir = where / "mlink"
    with start_mlink(setup_dir, DOMAIN, cert_files,
                     users={ALICE: ALICE_PW, BOB: BOB_PW, DORA: DORA_PW},
                     edit_config=edit) as server:
        yield Setup(server, certs, ca_file, setup_dir / "directory.ldif")


def external(client: RawClient, authzid: str = "") -> str:
    payload = base64.b64encode(authzid.encode()).decode() if authzid else "="
    client.send(f"<auth xmlns='{SASL}' mechanism='EXTERNAL'>{payload}</auth>")
    return client.read_until(END_OF_REPLY)


def bound_jid(client: RawClient) -> str:
    client.open(DOMAIN)
    client.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    reply = client.read_until(r"</iq>")
    match = re.search(r"<jid>([^<]+)</jid>", reply)
    assert match, reply
    return match.group(1).partition("/")[0]


def failure(reply: str) -> tuple[str, str]:
    match = re.search(rf"<failure xmlns='{SASL}'><([a-z-]+)/>(?:<text[^>]*>([^<]*)</text>)?",
                      reply)
    assert match, reply
    return match.group(1), match.group(2) or ""


# -- logging in --------------------------------------------------------------------------


@pytest.mark.parametrize("direct_tls", [False, True], ids=["starttls", "direct-tls"])
def test_xmpp_addr_certificate_logs_in(setup: Setup, direct_tls: bool) -> None:
    client = setup.client("alice", direct_tls)
    try:
        features = setup.features(client, direct_tls)
        assert "<mechanism>EXTERNAL</mechanism>" in features
        assert "<success" in external(client)
        assert bound_jid(client) == ALICE
    finally:
        client.close()


@pytest.mark.parametrize("direct_tls", [False, True], ids=["starttls", "direct-tls"])
def test_rfc822_certificate_logs_in(setup: Setup, direct_tls: bool) -> None:
    client = setup.client("bob-mail", direct_tls)
    try:
        setup.features(client, direct_tls)
        assert "<success" in external(client)
        assert bound_jid(client) == BOB
    finally:
        client.close()


def test_empty_challenge_without_initial_response(setup: Setup) -> None:
    client = setup.client("alice")
    try:
        client.starttls(DOMAIN)
        client.send(f"<auth xmlns='{SASL}' mechanism='EXTERNAL'/>")
        assert re.search(r"<challenge[^>]*>=</challenge>|<challenge[^>]*/>",
                         client.read_until(r"challenge"))
        client.send(f"<response xmlns='{SASL}'>=</response>")
        assert "<success" in client.read_until(END_OF_REPLY)
        assert bound_jid(client) == ALICE
    finally:
        client.close()


def test_authzid_picks_one_of_the_certificate_jids(setup: Setup) -> None:
    client = setup.client("both")
    try:
        client.starttls(DOMAIN)
        condition, text = failure(external(client))
        assert condition == "invalid-authzid"
        assert "several accounts" in text
        condition, text = failure(external(client, CAROL))
        assert (condition, text) == ("invalid-authzid",
                                     f"the client certificate is not valid for {CAROL}")
        assert "<success" in external(client, BOB)
        assert bound_jid(client) == BOB
    finally:
        client.close()


def test_directory_user_certificate_maps(setup: Setup) -> None:
    """A certificate without SANs, found in alice's userCertificate;binary
    (written into the embedded directory's file while the server runs)."""
    cert_pem = setup.certs["no-san"][0].read_bytes()
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    client = setup.client("no-san")
    try:
        client.starttls(DOMAIN)
        condition, text = failure(external(client))
        assert (condition, text) == ("not-authorized",
                                     f"the client certificate names no user of {DOMAIN}")
    finally:
        client.close()
    entries = ldif.parse(setup.ldif_path.read_text())
    for entry in entries:
        if entry.dn.lower().startswith(f"mail={ALICE},"):
            entry.set("userCertificate;binary", [der])
    fresh = setup.ldif_path.with_suffix(".new")
    fresh.write_text(ldif.dumps(entries))
    os.replace(fresh, setup.ldif_path)
    client = setup.client("no-san")
    try:
        client.starttls(DOMAIN)
        assert "<success" in external(client)
        assert bound_jid(client) == ALICE
    finally:
        client.close()


def edit_ldif(path: Path, change: Callable[[list[ldif.Entry]], list[ldif.Entry]]) -> None:
    """Rewrite the running server's embedded directory file, atomically
    (as another mlink process or an administrator's tool would)."""
    entries = change(ldif.parse(path.read_text()))
    fresh = path.with_suffix(".new")
    fresh.write_text(ldif.dumps(entries))
    os.replace(fresh, path)


def test_account_locked_by_administrator_is_refused(setup: Setup) -> None:
    """Issue 13: implicit authorisation refuses a valid certificate whose
    account the directory disables (here a permanent ppolicy lock)."""
    client = setup.client("dora")
    try:
        client.starttls(DOMAIN)
        assert "<success" in external(client)
    finally:
        client.close()

    def lock(entries: list[ldif.Entry]) -> list[ldif.Entry]:
        for entry in entries:
            if entry.dn.lower().startswith(f"mail={DORA},"):
                entry.set("pwdAccountLockedTime", ["000001010000Z"])
        return entries

    edit_ldif(setup.ldif_path, lock)
    client = setup.client("dora")
    try:
        client.starttls(DOMAIN)
        assert failure(external(client)) == ("account-disabled", "this account is locked")
    finally:
        client.close()


def test_client_without_certificate_uses_plain(setup: Setup) -> None:
    client = setup.client(None)
    try:
        features = client.starttls(DOMAIN)
        assert "EXTERNAL" not in features
        assert "<success" in client.auth_plain("alice", ALICE_PW)
        assert bound_jid(client) == ALICE
    finally:
        client.close()


# -- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(("cert", "condition", "text"), [
    ("revoked", "not-authorized", r"the client certificate has been revoked on \d{4}-\d\d-\d\d"),
    ("expired", "credentials-expired", r"the client certificate expired on \d{4}-\d\d-\d\d"),
    ("carol", "not-authorized", f"there is no account {CAROL}"),
    ("other-ca", "temporary-auth-failure",
     r"the revocation status of the client certificate is unknown: no CRL of .*"),
])
@pytest.mark.parametrize("direct_tls", [False, True], ids=["starttls", "direct-tls"])
def test_refused_with_a_reason(setup: Setup, cert: str, condition: str, text: str,
                               direct_tls: bool) -> None:
    client = setup.client(cert, direct_tls)
    try:
        setup.features(client, direct_tls)
        got_condition, got_text = failure(external(client))
        assert got_condition == condition
        assert re.fullmatch(text, got_text), got_text
        # The stream goes on: the user may still log in another way.
        assert "<success" in client.auth_plain("alice", ALICE_PW)
    finally:
        client.close()


def test_authzid_of_another_domain(setup: Setup) -> None:
    client = setup.client("alice")
    try:
        client.starttls(DOMAIN)
        condition, text = failure(external(client, "alice@elsewhere.example"))
        assert (condition, text) == ("invalid-authzid",
                                     f"the authzid must be a bare JID of {DOMAIN}")
    finally:
        client.close()


# -- the mechanism alone (sans-IO) -------------------------------------------------------


def _stream(cert: bytes | None = b"der") -> SaslStreamInfo:
    return SaslStreamInfo(domain="example.com", tls_active=True, channel_binding={},
                          peer_certificate=cert)


def test_mechanism_steps() -> None:
    mech = ExternalMechanism(_stream())
    assert mech.receive(None) == Challenge(b"")
    ask = mech.receive(b"")
    assert isinstance(ask, NeedCredential)
    assert (ask.kind, ask.username, ask.authzid) == ("certificate", "", None)
    assert mech.provide(Verdict("a@example.com")) == Success(None, "a@example.com", None)
    mech = ExternalMechanism(_stream())
    ask = mech.receive(b"A@Example.com")
    assert isinstance(ask, NeedCredential) and ask.authzid == "a@example.com"
    assert mech.provide(Verdict(None, "not-authorized", "no")) == Failure("not-authorized", "no")
    assert isinstance(ExternalMechanism(_stream()).receive(b"a@example.com/r"), Failure)
    assert isinstance(ExternalMechanism(_stream(None)).receive(b""), Failure)


def test_der_utf8string() -> None:
    assert _der_utf8string(_utf8string("a@b")) == "a@b"
    long = "x" * 200
    assert _der_utf8string(bytes([0x0C, 0x81, 200]) + long.encode()) == long
    assert _der_utf8string(b"\x16\x03a@b") is None  # an IA5String, not UTF8String
    assert _der_utf8string(b"\x0c\x05a@b") is None  # truncated


# -- CA certificates and CRLs held in the directory ---------------------------------------


@pytest.fixture(scope="module")
def directory_ca(tmp_path_factory: pytest.TempPathFactory,
                 cert_files: tuple[Path, Path], ca_file: Path) -> Iterator[Setup]:
    """A server with no <client-ca> file and no <crl> file: the CA and its
    CRL are an RFC 4523 pkiCA entry of the (embedded) directory, added
    while the server runs and read again every second."""
    where = tmp_path_factory.mktemp("external-directory-ca")
    issuer = Issuer()
    certs = {
        "alice": issuer.issue(where, "alice", xmpp=(ALICE,)),
        "revoked": issuer.issue(where, "revoked", xmpp=(ALICE,), serial=REVOKED_SERIAL),
    }
    crl = x509.load_pem_x509_crl(issuer.crl(where / "ca.crl", (REVOKED_SERIAL,)).read_bytes())

    def edit(text: str) -> str:
        modules = (f"<modules><module name='sasl_external'><ca-base>{CA_BASE}</ca-base>"
                   "<ca-refresh>1</ca-refresh></module></modules>\n</mlink>")
        return text.replace("</mlink>", modules)

    setup_dir = where / "mlink"
    with start_mlink(setup_dir, DOMAIN, cert_files, users={ALICE: ALICE_PW},
                     edit_config=edit) as server:
        ldif_path = setup_dir / "directory.ldif"

        def add_ca(entries: list[ldif.Entry]) -> list[ldif.Entry]:
            return [*entries,
                    ldif.Entry(CA_BASE, {"objectClass": ["organizationalUnit"], "ou": ["CAs"]}),
                    ldif.Entry(f"cn=Test CA,{CA_BASE}", {
                        "objectClass": ["applicationProcess", "pkiCA"], "cn": ["Test CA"],
                        "cACertificate;binary": [
                            issuer.cert.public_bytes(serialization.Encoding.DER)],
                        "certificateRevocationList;binary": [
                            crl.public_bytes(serialization.Encoding.DER)],
                    })]

        edit_ldif(ldif_path, add_ca)
        yield Setup(server, certs, ca_file, ldif_path)


def external_reply_once_offered(setup: Setup, cert: str, wanted: str) -> str:
    """The answer to EXTERNAL with `cert`, polled until it matches `wanted`
    (the server reads its CA entries every second), at most 15 s."""
    deadline = time.monotonic() + 15
    reply = ""
    while time.monotonic() < deadline:
        client = setup.client(cert)
        try:
            if "<mechanism>EXTERNAL</mechanism>" in client.starttls(DOMAIN):
                reply = external(client)
                if re.search(wanted, reply):
                    return reply
        finally:
            client.close()
        time.sleep(0.1)  # poll interval, not a synchronisation
    raise AssertionError(f"no reply matching {wanted!r} within 15 s; last: {reply!r}")


def test_directory_ca_and_crl(directory_ca: Setup) -> None:
    """Issue 13, item 4: a CA certificate and CRL from the directory let a
    client certificate in and keep a revoked one out; a CA entry removed
    from the directory stops its certificates at the next read."""
    external_reply_once_offered(directory_ca, "alice", "<success")
    reply = external_reply_once_offered(directory_ca, "revoked", "<failure")
    condition, text = failure(reply)
    assert condition == "not-authorized"
    assert re.fullmatch(r"the client certificate has been revoked on \d{4}-\d\d-\d\d", text)

    edit_ldif(directory_ca.ldif_path,
              lambda entries: [e for e in entries if "ou=cas" not in e.dn.lower()])
    reply = external_reply_once_offered(directory_ca, "alice", "<failure")
    condition, text = failure(reply)
    assert condition == "not-authorized"
    assert text.endswith("of the client certificate is not a trusted CA"), text
