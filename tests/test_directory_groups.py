"""Directory groups for roster pre-population: `roster_groups` on both
backends (groupOfNames, groupOfUniqueNames, posixGroup; by DN and by
filter), and a 5,000-member group behind a server size limit of 500.

Groups of a test live under an OU of their own, removed afterwards, so the
sample groups (conf/groups.ldif) stay as they are for the rest of the session.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlink.config_model import DirectoryConfig, LDAPConfig, RosterGroupConfig
from mlink.directory import ldif, open_directory
from mlink.directory.base import Directory, DirectoryGroup
from mlink.directory.filters import FilterError, matches, parse_filter
from mlink.directory.names import normalize_dn
from tests.ldap_fixtures import (
    BIND_DN,
    BIND_PASSWORD,
    Slapd,
    embedded_directory,
    private_slapd,
    sample_entries,
)

BASE_DN = "dc=example,dc=com"
PEOPLE = f"ou=People,{BASE_DN}"
SALES = f"cn=sales,ou=Groups,{BASE_DN}"
ENGINEERING = f"cn=engineering,ou=Groups,{BASE_DN}"
# The big group of the issue: 5,000 members; the server limits a search to
# 500 entries, so only paged results can read all the users.
BIG_GROUP_MEMBERS = 5000
SERVER_SIZE_LIMIT = 500


def extra_groups(ou: str) -> str:
    """Groups of the three shapes under `ou` (LDIF), with awkward members:
    a DN spelled differently, a uniqueMember with its optional UID, a
    member that is a group, a uid nobody has."""
    return f"""\
dn: {ou}
objectClass: organizationalUnit
ou: {ou.split(",")[0].split("=")[1]}

dn: cn=support,{ou}
objectClass: groupOfUniqueNames
cn: support
description: Customer Support
uniqueMember: mail=alice@example.com,ou=People,dc=example,dc=com#'0101'B
uniqueMember: MAIL=Carol@Example.com, ou=people, dc=example,dc=com
uniqueMember: cn=sales,ou=Groups,dc=example,dc=com

dn: cn=unix,{ou}
objectClass: posixGroup
cn: unix
gidNumber: 5000
memberUid: alice
memberUid: CAROL
memberUid: ghost

