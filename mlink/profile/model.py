"""One profile model behind vCards, XEP-0154 forms and avatars.

`ProfileService.get` assembles a user's profile from their directory entry
(fields with the `directory` and `update` policies), the configured static
values and mlink's store (`local` fields). `ProfileService.update` applies a
client's changes under the per-field policies as one operation:

1. every field is compared with its current value; a value equal to the
   current one is no change (clients resend their whole vCard, and resending
   a directory-owned value must not be refused);
2. if any real change touches a `directory` or `static` field, the whole
   request is refused (`not-allowed`, naming the fields) and nothing is
   written; an oversized photo is refused the same way (`not-acceptable`);
3. every `update` field goes to the directory in one LDAP modify (atomic
   in the directory);
4. then the `local` fields go to the store in one transaction. If that fails
   the directory change is reverted, so the request is still all or nothing.

Reads are cached per user for `cache_seconds`; every write mlink makes
invalidates the user's entry. When the directory cannot be reached, a cached
profile is served even past its lifetime (a stale profile beats none); with
nothing cached the read fails with `service-unavailable`. Writes need the
directory (the comparison in step 1 reads it fresh), so they are refused with
`service-unavailable` while it is down, and nothing is written.

The cache is per process; with several shards, a write through one shard
makes the others drop their copies too (`Server.changed`, "profile").
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from mlink.directory.base import (
    DirectoryError,
    DirectoryRefused,
    DirectoryUnavailable,
    NoSuchUser,
)
from mlink.profile.fields import (
    PHOTO_FIELD,
    FieldSpec,
    directory_attributes,
    resolve_fields,
)
from mlink.store import StoreError
from mlink.util.keyed_lock import KeyedLock

if TYPE_CHECKING:
    from mlink.config_model import Config
    from mlink.directory.base import Directory
    from mlink.module import Module
    from mlink.store import Store

log = logging.getLogger(__name__)


class ProfileHost(Protocol):
    """What a ProfileService needs of the server: its configuration, the
    directory, the store, and a way to tell other shards of a change."""

    @property
    def config(self) -> Config: ...
    @property
    def directory(self) -> Directory: ...
    @property
    def store(self) -> Store: ...
    def changed(self, user: str, what: str) -> None: ...

Value = str | bytes
# Values of one field a client may set: real profiles have a handful of
# phone numbers at most; this only stops a request from ballooning.
MAX_VALUES_PER_FIELD = 16
# One text value; long enough for a description, short enough to be sane.
MAX_TEXT_VALUE_CHARS = 4096
# Event (`Hooks.notify`, handlers get the user's bare JID) fired after a
# user's photo changed through mlink, so the avatar module re-announces it.
PHOTO_CHANGED = "profile/photo-changed"
# The name this module's per-user cache has on every shard (`Module.user_cache`).
CACHE_NAME = "profile"
DIRECTORY_DOWN_TEXT = "the directory is unavailable; try again later"

class ProfileError(Exception):
    """A request the profile model refuses: an XMPP stanza error condition
    (RFC 6120 §8.3.3) and a human-readable text saying why."""

    def __init__(self, condition: str, text: str) -> None:
        super().__init__(text)
        self.condition = condition
        self.text = text


@dataclass(frozen=True, slots=True)
class Profile:
    """A user's profile: field name → values (str, or bytes for the photo).
    Fields without values are absent. `stale` marks a copy served from the
    cache past its lifetime because the directory could not be reached."""

    values: Mapping[str, tuple[Value, ...]]
    stale: bool = False

    def get(self, name: str) -> tuple[Value, ...]:
        return self.values.get(name, ())

    def first(self, name: str) -> Value | None:
        values = self.values.get(name)
        return values[0] if values else None

    @property
    def photo(self) -> bytes | None:
        value = self.first(PHOTO_FIELD)
        return value if isinstance(value, bytes) else None


@dataclass(slots=True)
class _Cached:
    fetched: float  # trio.current_time() when read
    attributes: dict[str, list[bytes]]


def normalise(spec: FieldSpec, values: Sequence[Value]) -> tuple[Value, ...]:
    """Values as compared and stored: text stripped, empty values dropped,
    order kept (the first value is the one single-valued uses show)."""
    out: list[Value] = []
    for value in values:
        if spec.binary:
            data = value if isinstance(value, bytes) else value.encode("utf-8")
            if data:
                out.append(data)
        else:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            text = text.strip()
            if text and text not in out:
                out.append(text)
    return tuple(out)


def _same(a: tuple[Value, ...], b: tuple[Value, ...]) -> bool:
    """Equal as sets of values: LDAP keeps no order among an attribute's values."""
    return sorted(a, key=repr) == sorted(b, key=repr)


def _encode(value: Value) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


