"""The roster cache's directory-group logic without sockets: the group
index, merging, content-addressed versions, static roster values, and a
refresh that fails keeping the last groups."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from mlink.directory.base import DirectoryGroup, DirectoryUnavailable
from mlink.modules import shared_groups
from mlink.router.rosters import (
    GroupIndex,
    RosterCache,
    merge_item,
    parse_static_value,
    static_value,
    static_version,
)
from mlink.store import RosterItem

A, B, C, D = (f"{n}@example.com" for n in "abcd")


@dataclass
class FakeStore:
    """Just what RosterCache reads: personal rosters and pending requests."""

    rosters: dict[str, tuple[int, dict[str, RosterItem]]]

    async def roster(self, user: str) -> tuple[int, dict[str, RosterItem]]:
        version, items = self.rosters.get(user, (0, {}))
        return version, dict(items)

    async def subscription_requests(self, user: str) -> list[tuple[str, bytes]]:
        return []


def group(key: str, name: str, *members: str) -> DirectoryGroup:
    return DirectoryGroup(key, name, frozenset(members))


def cache(store: FakeStore, online: set[str]) -> RosterCache:
    return RosterCache(lambda: store, lambda user: user in online)  # type: ignore[arg-type, return-value]


def test_index_shares_and_names() -> None:
    index = GroupIndex([group("g1", "Sales", A, B), group("g2", "Eng", B, C),
                        group("g3", "All", A, B, C)])
    assert index.shared(A) == {B: frozenset({"Sales", "All"}), C: frozenset({"All"})}
    assert index.shared_with(B, C) == frozenset({"Eng", "All"})
    assert index.shared_with(A, A) == frozenset()
    assert index.shared(D) == {}


def test_touched_is_the_delta_for_members_and_everything_on_rename() -> None:
    old = GroupIndex([group("g1", "Sales", A, B, C)])
    added = GroupIndex([group("g1", "Sales", A, B, C, D)])
    assert added.touched(old, A) == {D}
    assert added.touched(old, D) == {A, B, C}  # joined: every member
    renamed = GroupIndex([group("g1", "Sellers", A, B, C)])
    assert renamed.touched(old, A) == {B, C}
    assert GroupIndex().touched(old, B) == {A, C}  # the group is gone


def test_merge_keeps_the_personal_name_and_groups() -> None:
    personal = RosterItem(B, "Bobby", ("Friends",), "to", ask=False, approved=True)
    merged = merge_item(B, personal, frozenset({"Sales"}))
    assert merged == RosterItem(B, "Bobby", ("Friends", "Sales"), "both")
    assert merge_item(B, personal, frozenset()) is personal
    assert merge_item(B, None, frozenset({"Sales"})) == RosterItem(B, None, ("Sales",), "both")


async def test_incremental_versions_equal_a_fresh_load() -> None:
    """Versions are content-addressed: after a refresh changes a cached
    roster pair by pair, its version is the one a fresh load computes, and
    it differs from the version before the change."""
    store = FakeStore({A: (7, {C: RosterItem(C, "Carl", (), "from")})})
    rosters = cache(store, {A})
    rosters.set_groups([group("g1", "Sales", A, B)])
    roster = await rosters.get(A)
    before = roster.version
    assert before.startswith("7-g")
    assert roster.items[B].subscription == "both" and roster.items[C].subscription == "from"

    changes = rosters.set_groups([group("g1", "Sales", A, B, C, D)])
    assert [(c.user, c.contact) for c in changes] == [(A, C), (A, D)]
    assert changes[0].before == RosterItem(C, "Carl", (), "from")
    assert changes[0].after == RosterItem(C, "Carl", ("Sales",), "both")
    assert changes[-1].version == roster.version != before
    rosters.evict(A)
    fresh = await rosters.get(A)
    assert fresh.version == roster.version
    roster = fresh

    # Back to the first groups: back to the first version, since the
    # roster is the same again.
    changes = rosters.set_groups([group("g1", "Sales", A, B)])
    assert changes[-1].after is None and changes[-1].contact == D
    assert changes[0].after == RosterItem(C, "Carl", (), "from")  # the personal item stays
    assert roster.version == before

    # No groups at all: the plain store counter, as without pre-population.
    rosters.set_groups([])
    assert roster.version == "7"


def test_static_values_round_trip_and_foreign_values_are_not_items() -> None:
    item = RosterItem(B, "Bob", ("Pals", "Work"), "both", ask=False, approved=False)
    value = static_value(item)
    assert json.loads(value) == {"jid": B, "name": "Bob", "groups": ["Pals", "Work"],
                                 "subscription": "both", "ask": False, "approved": False}
    assert parse_static_value(value) == item
    # Minimal objects written by another application are items too.
    assert parse_static_value(b'{"jid": "B@Example.com"}') == RosterItem(B)
    for foreign in (b"not json", b"[]", b'{"name": "x"}', b'{"jid": "@@"}',
                    b'{"jid": "b@example.com", "subscription": "maybe"}',
                    b'{"jid": "b@example.com", "groups": [""]}'):
        assert parse_static_value(foreign) is None, foreign
    # The version ignores the order LDAP returns values in.
    assert static_version([b"x", b"y"]) == static_version([b"y", b"x"]) != static_version([b"x"])


class FlakyDirectory:
    def __init__(self) -> None:
        self.answers: list[Any] = []

    async def roster_groups(self, specs: Any) -> list[DirectoryGroup]:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_unreachable_directory_keeps_the_last_groups() -> None:
    directory = FlakyDirectory()
    rosters = cache(FakeStore({}), set())
    server = SimpleNamespace(directory=directory)
    directory.answers = [[group("g1", "Sales", A, B)], DirectoryUnavailable("down")]
    assert await shared_groups.refresh(server, rosters, [])  # type: ignore[arg-type]
    assert not await shared_groups.refresh(server, rosters, [])  # type: ignore[arg-type]
    assert rosters.shares_group(A, B)