dn: cn=empty,{ou}
objectClass: groupOfNames
cn: empty
member: cn=nobody,dc=example,dc=com
"""


@dataclass
class Backend:
    name: str
    directory: Directory
    ou: str  # where this test's extra groups live


@pytest.fixture(params=["ldap", "embedded"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    ou = f"ou=t{uuid.uuid4().hex[:8]},{BASE_DN}"
    if request.param == "ldap":
        slapd: Slapd = request.getfixturevalue("slapd")
        config: DirectoryConfig = request.getfixturevalue("ldap_config")
        slapd.ldapadd(extra_groups(ou))
        directory = open_directory(config)
        try:
            yield Backend("ldap", directory, ou)
        finally:
            await directory.aclose()
            slapd.ldapdelete(ou, recursive=True)
        return
    entries = sample_entries() + ldif.parse(extra_groups(ou))
    directory = embedded_directory(tmp_path / "directory.ldif", entries)
    try:
        yield Backend("embedded", directory, ou)
    finally:
        await directory.aclose()


def by_key(groups: list[DirectoryGroup]) -> dict[str, DirectoryGroup]:
    return {g.key: g for g in groups}


async def test_sample_groups_by_dn_and_filter(backend: Backend) -> None:
    groups = await backend.directory.roster_groups([
        RosterGroupConfig(dn=ENGINEERING, name="Engineering Dept"),
        RosterGroupConfig(filter="(objectClass=groupOfNames)", name_attribute="description"),
    ])
    # engineering, found again through the filter, is reported once, as
    # first found; other groups other tests add under ou=Groups may follow.
    assert groups[0] == DirectoryGroup(
        normalize_dn(ENGINEERING), "Engineering Dept",
        frozenset({"bob@example.com", "carol@example.com"}),
    )
    assert [g.key for g in groups].count(normalize_dn(ENGINEERING)) == 1
    assert by_key(groups)[normalize_dn(SALES)] == DirectoryGroup(
        normalize_dn(SALES), "Sales", frozenset({"alice@example.com", "bob@example.com"})
    )
    (sales,) = await backend.directory.roster_groups([RosterGroupConfig(dn=SALES)])
    assert sales.name == "sales"  # name-attribute defaults to cn
    assert await backend.directory.roster_groups([]) == []


async def test_unique_members_posix_and_odd_members(backend: Backend) -> None:
    ou = backend.ou
    groups = by_key(await backend.directory.roster_groups([
        RosterGroupConfig(filter="(|(objectClass=groupOfUniqueNames)(objectClass=posixGroup))",
                          base=ou, name_attribute="description"),
        RosterGroupConfig(dn=f"cn=empty,{ou}"),
        RosterGroupConfig(dn=f"cn=gone,{ou}"),  # no such entry: simply absent
    ]))
    support = groups[normalize_dn(f"cn=support,{ou}")]
    assert support.name == "Customer Support"
    assert support.members == {"alice@example.com", "carol@example.com"}
    unix = groups[normalize_dn(f"cn=unix,{ou}")]
    assert unix.name == "unix"  # no description: falls back to cn
    assert unix.members == {"alice@example.com", "carol@example.com"}
    empty = groups[normalize_dn(f"cn=empty,{ou}")]
    assert empty.members == frozenset()
    assert len(groups) == 3


async def test_filter_base_scopes_the_search(backend: Backend) -> None:
    # Default base is ou=Groups: the test OU's groupOfNames is not found.
    groups = await backend.directory.roster_groups(
        [RosterGroupConfig(filter="(cn=*)")]
    )
    keys = {g.key for g in groups}
    assert {normalize_dn(SALES), normalize_dn(ENGINEERING)} <= keys
    assert not any(key.endswith(normalize_dn(backend.ou)) for key in keys)
    groups = await backend.directory.roster_groups(
        [RosterGroupConfig(filter="(&(objectClass=groupOfNames)(cn=emp*))", base=backend.ou)]
    )
    assert [g.name for g in groups] == ["empty"]


def big_ldif(path: Path, count: int) -> Path:
    """`count` users and one groupOfNames holding all of them, for slapadd."""
    lines = []
    members = []
    for i in range(count):
        jid = f"user{i:05d}@example.com"
        dn = f"mail={jid},{PEOPLE}"
        members.append(f"member: {dn}")
        lines.append(
            f"dn: {dn}\nobjectClass: inetOrgPerson\ncn: user{i:05d}\nsn: User\n"
            f"uid: user{i:05d}\nmail: {jid}\n"
        )
    lines.append(
        f"dn: cn=everyone,ou=Groups,{BASE_DN}\nobjectClass: groupOfNames\ncn: everyone\n"
        "description: Everyone\n" + "\n".join(members) + "\n"
    )
    path.write_text("\n".join(lines))
    return path


async def test_5000_member_group_behind_a_size_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = big_ldif(tmp_path / "big.ldif", BIG_GROUP_MEMBERS)
    with private_slapd(tmp_path / "slapd", data, size_limit=SERVER_SIZE_LIMIT) as server:
        # The limit is real: a plain search of the users as the service
        # account stops at it (ldapsearch exit 4, sizeLimitExceeded).
        plain = subprocess.run(
            ["ldapsearch", "-x", "-H", server.url, "-D", BIND_DN, "-w", BIND_PASSWORD,
             "-b", PEOPLE, "(objectClass=inetOrgPerson)", "1.1"],
            capture_output=True, text=True, timeout=60,
        )
        assert plain.returncode == 4, plain.stderr
        directory = open_directory(DirectoryConfig(backend="ldap", ldap=LDAPConfig(
            servers=[server.url], base_dn=BASE_DN, bind_dn=BIND_DN,
            bind_password=BIND_PASSWORD, timeout=5.0,
        )))
        try:
            start = time.perf_counter()
            groups = await directory.roster_groups([
                RosterGroupConfig(dn=f"cn=everyone,ou=Groups,{BASE_DN}"),
                RosterGroupConfig(filter="(objectClass=groupOfNames)",
                                  name_attribute="description"),
            ])
            elapsed = time.perf_counter() - start
        finally:
            await directory.aclose()
    everyone, sales, engineering = groups
    assert everyone.name == "everyone"
    assert len(everyone.members) == BIG_GROUP_MEMBERS
    assert "user04999@example.com" in everyone.members
    assert sales.members == {"alice@example.com", "bob@example.com"}
    assert engineering.name == "Engineering"
    # Embedded backend, same data.
    entries = sample_entries() + ldif.parse(data.read_text())
    embedded = embedded_directory(tmp_path / "directory.ldif", entries)
    start = time.perf_counter()
    (big,) = await embedded.roster_groups([RosterGroupConfig(dn=f"cn=everyone,ou=Groups,{BASE_DN}")])
    embedded_elapsed = time.perf_counter() - start
    assert len(big.members) == BIG_GROUP_MEMBERS
    with capsys.disabled():
        print(f"\n[bench] roster_groups, {BIG_GROUP_MEMBERS}-member group "
              f"(+{BIG_GROUP_MEMBERS + 3} users, server size limit {SERVER_SIZE_LIMIT}): "
              f"ldap {elapsed:.3f}s, embedded {embedded_elapsed:.3f}s (first read of the file)")


def test_filter_parser() -> None:
    flt = parse_filter("(&(objectClass=groupOfNames)(|(cn=sa*)(!(ou=x\\2a)))(cn>=a))")
    entry = {"objectclass": ["top", "groupOfNames"], "cn": ["Sales"], "ou": ["x*"]}

    def get(name: str) -> list[str]:
        return entry.get(name.lower(), [])

    assert matches(flt, get)
    assert matches(parse_filter("(cn=*le*)"), get)
    assert not matches(parse_filter("(cn=s*x)"), get)
    assert matches(parse_filter("(ou=x\\2a)"), get)
    assert not matches(parse_filter("(description=*)"), get)
    for bad in ["", "cn=x", "(cn=x", "(cn=x))", "(&)", "(cn:dn:=x)", "(=x)", "(cn=a(b)",
                "(cn=\\zz)", "(" * 40 + "cn=x" + ")" * 40]:
        with pytest.raises(FilterError):
            parse_filter(bad)


def test_normalize_dn() -> None:
    same = [
        "mail=alice@example.com,ou=People,dc=example,dc=com",
        "MAIL=Alice@Example.COM, ou=people ,DC=example,dc=com",
        "mail=alice\\40example.com,ou=People,dc=example,dc=com",
    ]
    assert len({normalize_dn(dn) for dn in same}) == 1
    assert normalize_dn("cn=a\\,b+uid=x,dc=x") == normalize_dn("UID=X+cn=A\\2Cb,dc=x")
    assert normalize_dn("cn=a\\,b,dc=x") != normalize_dn("cn=a,b,dc=x")
