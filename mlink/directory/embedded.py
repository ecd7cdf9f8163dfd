"""The embedded directory: users in an LDIF file, laid out as in LDAP.

The file holds the same DIT and attributes as the LDAP layout, so moving to
OpenLDAP is `slapadd -n1 -l directory.ldif` (after loading
`conf/mlink-schema.ldif`):

    <base DN>                       dcObject+organization (or organization/ou)
    ou=People,<base DN>             organizationalUnit
    mail=<bare JID>,ou=People,...   inetOrgPerson + mlinkUser

A user's RDN is `mail=<bare JID>`: unique across domains (two domains may
share a localpart), and the JID attribute itself. `uid` holds the localpart,
`cn`/`sn` start as the localpart, `userPassword` holds a `{SSHA}` hash (so a
simple bind works after slapadd) and `authPassword` one RFC 5803 value per
SCRAM mechanism. No clear password is ever stored.

Concurrency: every write takes an exclusive `flock` on `<file>.lock`, re-reads
the file if another process changed it, applies the change, writes a temp
file in the same directory, fsyncs it, renames it over the file and fsyncs
the directory. Readers `stat` the file on each lookup (cheap) and reload it
when its inode, size or mtime changed, so a user added by the CLI in another
process can log in without a restart. File I/O and PBKDF2 run in worker
threads, never on the Trio loop.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import trio

from mlink.config_model import EmbeddedConfig, RosterGroupConfig
from mlink.directory import ldif, schema
from mlink.directory.base import (
    DERIVE_THREADS,
    Directory,
    DirectoryError,
    DirectoryGroup,
    NoSuchUser,
    UserExists,
)
from mlink.directory.filters import FilterError, matches, parse_filter
from mlink.directory.groups import UserIndex, dedupe, resolve_group
from mlink.directory.names import (
    CREDENTIAL_ATTRIBUTES,
    GROUPS_RDN,
    MLINK_ATTRIBUTES,
    MLINK_CLASS,
    USER_OBJECT_CLASSES,
    check_bare_jid,
    escape_dn_value,
    is_under,
)
from mlink.directory.names import normalize_dn as normalize_any_dn
from mlink.sasl.secrets import ScramSecret, derive_all

log = logging.getLogger("mlink.directory")

PEOPLE_RDN = "ou=People"
SSHA_SALT_BYTES = 8


# --- password hashes -----------------------------------------------------


def ssha_hash(password: str) -> str:
    """A `{SSHA}` userPassword value (salted SHA-1), as slapd writes."""
    salt = os.urandom(SSHA_SALT_BYTES)
    digest = hashlib.sha1(password.encode("utf-8") + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


def verify_user_password(stored: str, password: str) -> bool:
    """Check `password` against a `{SSHA}`/`{SHA}`/`{SSHA256}`/`{SSHA512}`
    value; any other scheme (or clear text) is refused."""
    schemes = {"{SSHA}": "sha1", "{SHA}": "sha1", "{SSHA256}": "sha256", "{SSHA512}": "sha512"}
    for prefix, hash_name in schemes.items():
        if stored[: len(prefix)].upper() == prefix:
            try:
                raw = base64.b64decode(stored[len(prefix) :], validate=True)
            except ValueError:
                return False
            size = hashlib.new(hash_name).digest_size
            digest, salt = raw[:size], raw[size:]
            if prefix == "{SHA}" and salt:
                return False
            mine = hashlib.new(hash_name, password.encode("utf-8") + salt).digest()
            return hmac.compare_digest(mine, digest)
    return False


# --- DN helpers ----------------------------------------------------------


def normalize_dn(dn: str) -> str:
    """A comparison key for DNs we write ourselves: lower case, no spaces
    around separators. (Not a full RFC 4514 matcher; enough for our keys.)"""
    parts = []
    for rdn in _split_dn(dn):
        name, _, value = rdn.partition("=")
        parts.append(f"{name.strip().lower()}={value.strip().lower()}")
    return ",".join(parts)


def _split_dn(dn: str) -> list[str]:
    parts, cur, esc = [], [], False
    for ch in dn:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            cur.append(ch)
            esc = True
        elif ch == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur or parts:
        parts.append("".join(cur))
    return parts


def user_dn(jid: str, base_dn: str) -> str:
    return f"mail={escape_dn_value(jid)},{PEOPLE_RDN},{base_dn}"


def base_entries(base_dn: str, organization: str | None = None) -> list[ldif.Entry]:
    """The base entry and ou=People for a new directory."""
    first = _split_dn(base_dn)[0] if base_dn else ""
    attr, _, value = first.partition("=")
    attr = attr.strip().lower()
    value = value.strip().replace("\\", "")
    org = organization or value
    if attr == "dc":
        top = {"objectClass": ["top", "dcObject", "organization"], "dc": [value], "o": [org]}
    elif attr == "o":
        top = {"objectClass": ["top", "organization"], "o": [value]}
    elif attr == "ou":
        top = {"objectClass": ["top", "organizationalUnit"], "ou": [value]}
    else:
        raise DirectoryError(f"base DN {base_dn!r} must start with dc=, o= or ou=")
    people = {"objectClass": ["top", "organizationalUnit"], "ou": ["People"]}
    return [ldif.Entry(base_dn, top), ldif.Entry(f"{PEOPLE_RDN},{base_dn}", people)]


def _check_jid(jid: str) -> None:
    check_bare_jid(jid)
    if not jid.isascii():
        # inetOrgPerson's mail is an IA5String: slapd would refuse the entry.
        raise DirectoryError(
            f"{jid!r}: the JID attribute 'mail' only holds ASCII (IA5String); "
            "non-ASCII JIDs need another JID attribute, which needs the LDAP backend"
        )


# --- the state of one file -----------------------------------------------

Signature = tuple[int, int, int, int]  # device, inode, size, mtime_ns


def _signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(slots=True)
class _Snapshot:
    """The parsed file: every entry in order, and the users by JID key."""

    signature: Signature | None
    entries: list[ldif.Entry]
    users: dict[str, ldif.Entry] = field(default_factory=dict)  # jid key -> entry

    @classmethod
    def build(cls, signature: Signature | None, entries: list[ldif.Entry],
              base_dn: str) -> _Snapshot:
        people = normalize_dn(f"{PEOPLE_RDN},{base_dn}")
        users: dict[str, ldif.Entry] = {}
        for entry in entries:
            rdn_parent = _split_dn(entry.dn)[1:]
            if normalize_dn(",".join(rdn_parent)) != people:
                continue
            classes = {str(c).lower() for c in entry.get("objectClass")}
            mail = entry.first("mail")
            if "inetorgperson" in classes and isinstance(mail, str):
                users[mail.lower()] = entry
        return cls(signature, entries, users)


def _key(jid: str) -> str:
    # mail matches without case in LDAP (caseIgnoreIA5Match); do the same.
    return jid.lower()


class EmbeddedDirectory(Directory):
    """Users in an LDIF file; see the module docstring for the layout.

    A missing file is an empty directory with the base DIT of
    `config.base_dn`; the first write creates it.
    """

    def __init__(self, config: EmbeddedConfig) -> None:
        self.path = Path(config.file)
        self.base_dn = config.base_dn
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._snap: _Snapshot | None = None
        self._reload_lock = trio.Lock()
        self._write_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(DERIVE_THREADS)

    # --- creation ---------------------------------------------------------

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

    # --- reading ----------------------------------------------------------

    def _load_sync(self) -> _Snapshot:
        """Read and parse the file (worker thread)."""
        for _ in range(5):
            before = _signature(self.path)
            if before is None:
                return _Snapshot.build(None, base_entries(self.base_dn), self.base_dn)
            try:
                text = self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            # Renames are atomic, but make sure what we read is what we stat.
            if _signature(self.path) == before:
                return _Snapshot.build(before, ldif.parse(text), self.base_dn)
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
                log.debug("loaded %s: %d users", self.path, len(snap.users))
                self._snap = snap
            return snap

    async def _user(self, jid: str) -> ldif.Entry | None:
        return (await self._current()).users.get(_key(jid))

    async def check_password(self, jid: str, password: str) -> bool:
        if not password:
            return False
        entry = await self._user(jid)
        if entry is None:
            return False
        secret = _secret_of(entry, "SCRAM-SHA-256")
        if secret is not None:
            return await trio.to_thread.run_sync(
                secret.matches_password, password, limiter=self._limiter
            )
        for stored in entry.get("userPassword"):
            if isinstance(stored, bytes):
                stored = stored.decode("utf-8", "replace")
            if verify_user_password(stored, password):
                return True
        return False

    async def scram_secret(self, jid: str, mechanism: str) -> ScramSecret | None:
        entry = await self._user(jid)
        if entry is None:
            return None
        secret = _secret_of(entry, mechanism)
        if secret is None:
            log.info("%s has no authPassword value for %s (provisioned by another tool?); "
                     "PLAIN still works over TLS", jid, mechanism)
        return secret

    async def user_exists(self, jid: str) -> bool:
        return await self._user(jid) is not None

    async def list_users(self) -> list[str]:
        snap = await self._current()
        return sorted(str(e.first("mail")) for e in snap.users.values())

    async def ping(self) -> None:
        await self._current()

    async def aclose(self) -> None:
        self._snap = None

    # --- writing ----------------------------------------------------------

    async def _write(self, change: Callable[[_Snapshot], object]) -> object:
        """Apply `change` to a fresh copy of the file's state and write it.

        `change` runs in a worker thread under the file lock; it may raise
        to abort (nothing is written) and returns the result of the call.
        """

        def work() -> tuple[_Snapshot, object]:
            with _file_lock(self.lock_path):
                snap = self._snap
                if snap is None or _signature(self.path) != snap.signature:
                    snap = self._load_sync()
                entries = [e.copy() for e in snap.entries]
                work_snap = _Snapshot.build(snap.signature, entries, self.base_dn)
                result = change(work_snap)
                _atomic_write(self.path, ldif.dumps(work_snap.entries, header=_HEADER))
                sig = _signature(self.path)
                return _Snapshot.build(sig, work_snap.entries, self.base_dn), result

        async with self._write_lock:
            try:
                snap, result = await trio.to_thread.run_sync(work)
            except OSError as exc:
                raise DirectoryError(f"cannot write {self.path}: {exc}") from exc
            self._snap = snap
            return result

    def _new_entry(self, jid: str, password_attrs: dict[str, list[ldif.Value]]) -> ldif.Entry:
        local = jid.split("@", 1)[0]
        attrs: dict[str, list[ldif.Value]] = {
            "objectClass": list(USER_OBJECT_CLASSES),
            "cn": [local],
            "sn": [local],
            "uid": [local],
            "mail": [jid],
        }
        attrs.update(password_attrs)
        return ldif.Entry(user_dn(jid, self.base_dn), attrs)

    async def _password_attrs(self, password: str) -> dict[str, list[ldif.Value]]:
        return await trio.to_thread.run_sync(_password_attrs, password, limiter=self._limiter)

    async def add_user(self, jid: str, password: str) -> None:
        _check_jid(jid)
        if await self.user_exists(jid):
            raise UserExists(jid)
        attrs = await self._password_attrs(password)

        def change(snap: _Snapshot) -> None:
            if _key(jid) in snap.users:
                raise UserExists(jid)
            snap.entries.append(self._new_entry(jid, attrs))

        await self._write(change)

    async def set_password(self, jid: str, password: str) -> None:
        if not await self.user_exists(jid):
            raise NoSuchUser(jid)
        attrs = await self._password_attrs(password)

        def change(snap: _Snapshot) -> None:
            entry = snap.users.get(_key(jid))
            if entry is None:
                raise NoSuchUser(jid)
            _apply_password(entry, attrs)

        await self._write(change)

    async def delete_user(self, jid: str) -> None:
        def change(snap: _Snapshot) -> None:
            entry = snap.users.get(_key(jid))
            if entry is None:
                raise NoSuchUser(jid)
            snap.entries.remove(entry)

        await self._write(change)

    async def import_users(self, pairs: Iterable[tuple[str, str]]) -> int:
        pairs = list(pairs)
        for jid, _ in pairs:
            _check_jid(jid)

        def derive() -> list[dict[str, list[ldif.Value]]]:
            with ThreadPoolExecutor(DERIVE_THREADS) as pool:
                return list(pool.map(_password_attrs, (pw for _, pw in pairs), chunksize=64))

        derived = await trio.to_thread.run_sync(derive)

        def change(snap: _Snapshot) -> int:
            for (jid, _), attrs in zip(pairs, derived, strict=True):
                entry = snap.users.get(_key(jid))
                if entry is None:
                    entry = self._new_entry(jid, attrs)
                    snap.entries.append(entry)
                    snap.users[_key(jid)] = entry
                else:
                    _apply_password(entry, attrs)
            return len(pairs)

        result = await self._write(change)
        assert isinstance(result, int)
        return result

    # --- profiles and groups ----------------------------------------------

    async def user_attributes(
        self, jid: str, attributes: Sequence[str]
    ) -> dict[str, list[bytes]] | None:
        entry = await self._user(jid)
        if entry is None:
            return None
        out: dict[str, list[bytes]] = {}
        for name in attributes:
            if name.lower() in CREDENTIAL_ATTRIBUTES:
                continue  # never profile data (see names.CREDENTIAL_ATTRIBUTES)
            values = entry.get(schema.canonical(name) or name)
            if values:
                out[name] = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
        return out

    async def modify_user(self, jid: str, changes: Mapping[str, Sequence[bytes]]) -> None:
        """Checked against `mlink.directory.schema` first (DirectoryRefused
        in slapd's words), then applied to a copy and written atomically by
        `_write`: a refused change leaves the file untouched."""
        plan = schema.check_modification(changes)
        adds_mlink = any(name.lower() in MLINK_ATTRIBUTES and values for name, values in plan)

        def change(snap: _Snapshot) -> None:
            entry = snap.users.get(_key(jid))
            if entry is None:
                raise NoSuchUser(jid)
            for name, values in plan:
                entry.set(name, values)
            classes = entry.get("objectClass")
            if adds_mlink and MLINK_CLASS.lower() not in {str(c).lower() for c in classes}:
                entry.set("objectClass", [*classes, MLINK_CLASS])

        await self._write(change)

    async def roster_groups(self, specs: Sequence[RosterGroupConfig]) -> list[DirectoryGroup]:
        """Groups are entries anywhere in the file (by convention under
        ou=Groups), added by editing it; the file is re-read when it
        changes. Resolution runs in a worker thread: a 5,000-member group
        is a few milliseconds of CPU that the loop need not wait on."""
        snap = await self._current()
        return await trio.to_thread.run_sync(self._resolve_groups, snap, list(specs))

    def _resolve_groups(
        self, snap: _Snapshot, specs: list[RosterGroupConfig]
    ) -> list[DirectoryGroup]:
        users = UserIndex()
        for entry in snap.users.values():
            uids = [str(u) for u in entry.get("uid")]
            users.add(entry.dn, str(entry.first("mail")), uids)
        by_dn = {normalize_any_dn(e.dn): e for e in snap.entries}
        found: list[DirectoryGroup] = []
        for spec in specs:
            if spec.dn:
                entry = by_dn.get(normalize_any_dn(spec.dn))
                if entry is None:
                    log.warning("roster group %s: no such entry in %s", spec.dn, self.path)
                    continue
                found.append(resolve_group(entry.dn, entry.get, spec, users))
                continue
            try:
                flt = parse_filter(spec.filter or "(objectClass=*)")
            except FilterError as exc:
                raise DirectoryError(f"roster group filter {spec.filter!r}: {exc}") from exc
            base = normalize_any_dn(spec.base or f"{GROUPS_RDN},{self.base_dn}")
            for key, entry in by_dn.items():
                if is_under(key, base) and matches(flt, entry.get):
                    found.append(resolve_group(entry.dn, entry.get, spec, users))
        return dedupe(found)


_HEADER = (
    "mlink embedded directory. Written by mlink: edit with `mlink user ...`.\n"
    "Load into OpenLDAP (after conf/mlink-schema.ldif) with: slapadd -n1 -l <this file>"
)


def _secret_of(entry: ldif.Entry, mechanism: str) -> ScramSecret | None:
    for value in entry.get("authPassword"):
        if isinstance(value, bytes):
            continue
        secret = ScramSecret.from_auth_password(value)
        if secret is not None and secret.mechanism == mechanism:
            return secret
    return None


def _password_attrs(password: str) -> dict[str, list[ldif.Value]]:
    """userPassword and authPassword values for a password (PBKDF2: slow)."""
    if not password:
        raise DirectoryError("empty password")
    return {
        "userPassword": [ssha_hash(password)],
        "authPassword": [s.to_auth_password() for s in derive_all(password)],
    }


def _apply_password(entry: ldif.Entry, attrs: dict[str, list[ldif.Value]]) -> None:
    classes = entry.get("objectClass")
    if "mlinkuser" not in {str(c).lower() for c in classes}:
        entry.set("objectClass", [*classes, "mlinkUser"])
    for name, values in attrs.items():
        entry.set(name, values)


@contextlib.contextmanager
def _file_lock(lock_path: Path):
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
