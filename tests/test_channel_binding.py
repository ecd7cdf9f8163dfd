"""Channel-binding data: tls-server-end-point, tls-exporter via ctypes, XEP-0440 order.

Why: a wrong binding value does not weaken security, it breaks every
SCRAM-*-PLUS login; and the ctypes exporter pokes at CPython internals, so it
is checked against OpenSSL's own command-line tool, not only against itself.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from mlink.sasl.channel_binding import (
    ChannelBinding,
    UnsupportedCertificate,
    channel_binding_element_types,
    signature_hash_name,
    tls_server_end_point,
)
from mlink.transport.tls_exporter import tls_exporter


def _self_signed(
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    algorithm: hashes.HashAlgorithm | None,
) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example.org")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, algorithm)
    )
    return cert.public_bytes(serialization.Encoding.DER)


# -- tls-server-end-point --------------------------------------------------

# Fixtures made once with `openssl req -x509 -<hash>`: cryptography refuses to
# sign with SHA-1/MD5 today, yet such certificates still exist in the wild.
# ECDSA P-256 with SHA-1, CN=example.org.
SHA1_CERT_B64 = (
    "MIIBgDCCASagAwIBAgIUFvALLvqT57CVoRbpWF8yDYTN9rEwCQYHKoZIzj0EATAWMRQwEgYDVQQDDAtleGFtcGxl"
    "Lm9yZzAeFw0yNjExMjUyMDAyNDVaFw0zNjExMjIyMDAyNDVaMBYxFDASBgNVBAMMC2V4YW1wbGUub3JnMFkwEwYH"
    "KoZIzj0CAQYIKoZIzj0DAQcDQgAE0WGnRiZwB4X770TTrlK7cWPoYF7Zlx4o8EbtfUoHSbD6LlaJgjwYG7WdcByo"
    "tpjB/daqNPM30hOfBtsGqTxFmKNTMFEwHQYDVR0OBBYEFJ5t1DDNXa4DTNwb2cjH2tS6EmfLMB8GA1UdIwQYMBaA"
    "FJ5t1DDNXa4DTNwb2cjH2tS6EmfLMA8GA1UdEwEB/wQFMAMBAf8wCQYHKoZIzj0EAQNJADBGAiEAx8FP0KVE1MtE"
    "g85rxZrEoxDJHafOy+etLonr6cMgyz4CIQCX9dNdg4Gy+6KMTvV6tX/eDDOL8W0blQUrWb7xAx4P+g=="
)
# RSA-1024 with MD5, CN=md5.example.
MD5_CERT_B64 = (
    "MIICCDCCAXGgAwIBAgIUKGoFtSRmtYed/OsscVEAEvYIh4gwDQYJKoZIhvcNAQEEBQAwFjEUMBIGA1UEAwwLbWQ1"
    "LmV4YW1wbGUwHhcNMjYxMTI1MjAwMjQ3WhcNMzYxMTIyMjAwMjQ3WjAWMRQwEgYDVQQDDAttZDUuZXhhbXBsZTCB"
    "nzANBgkqhkiG9w0BAQEFAAOBjQAwgYkCgYEAwNCxOJX8I9v0JOfQ4/7VKEkQWSz5Q5OLtnusSK/+owgOSNsUJ3VS"
    "MSt0H/PVHuoBS0TLT8mQ1IjbTJFzYVc0Ozt+V3hYWXRJG366ibanpTmeHZSKN0k5RL70p8nLe6B6F5MZi6nc0jPw"
    "F34m/b6lvQIZE0qHf/WPoTlQfXQw9y0CAwEAAaNTMFEwHQYDVR0OBBYEFLxALlnz4SNIqn7k7ASMHl1aGvn2MB8G"
    "A1UdIwQYMBaAFLxALlnz4SNIqn7k7ASMHl1aGvn2MA8GA1UdEwEB/wQFMAMBAf8wDQYJKoZIhvcNAQEEBQADgYEA"
    "Tyhzv33D8u/2zPedDnasNbSEzOoVj+5emykFfeI5pMPqbT4Pr46pa1XQXIT4WVSQNfRGOVKo88pmYOkfiN1ugH1c"
    "SzLSTqnT/JBnrurPGdZ2aVnw0M7kTq8UQGcc1byiPxs+alnFM0zICWRvIe4rTwmHK06bXO3YNad/hQq+aXc="
)


def test_end_point_uses_the_signature_hash() -> None:
    der = _self_signed(ec.generate_private_key(ec.SECP384R1()), hashes.SHA384())
    assert tls_server_end_point(der) == hashlib.sha384(der).digest()


@pytest.mark.parametrize("cert_b64", [SHA1_CERT_B64, MD5_CERT_B64], ids=["sha1", "md5"])
def test_end_point_upgrades_weak_hashes_to_sha256(cert_b64: str) -> None:
    der = base64.b64decode(cert_b64)
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()


def test_end_point_of_trustme_certificate() -> None:
    cert = trustme.CA().issue_cert("example.org")
    pem = cert.cert_chain_pems[0].bytes()
    der = ssl.PEM_cert_to_DER_cert(pem.decode())
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()


_RSA_KEY = None


def _rsa_key() -> rsa.RSAPrivateKey:
    global _RSA_KEY
    if _RSA_KEY is None:
        _RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _RSA_KEY


_HASHES = [hashes.SHA224(), hashes.SHA256(), hashes.SHA384(), hashes.SHA512(),
           hashes.SHA3_256()]
# Every key type with every hash, but the pairs `cryptography` cannot
# sign or read back (DSA beyond SHA-256): listed, not skipped.
_SIGNABLE = [(kind, algorithm) for kind in ("rsa", "rsa-pss", "ec", "dsa")
             for algorithm in _HASHES
             if not (kind == "dsa" and algorithm.name not in ("sha224", "sha256"))]


@pytest.mark.parametrize(("kind", "algorithm"), _SIGNABLE,
                         ids=[f"{a.name}-{k}" for k, a in _SIGNABLE])
def test_end_point_hash_read_from_der_agrees_with_cryptography(kind, algorithm) -> None:
    """The signature hash is read from the DER bytes without `cryptography`
    (issue 14: that package cost each shard ~9 MiB); it must name the hash
    `cryptography` finds, for every key type and hash that can sign."""
    key: Any
    padding_arg: dict[str, Any] = {}
    if kind == "dsa":
        key = dsa.generate_private_key(key_size=2048)
    elif kind == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = _rsa_key()
        if kind == "rsa-pss":
            padding_arg["rsa_padding"] = padding.PSS(padding.MGF1(algorithm),
                                                     padding.PSS.DIGEST_LENGTH)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example.org")])
    now = datetime.datetime.now(datetime.UTC)
    try:
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, algorithm, **padding_arg)
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise AssertionError(f"cryptography cannot sign {kind} with {algorithm.name}") from exc
    der = cert.public_bytes(serialization.Encoding.DER)
    expected = x509.load_der_x509_certificate(der).signature_hash_algorithm
    assert expected is not None
    assert signature_hash_name(der) == expected.name.replace("-", "_")
    assert tls_server_end_point(der) == hashlib.new(expected.name, der).digest()


def test_end_point_undefined_for_eddsa() -> None:
    der = _self_signed(ed25519.Ed25519PrivateKey.generate(), None)
    with pytest.raises(UnsupportedCertificate):
        tls_server_end_point(der)


def test_end_point_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        tls_server_end_point(b"not a certificate")


# -- XEP-0440 ordering -----------------------------------------------------


def test_element_types_order_and_filter() -> None:
    got = channel_binding_element_types(["tls-unique", "bogus", "tls-exporter"])
    assert got == ["tls-exporter", "tls-unique"]
    assert channel_binding_element_types([]) == []


def test_channel_binding_supported_ignores_unknown_types() -> None:
    assert ChannelBinding({"tls-exporter": b"x", "bogus": b"y"}).supported() == {"tls-exporter"}


# -- tls-exporter ----------------------------------------------------------


def _handshake(maximum: ssl.TLSVersion) -> tuple[ssl.SSLObject, ssl.SSLObject, bytes]:
    """A full TLS handshake over memory BIOs; returns server, client, server cert DER."""
    ca = trustme.CA()
    cert = ca.issue_cert("example.org")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    server_ctx.maximum_version = maximum
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="example.org")
    done = set()
    for _ in range(10):  # a handful of flights is enough for TLS 1.2 and 1.3
        for obj in (client, server):
            try:
                obj.do_handshake()
                done.add(id(obj))
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert len(done) == 2
    der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
    return server, client, der


def test_tls_exporter_agrees_on_both_ends() -> None:
    server, client, _ = _handshake(ssl.TLSVersion.TLSv1_3)
    ours = tls_exporter(server)
    assert ours is not None and len(ours) == 32
    assert ours == tls_exporter(client)
    other, _, _ = _handshake(ssl.TLSVersion.TLSv1_3)
    assert tls_exporter(other) != ours


def test_tls_exporter_is_none_below_tls13() -> None:
    server, client, _ = _handshake(ssl.TLSVersion.TLSv1_2)
    assert tls_exporter(server) is None and tls_exporter(client) is None


def test_end_point_matches_what_the_client_sees() -> None:
    server, client, der = _handshake(ssl.TLSVersion.TLSv1_3)
    peer = client.getpeercert(binary_form=True)
    assert peer is not None
    assert tls_server_end_point(peer) == tls_server_end_point(der)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_tls_exporter_matches_openssl_s_client() -> None:
    """Independent check: OpenSSL's own client exports the same keying material."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("example.org").configure_cert(server_ctx)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    result: dict[str, bytes | None] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            result["ours"] = tls_exporter(tls)
            tls.recv(16)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        proc = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-tls1_3",
                "-keymatexport",
                "EXPORTER-Channel-Binding",
                "-keymatexportlen",
                "32",
            ],
            input=b"bye\n",
            capture_output=True,
            timeout=30,
        )
    finally:
        thread.join(timeout=30)
        listener.close()
    match = re.search(rb"Keying material: ([0-9A-F]+)", proc.stdout)
    assert match, proc.stdout[-2000:]
    assert result["ours"] == bytes.fromhex(match.group(1).decode())


def test_sasl_package_never_imports_trio() -> None:
    code = (
        "import sys, mlink.sasl.mechanisms, mlink.sasl.saslprep, mlink.sasl.channel_binding;"
        "assert 'trio' not in sys.modules, 'trio imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
