"""A 5,000-member directory group (issue 5, "Large groups"): the group
loads with paged searches, and a member's login (roster and initial
presence, whose 4,999 probes are answered from memory) completes in a
bounded time. The figures are printed, not asserted as timings.

In a module of its own so that no other server refreshing groups every
second runs while it is measured.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.rawclient import RawClient, resource
from tests.serverproc import start_mlink
from tests.test_directory_rosters import (
    DOMAIN,
    GROUPS_DN,
    ROSTER_NS,
    TEST_PASSWORD,
    Ldap,
    directory_xml,
    with_rosters,
)
from tests.test_im_roster import XClient, roster_items, tag

BIG_GROUP_SIZE = 5000
BIG_GROUP_NAME = "Everyone"
# A member must be logged in, roster and probes answered, within this long:
# it bounds a hang; the measured figure is reported, not asserted.
BIG_LOGIN_TIMEOUT = 60.0
# Loading the group (one paged search of users, one of groups).
BIG_LOAD_TIMEOUT = 120.0
FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module")
def big_group(slapd) -> Iterator[list[str]]:
    """BIG_GROUP_SIZE users (only the first can log in) in one group,
    deleted afterwards (the slapd is shared by the session)."""
    if not slapd.running:
        slapd.start()
    ldap = Ldap(slapd)
    try:
        started = time.monotonic()
        members = ldap.new_users(1) + ldap.new_users(BIG_GROUP_SIZE - 1, password=False)
        ldap.new_group(members, description=BIG_GROUP_NAME, kind="big")
        FIGURES["ldapadd"] = time.monotonic() - started
        yield members
    finally:
        if ldap.created:
            ldap.delete(*sorted(ldap.created, key=lambda dn: not dn.endswith(GROUPS_DN)))


def test_member_of_a_5000_member_group_logs_in_in_bounded_time(
        big_group, slapd, tmp_path_factory, cert_files, ca_file, capsys):
    rosters = (f'<rosters><group filter="(description={BIG_GROUP_NAME})" base="{GROUPS_DN}" '
               'name-attribute="description"/></rosters>')
    setup = tmp_path_factory.mktemp("mlink-big")
    with start_mlink(setup, DOMAIN, cert_files, ldap=directory_xml(slapd),
                     edit_config=with_rosters(rosters)) as server:
        loaded = server.wait_for_log(
            r"directory groups loaded: (\d+) groups, (\d+) members in ([\d.]+) s",
            timeout=BIG_LOAD_TIMEOUT)
        assert int(loaded.group(2)) == BIG_GROUP_SIZE, loaded.group(0)

        started = time.monotonic()
        raw = RawClient(server.c2s_port, ca_file)
        jid = raw.login(DOMAIN, big_group[0], TEST_PASSWORD, resource=resource())
        client = XClient(raw, jid)
        client.send(f"<iq type='get' id='big-roster'><query xmlns='{ROSTER_NS}'/></iq>")
        reply = client.expect(lambda s: tag(s) == "iq" and s.get("id") == "big-roster",
                              "the roster", timeout=BIG_LOGIN_TIMEOUT)
        roster_done = time.monotonic() - started
        items = roster_items(reply)
        assert len(items) == BIG_GROUP_SIZE - 1
        assert set(items) == set(big_group[1:])
        assert all(i.get("subscription") == "both" for i in items.values())
        assert {g.text for i in items.values() for g in i} == {BIG_GROUP_NAME}

        # Initial presence: 4,999 probes; every other member is offline, so
        # each is answered with unavailable from that member.
        client.send("<presence/>")
        deadline = started + BIG_LOGIN_TIMEOUT
        answered: set[str] = set()
        while len(answered) < BIG_GROUP_SIZE - 1:
            client._read_more(deadline)  # raises TimeoutError past the bound
            for stanza in client.backlog:
                if tag(stanza) == "presence" and stanza.get("type") == "unavailable":
                    answered.add(stanza.get("from", ""))
            client.backlog.clear()
            assert not client.closed
        presence_done = time.monotonic() - started
        assert answered == set(big_group[1:])
        client.close()
        with capsys.disabled():
            print(f"\n[figures] {BIG_GROUP_SIZE}-member group: directory load "
                  f"{float(loaded.group(3)):.3f} s; login to roster result "
                  f"{roster_done:.3f} s; to all {BIG_GROUP_SIZE - 1} probes answered "
                  f"{presence_done:.3f} s (users and group created with ldapadd in "
                  f"{FIGURES.get('ldapadd', 0):.1f} s)")
