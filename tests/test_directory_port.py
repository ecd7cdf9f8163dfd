"""The directory port (mlink.directory.port) on both backends: the same
tests against a real slapd and against the embedded LDIF file. Then the
change feed: changes made through mlink, with the OpenLDAP tools or by
editing the file reach a subscriber within the interval, each once; the
feed outlives a slapd restart; and a group membership change reaches an
online member as a roster push through `follow_groups`.

Waiting is always on an outcome with a bounded deadline (`trio.fail_after`),
never a sleep standing in for synchronisation."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from mlink.config_model import DirectoryConfig, RosterGroupConfig
from mlink.directory import ldif, open_directory
from mlink.directory.base import DirectoryRefused
from mlink.directory.core import PortDirectory
from mlink.directory.names import normalize_dn
from mlink.directory.port import (
    Change,
    EntryExists,
    Modification,
    NoSuchEntry,
    Scope,
    SizeLimitExceeded,
)
from mlink.router.directory_watch import follow_groups, push_changes, watch_of
from mlink.router.rosters import RosterCache
from tests.ldap_fixtures import Slapd, embedded_directory, sample_entries
from tests.test_directory_rosters_unit import FakeStore

BASE_DN = "dc=example,dc=com"
PEOPLE = f"ou=People,{BASE_DN}"
ALICE_DN = f"mail=alice@example.com,{PEOPLE}"
BOB_DN = f"mail=bob@example.com,{PEOPLE}"
CAROL_DN = f"mail=carol@example.com,{PEOPLE}"
# The feed's interval in these tests, and how long an outcome may take to
# show: a few intervals plus an LDAP round trip, generous for slow CI.
FEED_SECONDS = 0.3
DEADLINE = 10.0


@dataclass
class Backend:
    name: str
    directory: PortDirectory
    ou: str  # this test's own subtree, removed afterwards
    slapd: Slapd | None = None
    path: Path | None = None

    def edit_by_hand(self, ldif_text: str) -> None:
        """Add entries the way an administrator would: ldapadd, or an
        editor on the embedded file."""
        if self.slapd is not None:
            self.slapd.ldapadd(ldif_text)
            return
        assert self.path is not None
        entries = ldif.parse(self.path.read_text()) + ldif.parse(ldif_text)
        self.path.write_text(ldif.dumps(entries))


def ou_ldif(ou: str) -> str:
    return f"dn: {ou}\nobjectClass: organizationalUnit\nou: {ou.split(',')[0][3:]}\n"


@pytest.fixture(params=["ldap", "embedded"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    ou = f"ou=p{uuid.uuid4().hex[:8]},{BASE_DN}"
    if request.param == "ldap":
        slapd: Slapd = request.getfixturevalue("slapd")
        config: DirectoryConfig = request.getfixturevalue("ldap_config")
        slapd.ldapadd(ou_ldif(ou))
        directory = open_directory(config)
        assert isinstance(directory, PortDirectory)
        try:
            yield Backend("ldap", directory, ou, slapd=slapd)
        finally:
            await directory.aclose()
            if not slapd.running:
                slapd.start()
            slapd.ldapdelete(ou, recursive=True)
        return
    path = tmp_path / "directory.ldif"
    directory = embedded_directory(path, sample_entries() + ldif.parse(ou_ldif(ou)))
    try:
        yield Backend("embedded", directory, ou, path=path)
    finally:
        await directory.aclose()


# -- the operations -------------------------------------------------------------------------


async def test_search_scopes_limits_and_compare(backend: Backend) -> None:
    port = backend.directory.port
    (alice,) = await port.search(PEOPLE, Scope.ONELEVEL, "(uid=ALICE)", ["cn", "mail"])
    assert alice.dn.lower() == ALICE_DN.lower()
    assert alice.get("mail") == ["alice@example.com"]
    assert alice.get("userPassword") == []  # not asked for
    (base,) = await port.search(BASE_DN, Scope.BASE, "(objectClass=*)", ["1.1"])
    assert base.attrs == {}
    assert await port.search(BASE_DN, Scope.ONELEVEL, "(uid=alice)") == []  # one level only
    everyone = await port.search(BASE_DN, Scope.SUBTREE, "(objectClass=inetOrgPerson)",
                                 ["uid"], paged=True)
    assert {"alice", "bob", "carol"} <= {str(e.first("uid")) for e in everyone}
    with pytest.raises(SizeLimitExceeded):
        await port.search(PEOPLE, Scope.SUBTREE, "(objectClass=inetOrgPerson)", ["1.1"],
                          size_limit=1)
    with pytest.raises(NoSuchEntry):
        await port.search(f"ou=nowhere,{BASE_DN}", Scope.SUBTREE, "(objectClass=*)")
    assert await port.compare(ALICE_DN, "uid", "alice")
    assert not await port.compare(ALICE_DN, "uid", "bob")


async def test_add_modify_delete(backend: Backend) -> None:
    port = backend.directory.port
    dn = f"cn=team,{backend.ou}"
    team = ldif.Entry(dn, {"objectClass": ["groupOfNames"], "cn": ["team"],
                           "member": [ALICE_DN]})
    await port.add(team)
    with pytest.raises(EntryExists):
        await port.add(team)
    with pytest.raises(NoSuchEntry):
        await port.add(ldif.Entry(f"cn=x,ou=absent,{BASE_DN}", {"objectClass": ["device"],
                                                                 "cn": ["x"]}))
    await port.modify(dn, [Modification("add", "member", (BOB_DN,)),
                           Modification("replace", "description", (b"The team",))])
    with pytest.raises(DirectoryRefused):  # already a member: nothing applied
        await port.modify(dn, [Modification("replace", "description", (b"changed",)),
                               Modification("add", "member", (BOB_DN,))])
    (found,) = await port.search(dn, Scope.BASE, "(objectClass=*)", ["member", "description"])
    assert sorted(str(m).lower() for m in found.get("member")) == sorted(
        [ALICE_DN.lower(), BOB_DN.lower()])
    assert found.get("description") == ["The team"]
    await port.modify(dn, [Modification("delete", "member", (ALICE_DN,))])
    assert not await port.compare(dn, "member", ALICE_DN)
    await port.delete(dn)
    with pytest.raises(NoSuchEntry):
        await port.delete(dn)


async def test_bind(backend: Backend) -> None:
    port = backend.directory.port
    assert await port.bind(BOB_DN, "bob-secret")
    assert not await port.bind(BOB_DN, "wrong")
    assert not await port.bind(BOB_DN, "")
    assert not await port.bind(f"mail=nobody@example.com,{PEOPLE}", "bob-secret")


# -- the change feed --------------------------------------------------------------------------


class Collector:
    """Reads a directory's feed in a task; `wait_for` polls the outcome."""

    def __init__(self, directory: PortDirectory) -> None:
        self.directory = directory
        self.changes: list[Change] = []
        self.arrived = trio.Event()
        self.started = trio.Event()

    async def run(self) -> None:
        async for batch in self.directory.changes(FEED_SECONDS):
            if not batch:  # the baseline is taken
                self.started.set()
            self.changes.extend(batch)
            self.arrived.set()
            self.arrived = trio.Event()

    async def wait_for(self, kind: str, dn: str) -> Change:
        with trio.fail_after(DEADLINE):
            while True:
                for change in self.changes:
                    if change.kind == kind and change.key == _key(dn):
                        return change
                await self.arrived.wait()

    def count(self, dn: str) -> int:
        return sum(1 for c in self.changes if c.key == _key(dn))