class ProfileService:
    """Profiles of local users under the configured field policies."""

    def __init__(self, server: ProfileHost) -> None:
        self.server = server
        cfg = server.config.profiles
        # ProfileConfigError here stops the server with the configuration problem.
        self.fields: dict[str, FieldSpec] = resolve_fields(server.config)
        self.cache_seconds = float(cfg.cache_seconds)
        self.max_cached = server.config.caches.profiles
        self.max_photo_bytes = int(cfg.max_photo_bytes)
        self._attributes = directory_attributes(self.fields.values())
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        # One writer per user at a time: compare-then-modify must not interleave.
        self._locks: KeyedLock[str] = KeyedLock()
        server.directory.read_at_login(self._attributes, self.prime)

    @property
    def size(self) -> tuple[int, int]:
        """(entries, bound) of the directory-attribute cache, for `mlink status`."""
        return len(self._cache), self.max_cached

    def apply_config(self, config: Config) -> None:
        """Take a reloaded configuration's profile policies. The cache is
        dropped: entries were read for the old fields and attributes.
        ProfileConfigError (before anything changes) when they cannot work."""
        fields = resolve_fields(config)
        self.fields = fields
        self.cache_seconds = float(config.profiles.cache_seconds)
        self.max_cached = config.caches.profiles
        self.max_photo_bytes = int(config.profiles.max_photo_bytes)
        self._attributes = directory_attributes(fields.values())
        self._cache.clear()
        self.server.directory.read_at_login(self._attributes, self.prime)

    def prime(self, jid: str, found: Mapping[str, list[bytes]]) -> None:
        """Cache the directory values a login's own search brought
        (`Directory.read_at_login`): the session's first presence needs the
        avatar hash, and the entry was just read."""
        self._store(jid, {name.lower(): list(values) for name, values in found.items()})

    def _store(self, jid: str, attributes: dict[str, list[bytes]]) -> None:
        self._cache[jid] = _Cached(trio.current_time(), attributes)
        self._cache.move_to_end(jid)
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)

    # -- reads ------------------------------------------------------------------

    async def get(self, jid: str) -> Profile:
        """The profile of local user `jid` (a bare JID). ProfileError
        `item-not-found` for no such user, `service-unavailable` when the
        directory is down and nothing is cached."""
        attributes, stale = await self._directory_values(jid, fresh=False)
        return Profile(await self._assemble(jid, attributes), stale)

    async def _directory_values(self, jid: str, fresh: bool) -> tuple[dict[str, list[bytes]], bool]:
        """The user's directory attributes (lower-cased names) and whether
        they are a stale cached copy."""
        if not self._attributes:
            return {}, False
        now = trio.current_time()
        cached = self._cache.get(jid)
        if cached is not None and not fresh and now - cached.fetched < self.cache_seconds:
            return cached.attributes, False
        try:
            found = await self.server.directory.user_attributes(jid, self._attributes)
        except DirectoryUnavailable as exc:
            if cached is not None and not fresh:
                log.info("directory unavailable (%s); serving cached profile of %s", exc, jid)
                return cached.attributes, True
            raise ProfileError("service-unavailable", DIRECTORY_DOWN_TEXT) from exc
        if found is None:
            self.invalidate(jid)
            raise ProfileError("item-not-found", "no such user")
        attributes = {name.lower(): list(values) for name, values in found.items()}
        self._store(jid, attributes)
        return attributes, False

    async def _assemble(self, jid: str, attributes: dict[str, list[bytes]]) -> dict[
            str, tuple[Value, ...]]:
        local: dict[str, bytes] = {}
        if any(spec.policy == "local" for spec in self.fields.values()):
            try:
                local = await self.server.store.profile_local(jid)
            except StoreError as exc:
                log.warning("local profile fields of %s unavailable: %s", jid, exc)
        values: dict[str, tuple[Value, ...]] = {}
        for name, spec in self.fields.items():
            raw: Sequence[Value]
            if spec.from_directory:
                raw = next((attributes[a.lower()] for a in spec.attributes
                            if attributes.get(a.lower())), [])
            elif spec.policy == "static":
                raw = [spec.static_value or ""]
            else:
                raw = [local[name]] if name in local else []
            got = normalise(spec, raw)
            if spec.single:
                got = got[:1]
            if got:
                values[name] = got
        return values

    def invalidate(self, jid: str) -> None:
        """Forget the cached directory values of `jid` (after a write)."""
        self._cache.pop(jid, None)

    def _written(self, jid: str) -> None:
        """After a write: drop our copy, and have other shards drop theirs."""
        self.invalidate(jid)
        self.server.changed(jid, CACHE_NAME)

    # -- writes -----------------------------------------------------------------

    async def update(self, jid: str, changes: Mapping[str, Sequence[Value]]) -> dict[
            str, tuple[Value, ...]]:
        """Set fields of `jid` to the given values (an empty sequence clears
        the field) under the field policies, all or nothing. Returns the
        fields that really changed (new values). Raises ProfileError."""
        for name in changes:
            if name not in self.fields:
                raise ProfileError("bad-request", f"unknown profile field {name!r}")
        async with self._locks.hold(jid):
            return await self._update_locked(jid, changes)

    async def _update_locked(self, jid: str, changes: Mapping[str, Sequence[Value]]) -> dict[
            str, tuple[Value, ...]]:
        attributes, _ = await self._directory_values(jid, fresh=True)
        current = await self._assemble(jid, attributes)
        changed: dict[str, tuple[Value, ...]] = {}
        for name, values in changes.items():
            spec = self.fields[name]
            new = normalise(spec, values)
            if spec.single:
                new = new[:1]
            if not _same(new, current.get(name, ())):
                changed[name] = new
        if not changed:
            return {}
        refused = [n for n in changed if self.fields[n].managed]
        if refused:
            raise ProfileError(
                "not-allowed",
                f"not allowed to change {', '.join(refused)}: "
                + ("managed by the directory" if len(refused) == 1 else "each is managed by "
                   "the directory or fixed by the server configuration")
                + "; nothing was changed")
        self._check_limits(changed)
        modify: dict[str, list[bytes]] = {}
        owner: dict[str, str] = {}
        local: dict[str, bytes | None] = {}
        for name, new in changed.items():
            spec = self.fields[name]
            if spec.policy == "update":
                attr = spec.attribute
                encoded = [_encode(v) for v in new]
                if attr.lower() in owner and modify[attr] != encoded:
                    raise ProfileError(
                        "bad-request",
                        f"fields {owner[attr.lower()]} and {name} both write attribute {attr} "
                        "with different values; nothing was changed")
                owner[attr.lower()] = name
                modify[attr] = encoded
            else:  # local: one value per field in the store
                local[name] = _encode(new[0]) if new else None
        old_directory = await self._write_directory(jid, modify, attributes)
        if local:
            try:
                await self.server.store.profile_local_put(jid, local)
            except StoreError as exc:
                log.error("storing local profile fields of %s failed: %s", jid, exc)
                await self._revert(jid, old_directory)
                raise ProfileError("internal-server-error",
                                   "the profile could not be stored; nothing was changed") from exc
        return changed

    async def _write_directory(self, jid: str, modify: dict[str, list[bytes]],
                               before: dict[str, list[bytes]]) -> dict[str, list[bytes]]:
        """The one LDAP modify; returns the old values of what it changed
        (to revert if the store then fails)."""
        if not modify:
            return {}
        old = {attr: before.get(attr.lower(), []) for attr in modify}
        try:
            await self.server.directory.modify_user(jid, modify)
        except DirectoryUnavailable as exc:
            raise ProfileError("service-unavailable", DIRECTORY_DOWN_TEXT) from exc
        except DirectoryRefused as exc:
            raise ProfileError(
                "not-acceptable", f"the directory refused the change: {exc}") from exc
        except NoSuchUser as exc:
            raise ProfileError("item-not-found", "no such user") from exc
        except DirectoryError as exc:
            raise ProfileError(
                "not-acceptable", f"the directory refused the change: {exc}") from exc
        finally:
            self._written(jid)
        return old

    async def _revert(self, jid: str, old: dict[str, list[bytes]]) -> None:
        if not old:
            return
        try:
            await self.server.directory.modify_user(jid, old)
        except DirectoryError as exc:
            log.error("could not revert directory profile change of %s: %s", jid, exc)
        finally:
            self._written(jid)

    def _check_limits(self, changed: Mapping[str, tuple[Value, ...]]) -> None:
        for name, values in changed.items():
            spec = self.fields[name]
            if len(values) > MAX_VALUES_PER_FIELD:
                raise ProfileError(
                    "not-acceptable",
                    f"{name} has {len(values)} values; at most {MAX_VALUES_PER_FIELD} are "
                    "allowed; nothing was changed")
            for value in values:
                if spec.binary and len(value) > self.max_photo_bytes:
                    raise ProfileError(
                        "not-acceptable",
                        f"{name} is {len(value)} bytes; the limit is {self.max_photo_bytes} "
                        "bytes; nothing was changed")
                if not spec.binary and len(value) > MAX_TEXT_VALUE_CHARS:
                    raise ProfileError(
                        "not-acceptable",
                        f"{name} is longer than {MAX_TEXT_VALUE_CHARS} characters; nothing "
                        "was changed")

class _ModuleProfileHost:
    """What a ProfileService needs, from a module's context."""

    def __init__(self, module: Module) -> None:
        self._module = module
        self.changed_user: Callable[[str], None] = lambda user: None

    @property
    def config(self) -> Config:
        return self._module.config

    @property
    def directory(self) -> Directory:
        return self._module.directory

    @property
    def store(self) -> Store:
        return self._module.data

    def changed(self, user: str, what: str) -> None:
        self.changed_user(user)


def profiles_of(module: Module) -> ProfileService:
    """The server's one ProfileService, created on first use (the vCard,
    XEP-0154 and avatar modules share it, and so its cache)."""

    def create() -> ProfileService:
        host = _ModuleProfileHost(module)
        service = ProfileService(host)
        host.changed_user = module.user_cache(CACHE_NAME, service.invalidate)
        return service

    return module.shared("profiles", create)
