"""The LDAP directory against a private slapd (tests/ldap_fixtures.py)."""

from __future__ import annotations

import base64
import dataclasses
import os
import socket

import pytest
import trio

from mlink.config_model import DirectoryConfig
from mlink.directory import open_directory
from mlink.directory.base import DirectoryError, DirectoryUnavailable, NoSuchUser, UserExists
from mlink.directory.ldap import LDAPDirectory
from mlink.directory.names import escape_dn_value, escape_filter_value
from mlink.directory.port import Modification


@pytest.fixture
async def directory(ldap_config: DirectoryConfig):
    d = open_directory(ldap_config)
    assert isinstance(d, LDAPDirectory)
    yield d
    await d.aclose()


def test_escaping():
    assert escape_filter_value("*)(mail=*") == "\\2a\\29\\28mail=\\2a"
    assert escape_filter_value("a\\b\0") == "a\\5cb\\00"
    assert escape_dn_value("a,b+c=d") == "a\\,b\\+c\\=d"
    assert escape_dn_value("#x ") == "\\#x\\ "


async def test_sample_users(directory: LDAPDirectory, slapd):
    for jid, password in slapd.users.items():
        assert await directory.user_exists(jid)
        assert await directory.check_password(jid, password)
        assert not await directory.check_password(jid, password + "x")
        assert not await directory.check_password(jid, "")  # never an anonymous bind
    assert not await directory.check_password("nobody@example.com", "alice-secret")
    assert not await directory.user_exists("nobody@example.com")
    s = await directory.scram_secret("alice@example.com", "SCRAM-SHA-256")
    assert s is not None and s.matches_password("alice-secret")
    s1 = await directory.scram_secret("alice@example.com", "SCRAM-SHA-1")
    assert s1 is not None and s1.matches_password("alice-secret")
    assert await directory.scram_secret("nobody@example.com", "SCRAM-SHA-1") is None
    assert set(slapd.users) <= set(await directory.list_users())
    await directory.ping()


async def test_user_without_authpassword(directory: LDAPDirectory, caplog):
    with caplog.at_level("INFO", logger="mlink.directory"):
        assert await directory.scram_secret("carol@example.com", "SCRAM-SHA-256") is None
    assert "has no authPassword value for SCRAM-SHA-256" in caplog.text
    assert "PLAIN still works" in caplog.text
    assert await directory.check_password("carol@example.com", "carol-secret")


async def test_filter_injection_finds_nothing(directory: LDAPDirectory):
    for evil in ["*", "*)(mail=*", "alice@example.com)(|(mail=*", "*@example.com", "al\\2a"]:
        assert not await directory.user_exists(evil)
        assert not await directory.check_password(evil, "alice-secret")
        assert await directory.scram_secret(evil, "SCRAM-SHA-256") is None


async def test_add_set_password_delete(directory: LDAPDirectory):
    jid = "dave+tag@example.com"  # '+' must be escaped in the DN
    await directory.add_user(jid, "dave-1")
    try:
        with pytest.raises(UserExists):
            await directory.add_user(jid, "again")
        assert jid in await directory.list_users()
        assert await directory.check_password(jid, "dave-1")
        secret = await directory.scram_secret(jid, "SCRAM-SHA-256")
        assert secret is not None and secret.matches_password("dave-1")

        await directory.set_password(jid, "dave-2")
        assert await directory.check_password(jid, "dave-2")
        assert not await directory.check_password(jid, "dave-1")
        secret = await directory.scram_secret(jid, "SCRAM-SHA-1")
        assert secret is not None and secret.matches_password("dave-2")
    finally:
        await directory.delete_user(jid)
    assert not await directory.user_exists(jid)
    with pytest.raises(NoSuchUser):
        await directory.delete_user(jid)
    with pytest.raises(NoSuchUser):
        await directory.set_password(jid, "x")
    with pytest.raises(DirectoryError):
        await directory.add_user("not a jid", "x")


async def test_set_password_adds_secrets_to_foreign_user(directory: LDAPDirectory, slapd):
    """A user provisioned by another tool gets mlinkUser and SCRAM secrets
    when mlink sets the password; the sample password is restored after."""
    jid = "carol@example.com"
    try:
        await directory.set_password(jid, "carol-new")
        assert await directory.check_password(jid, "carol-new")
        s = await directory.scram_secret(jid, "SCRAM-SHA-256")
        assert s is not None and s.matches_password("carol-new")
    finally:
        await directory.set_password(jid, slapd.users[jid])
        # Take the secrets away again so carol stays "foreign" for other tests.
        dn = "mail=carol@example.com,ou=People,dc=example,dc=com"
        await directory.port.modify(dn, [Modification("delete", "authPassword"),
                                         Modification("delete", "objectClass", ("mlinkUser",))])


async def test_import_1000_users(directory: LDAPDirectory):
    pairs = [(f"imp{i}@example.org", f"pw{i}") for i in range(1000)]
    try:
        with trio.fail_after(60):
            assert await directory.import_users(pairs) == 1000
        users = set(await directory.list_users())  # paged: more than one page
        assert {jid for jid, _ in pairs} <= users
        assert await directory.check_password("imp7@example.org", "pw7")
        # Importing again updates the existing entries.
        with trio.fail_after(60):
            await directory.import_users([("imp7@example.org", "changed")])
        assert await directory.check_password("imp7@example.org", "changed")
        assert not await directory.check_password("imp7@example.org", "pw7")
    finally:
        async with trio.open_nursery() as nursery:
            for jid, _ in pairs:
                nursery.start_soon(directory.delete_user, jid)