def _key(dn: str) -> str:
    return normalize_dn(dn)


async def _first_poll(collector: Collector) -> None:
    """Until the feed has its baseline (its first, empty, batch)."""
    with trio.fail_after(DEADLINE):
        await collector.started.wait()


async def test_feed_reports_changes_once(backend: Backend) -> None:
    collector = Collector(backend.directory)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collector.run)
        await _first_poll(collector)
        # Through mlink: a profile change of alice.
        await backend.directory.modify_user("alice@example.com",
                                            {"roomNumber": [b"Feed tester"]})
        change = await collector.wait_for("modify", ALICE_DN)
        assert change.user == "alice@example.com"
        assert change.entry is not None and change.entry.get("roomNumber") == ["Feed tester"]
        # By hand: a new group under the test OU.
        group_dn = f"cn=newgroup,{backend.ou}"
        backend.edit_by_hand(f"dn: {group_dn}\nobjectClass: groupOfNames\ncn: newgroup\n"
                             f"member: {BOB_DN}\n")
        added = await collector.wait_for("add", group_dn)
        assert added.user is None
        assert added.entry is not None and added.entry.get("cn") == ["newgroup"]
        assert backend.directory.touches_groups(added, [])
        # A few more intervals: nothing is reported twice.
        await backend.directory.modify_user("alice@example.com", {"roomNumber": []})
        await collector.wait_for("modify", ALICE_DN)
        with trio.fail_after(DEADLINE):
            while collector.count(ALICE_DN) < 2:
                await collector.arrived.wait()
        assert collector.count(group_dn) == 1
        if backend.name == "embedded":
            # The embedded feed sees deletions too.
            await backend.directory.port.delete(group_dn)
            gone = await collector.wait_for("delete", group_dn)
            assert gone.entry is None
        nursery.cancel_scope.cancel()
    assert collector.count(ALICE_DN) == 2


