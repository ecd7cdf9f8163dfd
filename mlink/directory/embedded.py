"""The embedded directory: entries in an LDIF file, served by an in-process
port that behaves like slapd where mlink can tell.

The file holds the same DIT and attributes as the LDAP layout, so moving to
OpenLDAP is `slapadd -n1 -l directory.ldif` (after loading
`conf/mlink-schema.ldif`):

    <base DN>                       dcObject+organization (or organization/ou)
    ou=People,<base DN>             organizationalUnit
    mail=<bare JID>,ou=People,...   inetOrgPerson + mlinkUser

A user's RDN is `mail=<bare JID>`: unique across domains (two domains may
share a localpart), and the JID attribute itself. `uid` holds the localpart,
`cn`/`sn` start as the localpart, `userPassword` holds an Argon2id hash
(`mlink.directory.password_hash`: slow to crack if the file leaks, and a
simple bind works after slapadd into a slapd with its argon2 module) and
`authPassword` one RFC 5803 value per SCRAM mechanism. No clear password is ever stored.

`EmbeddedPort` implements `mlink.directory.port.DirectoryPort` over the file:
searches evaluate RFC 4515 filters (`mlink.directory.filters`) over the
entries, with an index on `mail` and `uid` so a login is a dictionary
lookup; a modify of a user entry is checked against the user schema as
slapd would (`mlink.directory.schema`); a bind checks the stored hashes.
`EmbeddedDirectory` is the shared directory code (`mlink.directory.core`)
on it.

Concurrency: every write takes an exclusive `flock` on `<file>.lock`, re-reads
the file if another process changed it, applies the operations to a copy,
writes a temp file in the same directory, fsyncs it, renames it over the file
and fsyncs the directory: a batch of operations is all or nothing. Readers
`stat` the file on each lookup (cheap) and reload it when its inode, size or
mtime changed, so a user added by the CLI in another process can log in
without a restart. File I/O and PBKDF2 run in worker threads, never on the
Trio loop.

Change feed: a write through this port wakes the feed at once; a change by
another process (the CLI) or by hand is found by the same `stat` at every
interval, and the feed reports what differs between the entries it last
reported and the file now (adds, modifies and deletes alike).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from mlink.config_model import EmbeddedConfig
from mlink.directory import ldif, schema
from mlink.directory.base import DERIVE_THREADS, DirectoryError, DirectoryRefused
from mlink.directory.core import Layout, PortDirectory
from mlink.directory.filters import Filter, FilterError, matches, parse_filter
from mlink.directory.ldif import Entry, Value
from mlink.directory.names import (
    escape_dn_value,
    is_under,
    normalize_dn,
    parent_key,
    rdn_value,
)
from mlink.directory.password_hash import (
    hash_password,
    is_outdated,
    scheme_of,
    verify_password,
)
from mlink.directory.port import (
    DEFAULT_CHANGES_SECONDS,
    MIN_CHANGES_SECONDS,
    Add,
    Change,
    Delete,
    DirectoryPort,
    EntryExists,
    Modification,
    Modify,
    NoSuchEntry,
    Operation,
    PasswordModify,
    Scope,
    SizeLimitExceeded,
)
from mlink.sasl.secrets import ScramSecret

log = logging.getLogger(__name__)

PEOPLE_RDN = "ou=People"
# Attributes with an equality index: a login looks a user up by `mail`
# (the JID attribute) and groups by `uid`; both are then dictionary lookups,
# not a filter evaluated over every entry.
INDEXED_ATTRIBUTES = ("mail", "uid")
# Above this many candidate entries a search runs in a worker thread, so a
# bulk read (every user, 5,000 group members) never holds the loop.
THREAD_SEARCH_ENTRIES = 2000
# The user schema applies to entries of this class.
USER_CLASS = "inetorgperson"


# --- layout helpers ------------------------------------------------------


def user_dn(jid: str, base_dn: str) -> str:
    return f"mail={escape_dn_value(jid)},{PEOPLE_RDN},{base_dn}"


def base_entries(base_dn: str, organization: str | None = None) -> list[ldif.Entry]:
    """The base entry and ou=People for a new directory."""
    attr = base_dn.split(",", 1)[0].partition("=")[0].strip().lower() if base_dn else ""
    value = rdn_value(base_dn) if base_dn else ""
    org = organization or value
    top: dict[str, list[str | bytes]]
    if attr == "dc":
        top = {"objectClass": ["top", "dcObject", "organization"], "dc": [value], "o": [org]}
    elif attr == "o":
        top = {"objectClass": ["top", "organization"], "o": [value]}
    elif attr == "ou":
        top = {"objectClass": ["top", "organizationalUnit"], "ou": [value]}
    else:
        raise DirectoryError(f"base DN {base_dn!r} must start with dc=, o= or ou=")
    people: dict[str, list[str | bytes]] = {"objectClass": ["top", "organizationalUnit"],
                                            "ou": ["People"]}
    return [ldif.Entry(base_dn, top), ldif.Entry(f"{PEOPLE_RDN},{base_dn}", people)]


# --- the state of one file -----------------------------------------------

Signature = tuple[int, int, int, int]  # device, inode, size, mtime_ns


def _signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _fold(value: Value) -> str:
    """An index key: equality without case and with spaces collapsed."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return " ".join(value.lower().split())


