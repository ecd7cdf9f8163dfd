"""The profile model without sockets: field resolution and configuration
errors, and `ProfileService` against a scripted directory and store (the
all-or-nothing rules, the cache, stale reads, the store-failure revert)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from mlink.config_model import (
    Config,
    DirectoryConfig,
    ProfileFieldConfig,
    ProfilesConfig,
)
from mlink.directory.base import DirectoryRefused, DirectoryUnavailable
from mlink.profile import (
    FIELDS,
    ProfileConfigError,
    ProfileError,
    ProfileService,
    check_profiles,
    resolve_fields,
)
from mlink.store import StoreError

USER = "pat@example.com"


def config(backend: str = "ldap", fields: list[ProfileFieldConfig] | None = None,
           cache_seconds: float = 60.0, max_photo_bytes: int = 1000) -> Config:
    return Config(path=None, domains=["example.com"], listeners=[],
                  directory=DirectoryConfig(backend=backend),
                  profiles=ProfilesConfig(fields=fields or [], cache_seconds=cache_seconds,
                                          max_photo_bytes=max_photo_bytes))


# -- resolution ---------------------------------------------------------------------


def test_defaults_follow_the_backend():
    ldap = resolve_fields(config("ldap"))
    embedded = resolve_fields(config("embedded"))
    assert ldap["mobile"].policy == "directory" and embedded["mobile"].policy == "update"
    assert ldap["mobile"].attributes == ("mobile",)
    for specs in (ldap, embedded):
        assert specs["nickname"].policy == "local" and specs["birthday"].policy == "local"
        assert specs["email"].policy == "directory"  # the JID: never user-editable
        assert specs["system_username"].policy == "directory"
        assert specs["photo_data"].binary and specs["photo_data"].attribute == "jpegPhoto"
    assert set(ldap) == set(FIELDS)


@pytest.mark.parametrize("fields, message", [
    ([ProfileFieldConfig("shoe_size", "local")], "unknown profile field 'shoe_size'"),
    ([ProfileFieldConfig("mobile", "writable")], "unknown policy"),
    ([ProfileFieldConfig("org_name", "static")], "needs a value"),
    ([ProfileFieldConfig("nickname", "update")], "needs an LDAP attribute"),
    ([ProfileFieldConfig("email", "update")], "rename their own account"),
    ([ProfileFieldConfig("photo_data", "static", value="x")], "binary"),
    ([ProfileFieldConfig("mobile", "update"), ProfileFieldConfig("mobile", "local")], "twice"),
])
def test_configuration_errors_are_named(fields, message):
    with pytest.raises(ProfileConfigError, match=message):
        resolve_fields(config(fields=fields))
    assert message.split("'")[0] in check_profiles(config(fields=fields))[0]


def test_configured_attribute_and_policy_win():
    specs = resolve_fields(config(fields=[
        ProfileFieldConfig("nickname", "update", attribute="eduPersonNickname"),
        ProfileFieldConfig("org_name", "static", value="Example Corp"),
    ]))
    assert specs["nickname"].policy == "update" and specs["nickname"].attribute == \
        "eduPersonNickname"
    assert specs["org_name"].static_value == "Example Corp"
    assert check_profiles(config()) == []


# -- the service ----------------------------------------------------------------------


@dataclass
class FakeDirectory:
    entry: dict[str, list[bytes]] = field(default_factory=dict)
    down: bool = False
    refuse: str | None = None
    reads: int = 0
    modifies: list[dict[str, list[bytes]]] = field(default_factory=list)
    login_attributes: tuple[str, ...] = ()

    def read_at_login(self, attributes: Sequence[str], seen: object) -> None:
        self.login_attributes = tuple(attributes)

    async def user_attributes(self, jid: str, attributes: Sequence[str]) -> dict[
            str, list[bytes]] | None:
        if self.down:
            raise DirectoryUnavailable("down")
        self.reads += 1
        if jid != USER:
            return None
        low = {k.lower(): v for k, v in self.entry.items()}
        return {a: list(low[a.lower()]) for a in attributes if low.get(a.lower())}

    async def modify_user(self, jid: str, changes: Mapping[str, Sequence[bytes]]) -> None:
        if self.down:
            raise DirectoryUnavailable("down")
        if self.refuse:
            raise DirectoryRefused(self.refuse)
        self.modifies.append({k: list(v) for k, v in changes.items()})
        for attr, values in changes.items():
            if values:
                self.entry[attr] = list(values)
            else:
                self.entry.pop(attr, None)


@dataclass
class FakeStore:
    fields: dict[str, bytes] = field(default_factory=dict)
    fail: bool = False

    async def profile_local(self, user: str) -> dict[str, bytes]:
        return dict(self.fields)

    async def profile_local_put(self, user: str, fields: dict[str, bytes | None]) -> None:
        if self.fail:
            raise StoreError("disk full")
        for name, value in fields.items():
            if value is None:
                self.fields.pop(name, None)
            else:
                self.fields[name] = value


class FakeServer:
    def __init__(self, cfg: Config) -> None:
        self.config = cfg
        self.directory = FakeDirectory({"displayName": [b"Pat"], "mobile": [b"+1"],
                                        "jpegPhoto": [b"\xff\xd8old"]})
        self.store = FakeStore({"nickname": b"p"})
        self.cache_invalidators: dict[str, Any] = {}
        self.changed_calls: list[tuple[str, str]] = []

    def changed(self, user: str, what: str) -> None:
        self.changed_calls.append((user, what))


POLICIES = [
    ProfileFieldConfig("mobile", "update"),
    ProfileFieldConfig("photo_data", "update"),
    ProfileFieldConfig("org_name", "static", value="Example Corp"),
]


def service(cache_seconds: float = 60.0) -> tuple[ProfileService, FakeServer]:
    server = FakeServer(config(fields=POLICIES, cache_seconds=cache_seconds))
    return ProfileService(server), server  # type: ignore[arg-type]


async def test_get_assembles_every_source():
    svc, _ = service()
    profile = await svc.get(USER)
    assert profile.get("display_name") == ("Pat",)
    assert profile.get("org_name") == ("Example Corp",)
    assert profile.get("nickname") == ("p",)
    assert profile.photo == b"\xff\xd8old"
    with pytest.raises(ProfileError) as info:
        await svc.get("nobody@example.com")
    assert info.value.condition == "item-not-found"


async def test_a_profile_primed_at_login_needs_no_directory_read():
    svc, server = service()
    directory = server.directory
    assert {"displayName", "jpegPhoto"} <= set(directory.login_attributes)
    svc.prime(USER, {"displayName": [b"Primed"], "jpegPhoto": [b"\xff\xd8new"]})
    directory.down = True  # the session's first presence must not need it
    profile = await svc.get(USER)
    assert profile.get("display_name") == ("Primed",) and profile.photo == b"\xff\xd8new"
    assert directory.reads == 0 and not profile.stale


async def test_unchanged_directory_values_are_no_change():
    svc, server = service()
    changed = await svc.update(USER, {"display_name": [" Pat "], "org_name": ["Example Corp"],
                                      "mobile": ["+2"], "nickname": ["p"]})
    assert changed == {"mobile": ("+2",)}
    assert server.directory.modifies == [{"mobile": [b"+2"]}]
    assert server.changed_calls == [(USER, "profile")]


async def test_refusal_names_every_field_and_writes_nothing():
    svc, server = service()
    with pytest.raises(ProfileError) as info:
        await svc.update(USER, {"display_name": ["X"], "org_name": [], "mobile": ["+9"],
                                "nickname": ["q"]})
    assert info.value.condition == "not-allowed"
    assert "display_name" in info.value.text and "org_name" in info.value.text
    assert server.directory.modifies == [] and server.store.fields == {"nickname": b"p"}
    with pytest.raises(ProfileError) as info:
        await svc.update(USER, {"shoe_size": ["44"]})
    assert info.value.condition == "bad-request" and "shoe_size" in info.value.text


async def test_photo_limit_and_directory_refusal():
    svc, server = service()
    with pytest.raises(ProfileError) as info:
        await svc.update(USER, {"photo_data": [b"x" * 1001], "nickname": ["q"]})
    assert info.value.condition == "not-acceptable" and "1000" in info.value.text
    server.directory.refuse = "invalid per syntax"
    with pytest.raises(ProfileError) as info:
        await svc.update(USER, {"mobile": ["bad"], "nickname": ["q"]})
    assert info.value.condition == "not-acceptable" and "invalid per syntax" in info.value.text
    assert server.store.fields == {"nickname": b"p"}


async def test_store_failure_reverts_the_directory():
    svc, server = service()
    server.store.fail = True
    with pytest.raises(ProfileError) as info:
        await svc.update(USER, {"mobile": ["+5"], "nickname": ["q"]})
    assert info.value.condition == "internal-server-error"
    assert server.directory.modifies == [{"mobile": [b"+5"]}, {"mobile": [b"+1"]}]
    assert server.directory.entry["mobile"] == [b"+1"]


async def test_cache_lifetime_stale_reads_and_writes_while_down(autojump_clock):
    svc, server = service(cache_seconds=5)
    await svc.get(USER)
    await svc.get(USER)
    assert server.directory.reads == 1  # cached
    server.directory.entry["displayName"] = [b"Patricia"]
    await trio.sleep(6)
    assert (await svc.get(USER)).get("display_name") == ("Patricia",)
    assert server.directory.reads == 2
    await trio.sleep(6)
    server.directory.down = True
    stale = await svc.get(USER)
    assert stale.stale and stale.get("display_name") == ("Patricia",)
    with pytest.raises(ProfileError) as info:
        await svc.update(USER, {"nickname": ["q"]})
    assert info.value.condition == "service-unavailable"
    assert "directory is unavailable" in info.value.text
    svc.invalidate(USER)
    with pytest.raises(ProfileError) as info:
        await svc.get(USER)
    assert info.value.condition == "service-unavailable"


async def test_writes_of_one_user_do_not_interleave():
    svc, server = service()
    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(svc.update, USER, {"mobile": [f"+{n + 10}"]})
    assert len(server.directory.modifies) == 5
    assert len(svc._locks) == 0