async def test_concurrent_requests_share_the_pool(directory: LDAPDirectory):
    results = []

    async def one(i: int) -> None:
        results.append(await directory.user_exists("alice@example.com"))

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(one, i)
    assert results == [True] * 50
    assert len(directory.port._idle) <= directory.config.pool_size


async def test_server_down_then_back(directory: LDAPDirectory, slapd):
    assert await directory.check_password("alice@example.com", "alice-secret")  # pool warm
    with slapd.stopped():
        for call in (
            directory.check_password("alice@example.com", "alice-secret"),
            directory.scram_secret("alice@example.com", "SCRAM-SHA-256"),
            directory.list_users(),
            directory.ping(),
        ):
            with trio.fail_after(directory.port.timeout * 4):
                with pytest.raises(DirectoryUnavailable):
                    await call
    # Same port, same data: the pool reconnects on the next request.
    assert await directory.check_password("alice@example.com", "alice-secret")
    assert await directory.scram_secret("bob@example.com", "SCRAM-SHA-1") is not None


async def _unavailable_without_stalling(cfg, url: str) -> None:
    """A request to `url` ends with DirectoryUnavailable within a few
    timeouts, and the loop keeps ticking meanwhile."""
    d = LDAPDirectory(dataclasses.replace(cfg, servers=[url], timeout=0.5))
    ticks = 0
    longest = 0.0

    async def ticker():
        nonlocal ticks, longest
        while True:
            before = trio.current_time()
            await trio.sleep(0.01)
            longest = max(longest, trio.current_time() - before)
            ticks += 1

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            start = trio.current_time()
            with pytest.raises(DirectoryUnavailable):
                await d.user_exists("alice@example.com")
            with pytest.raises(DirectoryUnavailable):
                await d.check_password("alice@example.com", "alice-secret")
            elapsed = trio.current_time() - start
            nursery.cancel_scope.cancel()
    finally:
        await d.aclose()
    assert elapsed < 4.0, elapsed
    assert ticks >= 20 and longest < 0.3, (ticks, longest)


async def test_silent_server_times_out_without_blocking_the_loop(ldap_config):
    """A server that accepts TCP but never answers LDAP."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        await _unavailable_without_stalling(
            ldap_config.ldap, f"ldap://127.0.0.1:{silent.getsockname()[1]}"
        )


async def test_black_holed_server_does_not_block_the_loop(ldap_config):
    """SYNs dropped (bonsai #113): a full listen backlog on loopback makes
    the kernel drop new SYNs, as a firewall DROP rule would."""
    with socket.socket() as hole, socket.socket() as filler:
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        filler.connect(hole.getsockname())  # fills the backlog
        await _unavailable_without_stalling(
            ldap_config.ldap, f"ldap://127.0.0.1:{hole.getsockname()[1]}"
        )


async def test_failover_to_second_server(ldap_config, slapd):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = f"ldap://127.0.0.1:{s.getsockname()[1]}"
    cfg = dataclasses.replace(ldap_config.ldap, servers=[dead, slapd.url])
    d = LDAPDirectory(cfg)
    try:
        assert await d.check_password("bob@example.com", "bob-secret")
        assert await d.user_exists("bob@example.com")
    finally:
        await d.aclose()


async def test_wrong_service_password_is_unavailable(ldap_config):
    cfg = dataclasses.replace(ldap_config.ldap, bind_password="wrong")
    d = LDAPDirectory(cfg)
    with pytest.raises(DirectoryUnavailable):
        await d.user_exists("alice@example.com")
    await d.aclose()


async def test_any_valid_localpart_can_be_provisioned(directory: LDAPDirectory):
    """RFC 7622 allows '#', '+', ',' and friends in a localpart; the DN is
    escaped (RFC 4514), or named by a digest where libldap cannot take the
    character, and the account works like any other."""
    for jid in ("hash#1@example.org", "#lead@example.org", "a+b,c;d@example.org"):
        await directory.add_user(jid, "Passw0rd-long")
        try:
            assert await directory.check_password(jid, "Passw0rd-long")
            await directory.set_password(jid, "Passw0rd-other")
            assert await directory.check_password(jid, "Passw0rd-other")
            assert jid in await directory.list_users()
        finally:
            await directory.delete_user(jid)
        assert not await directory.user_exists(jid)


async def test_certificate_authorities_from_slapd(directory: LDAPDirectory, slapd):
    """RFC 4523 CA entries as an organisation's slapd holds them (values with
    the ;binary option), read for SASL EXTERNAL (issue 13, item 4)."""
    import trustme
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca = trustme.CA()
    der = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).public_bytes(
        serialization.Encoding.DER)
    base = f"ou=CAs-{os.getpid()},{slapd.base_dn}"
    slapd.ldapadd(
        f"dn: {base}\nobjectClass: organizationalUnit\nou: CAs-{os.getpid()}\n\n"
        f"dn: cn=Issuing CA,{base}\nobjectClass: applicationProcess\nobjectClass: pkiCA\n"
        f"cn: Issuing CA\ncACertificate;binary:: {base64.b64encode(der).decode()}\n")
    try:
        (found,) = await directory.certificate_authorities(base)
        assert found.dn.lower() == f"cn=issuing ca,{base}".lower()
        assert found.certificates == (der,) and found.crls == ()
        assert await directory.certificate_authorities(f"ou=nowhere,{slapd.base_dn}") == []
    finally:
        slapd.ldapdelete(base, recursive=True)