@dataclass(slots=True)
class _Snapshot:
    """The parsed file: every entry in order, by normalised DN, and the
    equality indexes."""

    signature: Signature | None
    entries: list[Entry]
    by_dn: dict[str, Entry] = field(default_factory=dict)
    index: dict[str, dict[str, list[Entry]]] = field(default_factory=dict)

    @classmethod
    def build(cls, signature: Signature | None, entries: list[Entry]) -> _Snapshot:
        snap = cls(signature, entries)
        snap.index = {attr: {} for attr in INDEXED_ATTRIBUTES}
        for entry in entries:
            snap.by_dn[normalize_dn(entry.dn)] = entry
            for attr in INDEXED_ATTRIBUTES:
                for value in entry.get(attr):
                    snap.index[attr].setdefault(_fold(value), []).append(entry)
        return snap

    def candidates(self, flt: Filter) -> list[Entry]:
        """Entries that may match `flt`: those of one index key when the
        filter (or a term of its top-level AND) is an indexed equality."""
        terms = flt.parts if flt.op == "&" else (flt,)
        for term in terms:
            if term.op == "=" and term.attribute.lower() in self.index:
                return list(self.index[term.attribute.lower()].get(_fold(term.value), []))
        return self.entries


def _getter(entry: Entry) -> Callable[[str], list[Value]]:
    """`get(name)` for filters, aliases (commonName, ...) included."""

    def get(name: str) -> list[Value]:
        return entry.get(schema.canonical(name) or name)

    return get


def _project(entry: Entry, attributes: Sequence[str]) -> Entry:
    """A copy of `entry` with the attributes asked for, keyed as asked."""
    if not attributes or "*" in attributes:
        return entry.copy()
    out = Entry(entry.dn)
    # The entry's keys by lower case, once: a profile asks for dozens of
    # attributes, most of them absent, and each miss would scan every key.
    stored = {key.lower(): key for key in entry.attrs}
    for name in attributes:
        if name == "1.1":
            continue
        key = stored.get((schema.canonical(name) or name).lower())
        if key is not None and entry.attrs[key]:
            out.attrs[name] = list(entry.attrs[key])
    return out


def _is_user(entry: Entry) -> bool:
    return USER_CLASS in {str(c).lower() for c in entry.get("objectClass")}


def _stored_values(name: str, values: Sequence[Value], user: bool) -> list[Value]:
    """Values as the file keeps them: checked against the user schema for
    a user entry, else text when UTF-8."""
    if user:
        return schema.decode_values(name, values)
    out: list[Value] = []
    for value in values:
        if isinstance(value, bytes):
            try:
                out.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(value)
        else:
            out.append(value)
    return out


def _modify_entry(entry: Entry, mods: Sequence[Modification]) -> None:
    """Apply `mods` to `entry` (a copy) as slapd would, or raise."""
    user = _is_user(entry)
    for mod in mods:
        low = mod.attribute.lower()
        name = mod.attribute
        if user and low != "objectclass":
            name = schema.canonical(mod.attribute) or mod.attribute
        values = _stored_values(name, mod.values, user and low != "objectclass")
        current = entry.get(name)
        if mod.op == "replace":
            after = values
        elif mod.op == "add":
            folded = {_fold(v) for v in current}
            for value in values:
                if _fold(value) in folded:
                    raise DirectoryRefused(f"{name}: value #0 already exists")
            after = current + values
        else:  # delete
            if not current:
                raise DirectoryRefused(f"{name}: no such attribute")
            if values:
                gone = {_fold(v) for v in values}
                if not gone <= {_fold(v) for v in current}:
                    raise DirectoryRefused(f"{name}: no such value")
                after = [v for v in current if _fold(v) not in gone]
            else:
                after = []
        if user and low != "objectclass":
            name = schema.check_user_attribute(mod.attribute, after)
        entry.set(name, after)