async def test_feed_survives_a_slapd_restart(slapd: Slapd, ldap_config: DirectoryConfig
                                             ) -> None:
    directory = open_directory(ldap_config)
    assert isinstance(directory, PortDirectory)
    collector = Collector(directory)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collector.run)
            await _first_poll(collector)
            slapd.stop()
            try:
                # The feed keeps polling a dead server without ending (and
                # without blocking the loop: this sleep ends on time).
                with trio.fail_after(DEADLINE):
                    await trio.sleep(FEED_SECONDS * 3)
            finally:
                slapd.start()
            slapd.ldapmodify(f"dn: {CAROL_DN}\nchangetype: modify\nreplace: roomNumber\n"
                             "roomNumber: After the restart\n")
            change = await collector.wait_for("modify", CAROL_DN)
            assert change.user == "carol@example.com"
            assert change.entry is not None
            assert change.entry.get("roomNumber") == ["After the restart"]
            nursery.cancel_scope.cancel()
    finally:
        slapd.ldapmodify(f"dn: {CAROL_DN}\nchangetype: modify\ndelete: roomNumber\n")
        await directory.aclose()


# -- a group change reaching an online member ------------------------------------------------


class FakeRouter:
    """Sessions of online users; records what is delivered to them."""

    def __init__(self, online: set[str]) -> None:
        self.online = online
        self.delivered: list[tuple[str, ET.Element]] = []
        self.arrived = trio.Event()

    def resources(self, bare: Any) -> list[SimpleNamespace]:
        if str(bare) not in self.online:
            return []
        return [SimpleNamespace(interested=True, jid=f"{bare}/phone")]

    def deliver(self, full: Any, stanza: ET.Element) -> bool:
        self.delivered.append((str(full), stanza))
        self.arrived.set()
        self.arrived = trio.Event()
        return True


class FakeModule:
    """What the directory watch needs of a module context."""

    def __init__(self, directory: Any, router: FakeRouter) -> None:
        self.directory, self.router = directory, router
        self.background_tasks: list[Any] = []
        self._shared: dict[str, Any] = {}

    def shared(self, name: str, factory: Any) -> Any:
        if name not in self._shared:
            self._shared[name] = factory()
        return self._shared[name]

    def spawn(self, task: Any) -> None:
        self.background_tasks.append(task)


async def test_group_change_reaches_an_online_member(backend: Backend) -> None:
    """carol is online; bob is added to her group by hand (ldapmodify or
    an editor): carol gets a roster push of bob, subscription both, in the
    group, within the feed's interval, though the periodic refresh would
    come only after five minutes."""
    group_dn = f"cn=pals,{backend.ou}"
    await backend.directory.port.add(ldif.Entry(group_dn, {
        "objectClass": ["groupOfNames"], "cn": ["pals"], "member": [CAROL_DN]}))
    specs = [RosterGroupConfig(dn=group_dn)]
    online = {"carol@example.com"}
    rosters = RosterCache(lambda: FakeStore({}), lambda user: user in online)  # type: ignore[arg-type, return-value]
    router = FakeRouter(online)
    server = FakeModule(backend.directory, router)
    refreshes = 0

    async def refresh() -> bool:
        nonlocal refreshes
        refreshes += 1
        push_changes(server, rosters.set_groups(  # type: ignore[arg-type]
            await backend.directory.roster_groups(specs)))
        return True

    follow_groups(server, specs, refresh, interval=300)  # type: ignore[arg-type]
    assert len(server.background_tasks) == 2  # the feed, and the follower
    async with trio.open_nursery() as nursery:
        for task in server.background_tasks:
            nursery.start_soon(task)
        with trio.fail_after(DEADLINE):
            while refreshes == 0:
                await trio.sleep(FEED_SECONDS)  # polling an outcome, bounded above
        assert (await rosters.get("carol@example.com")).items == {}
        with trio.fail_after(DEADLINE):
            await watch_of(server).ready.wait()  # type: ignore[arg-type]
        if backend.slapd is not None:
            backend.slapd.ldapmodify(f"dn: {group_dn}\nchangetype: modify\nadd: member\n"
                                     f"member: {BOB_DN}\n")
        else:
            assert backend.path is not None
            entries = ldif.parse(backend.path.read_text())
            for entry in entries:
                if entry.dn == group_dn:
                    entry.set("member", [CAROL_DN, BOB_DN])
            backend.path.write_text(ldif.dumps(entries))
        with trio.fail_after(DEADLINE):
            while not router.delivered:
                await router.arrived.wait()
        nursery.cancel_scope.cancel()
    ((to, iq),) = router.delivered
    assert to == "carol@example.com/phone"
    assert iq.get("type") == "set"
    (item,) = iq.find("{jabber:iq:roster}query")  # type: ignore[union-attr]
    assert item.get("jid") == "bob@example.com"
    assert item.get("subscription") == "both"
    assert [g.text for g in item] == ["pals"]