class EmbeddedPort(DirectoryPort):
    """The port on an LDIF file; see the module docstring.

    A missing file is an empty directory with the base DIT of `base_dn`;
    the first write creates it."""

    def __init__(self, path: Path, base_dn: str) -> None:
        self.path = Path(path)
        self.base_dn = base_dn
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._snap: _Snapshot | None = None
        self._reload_lock = trio.Lock()
        self._write_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(DERIVE_THREADS)
        # Set (and replaced) by every write through this port: wakes the feed.
        self._written = trio.Event()

    # --- reading ----------------------------------------------------------

    def _load_sync(self) -> _Snapshot:
        """Read and parse the file (worker thread)."""
        for _ in range(5):
            before = _signature(self.path)
            if before is None:
                return _Snapshot.build(None, base_entries(self.base_dn))
            try:
                text = self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            # Renames are atomic, but make sure what we read is what we stat.
            if _signature(self.path) == before:
                return _Snapshot.build(before, ldif.parse(text))
        raise DirectoryError(f"{self.path} keeps changing while being read")

    async def _current(self) -> _Snapshot:
        """The snapshot, reloaded if the file changed since we read it."""
        snap = self._snap
        if snap is not None and _signature(self.path) == snap.signature:
            return snap
        async with self._reload_lock:
            snap = self._snap
            if snap is None or _signature(self.path) != snap.signature:
                try:
                    snap = await trio.to_thread.run_sync(self._load_sync)
                except (OSError, ldif.LDIFError) as exc:
                    raise DirectoryError(f"cannot read {self.path}: {exc}") from exc
                log.debug("loaded %s: %d entries", self.path, len(snap.entries))
                self._snap = snap
            return snap

    async def bind(self, dn: str, password: str) -> bool:
        """The SCRAM-SHA-256 secret when the entry has one (what mlink
        writes), else a SCRAM-SHA-1 one (all an account imported from
        Prosody's default storage has: its password works with PLAIN, and
        that login renews the secrets), else the `userPassword` hashes
        slapd would check."""
        if not password:
            return False
        entry = (await self._current()).by_dn.get(normalize_dn(dn))
        if entry is None:
            return False
        secret = _secret_of(entry, "SCRAM-SHA-256") or _secret_of(entry, "SCRAM-SHA-1")
        if secret is not None:
            return await trio.to_thread.run_sync(
                secret.matches_password, password, limiter=self._limiter
            )
        stored = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                  for v in entry.get("userPassword")]
        if not stored:
            return False
        return await trio.to_thread.run_sync(
            lambda: any(verify_password(value, password) for value in stored),
            limiter=self._limiter,
        )

    async def search(
        self,
        base: str,
        scope: Scope,
        filter: str,
        attributes: Sequence[str] = (),
        *,
        size_limit: int = 0,
        paged: bool = False,
        timeout_factor: float = 1.0,
    ) -> list[Entry]:
        snap = await self._current()
        base_key = normalize_dn(base)
        if base_key not in snap.by_dn:
            raise NoSuchEntry(base)
        try:
            flt = parse_filter(filter or "(objectClass=*)")
        except FilterError as exc:
            raise DirectoryError(f"bad search filter {filter!r}: {exc}") from exc
        candidates = snap.candidates(flt)

        def run() -> list[Entry]:
            found = []
            for entry in candidates:
                key = normalize_dn(entry.dn)
                if scope is Scope.BASE:
                    inside = key == base_key
                elif scope is Scope.ONELEVEL:
                    inside = parent_key(key) == base_key
                else:
                    inside = is_under(key, base_key)
                if inside and matches(flt, _getter(entry)):
                    found.append(_project(entry, attributes))
            return found

        if len(candidates) > THREAD_SEARCH_ENTRIES:
            found = await trio.to_thread.run_sync(run)
        else:
            found = run()
        if size_limit and len(found) > size_limit:
            raise SizeLimitExceeded(f"more than {size_limit} entries under {base}")
        return found

    async def compare(self, dn: str, attribute: str, value: Value) -> bool:
        entry = (await self._current()).by_dn.get(normalize_dn(dn))
        if entry is None:
            raise NoSuchEntry(dn)
        return _fold(value) in {_fold(v) for v in _getter(entry)(attribute)}

    async def ping(self) -> None:
        await self._current()

    async def aclose(self) -> None:
        self._snap = None

    # --- writing ----------------------------------------------------------

    def _apply_sync(self, snap: _Snapshot, op: Operation, hashes: Mapping[int, str]) -> None:
        """One operation on the working copy (worker thread, file locked);
        `hashes` holds the new userPassword of each PasswordModify, by id."""
        if isinstance(op, Add):
            key = normalize_dn(op.entry.dn)
            if key in snap.by_dn:
                raise EntryExists(op.entry.dn)
            parent = parent_key(key)
            if parent and parent not in snap.by_dn and key != normalize_dn(self.base_dn):
                raise NoSuchEntry(f"{op.entry.dn}: no parent entry")
            entry = Entry(op.entry.dn)
            for name, values in op.entry.attrs.items():
                entry.set(name, _stored_values(name, values, False))
            snap.entries.append(entry)
            snap.by_dn[key] = entry
            return
        key = normalize_dn(op.dn)
        found = snap.by_dn.get(key)
        if found is None:
            raise NoSuchEntry(op.dn)
        entry = found
        if isinstance(op, Modify):
            _modify_entry(entry, op.changes)
        elif isinstance(op, PasswordModify):
            if not op.password:
                raise DirectoryRefused("empty password")
            entry.set("userPassword", [hashes[id(op)]])
        elif isinstance(op, Delete):
            if any(is_under(other, key) and other != key for other in snap.by_dn):
                raise DirectoryRefused(f"{op.dn}: subordinate objects must be deleted first")
            snap.entries.remove(entry)
            del snap.by_dn[key]

    async def write(self, operations: Sequence[Operation]) -> None:
        """All of `operations` in one file write, or none of them."""
        operations = list(operations)
        hashes = await self._hash_passwords(operations)

        def work() -> _Snapshot:
            with _file_lock(self.lock_path):
                snap = self._snap
                if snap is None or _signature(self.path) != snap.signature:
                    snap = self._load_sync()
                work_snap = _Snapshot.build(snap.signature, [e.copy() for e in snap.entries])
                for op in operations:
                    self._apply_sync(work_snap, op, hashes)
                _atomic_write(self.path, ldif.dumps(work_snap.entries, header=_HEADER))
                return _Snapshot.build(_signature(self.path), work_snap.entries)

        async with self._write_lock:
            try:
                self._snap = await trio.to_thread.run_sync(work)
            except OSError as exc:
                raise DirectoryError(f"cannot write {self.path}: {exc}") from exc
        self._written.set()
        self._written = trio.Event()

    async def _hash_passwords(self, operations: Sequence[Operation]) -> dict[int, str]:
        """The new userPassword hash of every PasswordModify, computed in
        worker threads side by side before the file is locked: Argon2 is
        slow by design, and an import of many users must not hold the lock
        (or one core) for all of them in turn."""
        hashes: dict[int, str] = {}

        async def one(op: PasswordModify) -> None:
            hashes[id(op)] = await trio.to_thread.run_sync(
                hash_password, op.password, limiter=self._limiter)

        wanted = [op for op in operations if isinstance(op, PasswordModify) and op.password]
        async with trio.open_nursery() as nursery:
            for op in wanted:
                nursery.start_soon(one, op)
        return hashes

    async def upgrade_password_hash(self, dn: str, password: str) -> bool:
        """Replace an outdated userPassword hash (`{SSHA}`, weaker Argon2)
        of `dn` by a fresh one of `password`, which just logged in and which
        the old hash must match. Only the hash changes; nothing else of the
        entry. True if replaced."""
        entry = (await self._current()).by_dn.get(normalize_dn(dn))
        if entry is None:
            return False
        stored = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                  for v in entry.get("userPassword")]
        if not stored or not any(is_outdated(value) for value in stored):
            return False

        def rehash() -> str | None:
            # Only the password the stored hash holds: a caller's mistake
            # must not replace a user's password.
            if not any(verify_password(value, password) for value in stored):
                return None
            return hash_password(password)

        fresh = await trio.to_thread.run_sync(rehash, limiter=self._limiter)
        if fresh is None:
            return False
        # The old values named exactly: if the password changed meanwhile,
        # the delete fails and the newer password stays.
        await self.modify(dn, [Modification("delete", "userPassword", tuple(stored)),
                               Modification("add", "userPassword", (fresh,))])
        log.info("userPassword of %s rehashed with Argon2id (was %s)", dn,
                 ", ".join(sorted({scheme_of(v) or "clear text" for v in stored})))
        return True

    # --- the change feed ------------------------------------------------------

    async def changes(self, base: str, interval: float = DEFAULT_CHANGES_SECONDS
                      ) -> AsyncIterator[list[Change]]:
        """What differs between the entries last reported and the file now,
        after every write through this port and every `interval` (for
        writes by other processes or by hand, seen by the file's stat)."""
        interval = max(MIN_CHANGES_SECONDS, interval)
        base_key = normalize_dn(base)
        last: dict[str, Entry] | None = None
        failing = False
        while True:
            try:
                snap = await self._current()
            except DirectoryError as exc:
                if not failing:
                    log.warning("directory change feed: %s; retrying every %.1f s", exc, interval)
                failing = True
            else:
                failing = False
                now = {k: e for k, e in snap.by_dn.items() if is_under(k, base_key)}
                if last is None:
                    last = now
                    yield []  # the baseline is taken: changes from here on are reported
                else:
                    batch = _diff(last, now)
                    last = now
                    if batch:
                        yield batch
            with trio.move_on_after(interval):
                await self._written.wait()


def _diff(before: dict[str, Entry], after: dict[str, Entry]) -> list[Change]:
    batch: list[Change] = []
    for key, entry in after.items():
        old = before.get(key)
        if old is None:
            batch.append(Change("add", entry.dn, entry.copy(), key=key))
        elif old is not entry and _attr_key(old) != _attr_key(entry):
            batch.append(Change("modify", entry.dn, entry.copy(), key=key))
    for key, entry in before.items():
        if key not in after:
            batch.append(Change("delete", entry.dn, None, key=key))
    return batch


def _attr_key(entry: Entry) -> dict[str, list[Value]]:
    return {name.lower(): values for name, values in entry.attrs.items()}


class EmbeddedDirectory(PortDirectory):
    """Users in an LDIF file: the shared directory code on `EmbeddedPort`."""

    def __init__(self, config: EmbeddedConfig,
                 changes_seconds: float = DEFAULT_CHANGES_SECONDS) -> None:
        self.path = Path(config.file)
        self.base_dn = config.base_dn
        layout = Layout(
            base_dn=config.base_dn,
            users_dn=f"{PEOPLE_RDN},{config.base_dn}",
            user_filter="(objectClass=inetOrgPerson)",
        )
        super().__init__(EmbeddedPort(self.path, config.base_dn), layout, changes_seconds)

    @classmethod
    async def create(
        cls, path: Path | str, base_dn: str, domain: str | None = None
    ) -> EmbeddedDirectory:
        """Write the base DIT (base entry, ou=People) to a new file and open it.
        `domain` becomes the organisation name (`o`) of a dc= base entry.
        DirectoryError if the file exists."""
        path = Path(path)
        entries = base_entries(base_dn, domain)

        def write() -> None:
            with _file_lock(path.with_name(path.name + ".lock")):
                if path.exists():
                    raise DirectoryError(f"{path} already exists")
                _atomic_write(path, ldif.dumps(entries, header=_HEADER))

        await trio.to_thread.run_sync(write)
        return cls(EmbeddedConfig(file=path, base_dn=base_dn))


_HEADER = (
    "mlink embedded directory. Written by mlink: edit with `mlink user ...`.\n"
    "Load into OpenLDAP (after conf/mlink-schema.ldif) with: slapadd -n1 -l <this file>"
)


def _secret_of(entry: Entry, mechanism: str) -> ScramSecret | None:
    for value in entry.get("authPassword"):
        if isinstance(value, bytes):
            continue
        secret = ScramSecret.from_auth_password(value)
        if secret is not None and secret.mechanism == mechanism:
            return secret
    return None


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive flock on `lock_path` (blocking: call from a worker thread)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _atomic_write(path: Path, text: str) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # password hashes: owner only
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
