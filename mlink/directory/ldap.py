"""The LDAP directory backend (bonsai), pooled, with timeouts and failover.

Connections are `bonsai.trio.TrioLDAPConnection`s, so searches and writes
wait on the Trio loop without a thread hop. Two hazards were measured and
designed around (see docs/ldap.md):

- bonsai issue #113: an async connect blocks the loop while libldap's TCP
  connect waits for a SYN that is never answered (measured here: ~130 s,
  with a full listen backlog). So before bonsai connects, a Trio TCP connect
  to the same host and port must succeed within the timeout: a black-holed
  server fails there, on the loop's terms. For the small window between
  that probe and bonsai's own connect, libldap's network timeout is set
  (environment LDAPNETWORK_TIMEOUT, read once per process when libldap
  initialises; an existing value is kept), which bounds a stall to it.
- bonsai's *synchronous* connect holds the GIL while it waits (a worker
  thread doing it stalls the loop too; measured with a server that accepts
  TCP and never answers), so "connect in a worker thread" is no cure.
- `bonsai.set_connect_async(True)` would avoid the blocking connect but
  never completes a connect that is not instant (bonsai #110, fixed after
  1.5.5), i.e. any non-local server; not used.

Every operation runs under `trio.fail_after(timeout)` (bonsai gets the same
timeout); a connection whose operation failed or timed out is closed, never
reused. The pool holds up to `pool_size` connections bound as the service
account. On a connection failure every idle connection is dropped too (after
a server restart they are all dead) and the request is retried once on a
fresh connection. Opening a connection tries the configured servers in
order, starting from the last one that answered. Any failure to reach a
server ends as `DirectoryUnavailable`.

Passwords: `check_password` binds as the user's DN on a short-lived
connection, so the directory's password policy (lockout, expiry) applies;
an empty password is refused without binding (RFC 4513 §5.1.2: an
unauthenticated bind would "succeed"). `add_user`/`set_password` write the
RFC 5803 `authPassword` values and set `userPassword` with the RFC 3062
password modify extended operation, so the directory hashes it per its own
policy (olcPasswordHash) and mlink never stores a clear password.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import bonsai
import trio
from bonsai import LDAPEntry, LDAPModOp, LDAPSearchScope
from bonsai.trio import TrioLDAPConnection

from mlink.config_model import LDAPConfig, RosterGroupConfig
from mlink.directory.base import (
    DERIVE_THREADS,
    Directory,
    DirectoryError,
    DirectoryGroup,
    DirectoryRefused,
    DirectoryUnavailable,
    NoSuchUser,
    UserExists,
)
from mlink.directory.filters import FilterError, parse_filter
from mlink.directory.groups import UserIndex, dedupe, group_attributes, resolve_group
from mlink.directory.names import (
    CREDENTIAL_ATTRIBUTES,
    GROUPS_RDN,
    MLINK_ATTRIBUTES,
    MLINK_CLASS,
    USER_OBJECT_CLASSES,
    check_bare_jid,
    escape_dn_value,
    escape_filter_value,
)
from mlink.directory.schema import check_writable
from mlink.sasl.secrets import HASHES, ScramSecret, derive_all

log = logging.getLogger("mlink.directory")

T = TypeVar("T")

# Entries per page of a paged search (RFC 2696). Below slapd's default
# size limit (500), so paging, not the limit, decides; a 5,000-user
# directory is ten round trips.
PAGE_SIZE = 500
# Reading every user and every group is many pages, not one request: it
# gets this many per-request timeouts in all (a minute at the default 5 s).
# A 5,000-member group loads in well under a second on a local slapd; the
# bound is only there for a pathologically slow server.
BULK_TIMEOUT_FACTOR = 12


def _is_connection_failure(exc: BaseException) -> bool:
    """A failure of the link, not an answer from the server. libldap's own
    client-side errors have negative result codes."""
    if isinstance(exc, bonsai.ConnectionError | bonsai.TimeoutError | bonsai.ClosedConnection):
        return True
    return isinstance(exc, bonsai.LDAPError) and getattr(exc, "code", 0) < 0


class LDAPDirectory(Directory):
    """Users in an LDAP directory; see the module docstring."""

    def __init__(self, config: LDAPConfig) -> None:
        if not config.servers:
            raise DirectoryError("no LDAP server configured")
        self.config = config
        self.timeout = float(config.timeout)
        # Bounds libldap's blocking TCP connect (see the module docstring).
        os.environ.setdefault("LDAPNETWORK_TIMEOUT", str(max(1, math.ceil(self.timeout))))
        self.users_dn = config.users_dn or f"ou=People,{config.base_dn}"
        user_filter = config.user_filter.strip() or "(objectClass=*)"
        if not user_filter.startswith("("):
            user_filter = f"({user_filter})"
        self.user_filter = user_filter
        self.jid_attr = config.jid_attribute
        self.scram_attr = config.scram_attribute
        size = max(1, int(config.pool_size))
        self._idle: list[bonsai.LDAPConnection] = []
        self._slots = trio.Semaphore(size)
        # PBKDF2 runs in worker threads, a few at a time.
        self._derive_threads = trio.CapacityLimiter(DERIVE_THREADS)
        self._preferred = 0  # index of the server that last answered
        self._generation = 0  # bumped when the pool is flushed
        self._closed = False

    # --- connections ------------------------------------------------------

    async def _probe(self, url: str) -> None:
        """A TCP connect on the loop's terms, so that a black-holed server
        cannot block the loop inside libldap's connect (bonsai #113)."""
        parsed = bonsai.LDAPURL(url)
        if parsed.scheme == "ldapi":
            return
        stream = await trio.open_tcp_stream(parsed.host, parsed.port)
        await stream.aclose()

    async def _connect(self, user: str, password: str) -> TrioLDAPConnection:
        """Open and bind a connection, trying servers in order.

        AuthenticationError and other answers from a server propagate; an
        unreachable or silent server moves on to the next one, and when none
        is left DirectoryUnavailable is raised."""
        servers = self.config.servers
        start = self._preferred
        errors = []
        for i in range(len(servers)):
            index = (start + i) % len(servers)
            url = servers[index]
            client = bonsai.LDAPClient(url)
            client.set_credentials("SIMPLE", user=user, password=password)
            client.set_async_connection_class(TrioLDAPConnection)
            try:
                with trio.fail_after(self.timeout):
                    await self._probe(url)
                    conn = await client.connect(is_async=True, timeout=self.timeout)
            except trio.TooSlowError:
                errors.append(f"{url}: no answer within {self.timeout}s")
                continue
            except OSError as exc:
                errors.append(f"{url}: {exc}")
                continue
            except bonsai.LDAPError as exc:
                if not _is_connection_failure(exc):
                    raise
                errors.append(f"{url}: {exc}")
                continue
            if self._preferred != index:
                log.warning("LDAP: now using %s", url)
                self._preferred = index
            return conn
        log.warning("LDAP unreachable: %s", "; ".join(errors))
        raise DirectoryUnavailable("LDAP unreachable: " + "; ".join(errors))

    async def _open_service(self) -> TrioLDAPConnection:
        try:
            return await self._connect(self.config.bind_dn, self.config.bind_password)
        except bonsai.AuthenticationError as exc:
            log.error("LDAP: the service account %r cannot bind: %s", self.config.bind_dn, exc)
            raise DirectoryUnavailable(f"service bind refused: {exc}") from exc

    def _flush(self) -> None:
        idle, self._idle = self._idle, []
        self._generation += 1
        for conn in idle:
            _close(conn)

    async def _call(
        self,
        fn: Callable[[TrioLDAPConnection], Awaitable[T]],
        op_timeout: float | None = None,
    ) -> T:
        """Run `fn(conn)` on a pooled service connection, under the timeout
        (`op_timeout` for the operation itself, when it is a bulk read)."""
        if self._closed:
            raise DirectoryUnavailable("directory closed")
        op_timeout = self.timeout if op_timeout is None else op_timeout
        # Waiting for a free connection, connecting (one timeout per server)
        # and the operation itself.
        budget = self.timeout * (len(self.config.servers) + 1) + op_timeout
        with trio.move_on_after(budget):
            async with self._slots:
                for attempt in range(2):
                    conn = self._idle.pop() if self._idle else None
                    reused = conn is not None
                    generation = self._generation
                    try:
                        if conn is None:
                            conn = await self._open_service()
                        with trio.fail_after(op_timeout):
                            result = await fn(conn)
                    except trio.TooSlowError as exc:
                        _close(conn)
                        self._flush()
                        log.warning("LDAP request timed out after %ss", op_timeout)
                        raise DirectoryUnavailable("LDAP request timed out") from exc
                    except bonsai.LDAPError as exc:
                        if not _is_connection_failure(exc):
                            self._give_back(conn, generation)
                            raise DirectoryError(f"LDAP: {exc}") from exc
                        _close(conn)
                        self._flush()
                        if reused and attempt == 0:
                            log.info("LDAP connection lost (%s); reconnecting", exc)
                            continue
                        log.warning("LDAP request failed: %s", exc)
                        raise DirectoryUnavailable(str(exc)) from exc
                    except Exception:  # NoSuchUser, UserExists...: the link is fine
                        self._give_back(conn, generation)
                        raise
                    except BaseException:  # cancelled mid-operation: unusable
                        _close(conn)
                        raise
                    self._give_back(conn, generation)
                    return result
        raise DirectoryUnavailable(f"LDAP request timed out after {budget:.1f}s")

    def _give_back(self, conn: TrioLDAPConnection | None, generation: int) -> None:
        if conn is None:
            return
        if self._closed or generation != self._generation:
            _close(conn)
        else:
            self._idle.append(conn)

    # --- lookups ----------------------------------------------------------

    def _user_filter(self, jid: str) -> str:
        return f"(&{self.user_filter}({self.jid_attr}={escape_filter_value(jid)}))"

    async def _find_on(
        self, conn: TrioLDAPConnection, jid: str, attrs: list[str]
    ) -> LDAPEntry | None:
        try:
            found = await conn.search(
                self.users_dn,
                LDAPSearchScope.SUBTREE,
                self._user_filter(jid),
                attrs,
                timeout=self.timeout,
                sizelimit=2,
            )
        except bonsai.SizeLimitError:
            found = [None, None]
        except bonsai.NoSuchObjectError:
            log.error("LDAP: the users DN %r does not exist", self.users_dn)
            return None
        if len(found) > 1:
            log.error("LDAP: several entries have %s=%s; refusing to choose", self.jid_attr, jid)
            return None
        return found[0] if found else None

    async def _find(self, jid: str, attrs: list[str]) -> LDAPEntry | None:
        return await self._call(lambda conn: self._find_on(conn, jid, attrs))

    async def check_password(self, jid: str, password: str) -> bool:
        if not password:
            return False  # an unauthenticated bind would "succeed"
        entry = await self._find(jid, ["1.1"])
        if entry is None:
            return False
        dn = str(entry.dn)
        with trio.move_on_after(self.timeout * (len(self.config.servers) + 1)):
            try:
                conn = await self._connect(dn, password)
            except (bonsai.AuthenticationError, bonsai.UnwillingToPerform) as exc:
                # Wrong password, or locked/expired by the password policy.
                log.debug("LDAP bind as %s refused: %s", dn, exc)
                return False
            except bonsai.LDAPError as exc:
                log.info("LDAP bind as %s failed: %s", dn, exc)
                return False
            _close(conn)
            return True
        raise DirectoryUnavailable("LDAP bind timed out")

    async def scram_secret(self, jid: str, mechanism: str) -> ScramSecret | None:
        if mechanism not in HASHES:
            return None
        entry = await self._find(jid, [self.scram_attr])
        if entry is None:
            return None
        for value in entry.get(self.scram_attr, []):
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
            secret = ScramSecret.from_auth_password(value)
            if secret is not None and secret.mechanism == mechanism:
                return secret
        log.info(
            "%s (%s) has no %s value for %s; provisioned by another tool? "
            "PLAIN still works over TLS; setting the password through mlink adds it",
            jid, entry.dn, self.scram_attr, mechanism,
        )
        return None

    async def user_exists(self, jid: str) -> bool:
        return await self._find(jid, ["1.1"]) is not None

    async def list_users(self) -> list[str]:
        filt = f"(&{self.user_filter}({self.jid_attr}=*))"

        async def search(conn: TrioLDAPConnection) -> list[str]:
            jids: list[str] = []
            # Consume every page inside this one call (bonsai #99).
            results = await conn.paged_search(
                self.users_dn, LDAPSearchScope.SUBTREE, filt, [self.jid_attr],
                timeout=self.timeout, page_size=PAGE_SIZE,
            )
            async for entry in results:
                jids.extend(str(v) for v in entry.get(self.jid_attr, [])[:1])
            return jids

        return sorted(await self._call(search))

    async def ping(self) -> None:
        await self._call(lambda conn: conn.whoami(timeout=self.timeout))

    async def aclose(self) -> None:
        self._closed = True
        self._flush()

    # --- writes -----------------------------------------------------------

    def _new_dn(self, jid: str) -> str:
        return f"{self.jid_attr}={escape_dn_value(jid)},{self.users_dn}"

    async def _upsert_on(
        self,
        conn: TrioLDAPConnection,
        jid: str,
        password: str,
        secrets: list[str],
        create: bool | None,
    ) -> None:
        """Create (create=True), update (False) or either (None) one user."""
        entry = await self._find_on(conn, jid, ["objectClass"])
        if entry is None and create is False:
            raise NoSuchUser(jid)
        if entry is not None and create is True:
            raise UserExists(jid)
        if entry is None:
            dn = self._new_dn(jid)
            local = jid.split("@", 1)[0]
            new = LDAPEntry(dn)
            new["objectClass"] = list(USER_OBJECT_CLASSES)
            new["cn"] = [local]
            new["sn"] = [local]
            new["uid"] = [local]
            new[self.jid_attr] = [jid]
            new[self.scram_attr] = secrets
            try:
                await conn.add(new, timeout=self.timeout)
            except bonsai.AlreadyExists as exc:
                raise UserExists(jid) from exc
            try:
                await conn.modify_password(dn, password, timeout=self.timeout)
            except bonsai.LDAPError:
                try:  # do not leave a user without a userPassword behind
                    await conn.delete(dn, timeout=self.timeout)
                except bonsai.LDAPError:
                    log.exception("LDAP: could not remove half-created %s", dn)
                raise
            return
        dn = str(entry.dn)
        change = LDAPEntry(dn, conn)
        classes = {str(c).lower() for c in entry.get("objectClass", [])}
        if MLINK_CLASS.lower() not in classes:
            change.change_attribute("objectClass", LDAPModOp.ADD, MLINK_CLASS)
        change.change_attribute(self.scram_attr, LDAPModOp.REPLACE, *secrets)
        await change.modify(timeout=self.timeout)
        await conn.modify_password(dn, password, timeout=self.timeout)

    async def _secrets(self, password: str) -> list[str]:
        if not password:
            raise DirectoryError("empty password")
        secrets = await trio.to_thread.run_sync(
            derive_all, password, limiter=self._derive_threads
        )
        return [s.to_auth_password() for s in secrets]

    async def add_user(self, jid: str, password: str) -> None:
        check_bare_jid(jid)
        secrets = await self._secrets(password)
        await self._call(lambda c: self._upsert_on(c, jid, password, secrets, True))

    async def set_password(self, jid: str, password: str) -> None:
        secrets = await self._secrets(password)
        await self._call(lambda c: self._upsert_on(c, jid, password, secrets, False))

    async def delete_user(self, jid: str) -> None:
        async def delete(conn: TrioLDAPConnection) -> None:
            entry = await self._find_on(conn, jid, ["1.1"])
            if entry is None:
                raise NoSuchUser(jid)
            await conn.delete(str(entry.dn), timeout=self.timeout)

        await self._call(delete)

    # --- profiles and groups ----------------------------------------------

    async def user_attributes(
        self, jid: str, attributes: Sequence[str]
    ) -> dict[str, list[bytes]] | None:
        wanted = [a for a in attributes if a.lower() not in CREDENTIAL_ATTRIBUTES]
        # "1.1" asks for no attributes (RFC 4511 §4.5.1.8): just the entry.
        entry = await self._find(jid, wanted or ["1.1"])
        if entry is None:
            return None
        out: dict[str, list[bytes]] = {}
        for name in wanted:
            values = entry.get(name)  # LDAPEntry compares names without case
            if values:
                out[name] = [_as_bytes(v) for v in values]
        return out

    async def modify_user(self, jid: str, changes: Mapping[str, Sequence[bytes]]) -> None:
        """One LDAP modify with a replace per attribute (RFC 4511 §4.6: a
        replace without values deletes the attribute, and is no error when
        it is absent). The server applies a modify atomically, so a refused
        value leaves every other one unchanged."""
        seen: set[str] = set()
        for name, values in changes.items():
            if name.lower() in seen:
                raise DirectoryError(f"attribute {name!r} given twice in one change")
            seen.add(name.lower())
            check_writable(name.lower(), self.jid_attr, name)
            if name.lower() == self.scram_attr.lower():
                check_writable("authpassword", self.jid_attr, name)
            for value in values:
                if not isinstance(value, bytes | bytearray):
                    raise DirectoryError(f"{name}: values must be bytes, not {type(value)}")
        adds_mlink = any(n.lower() in MLINK_ATTRIBUTES and v for n, v in changes.items())

        async def modify(conn: TrioLDAPConnection) -> None:
            entry = await self._find_on(conn, jid, ["objectClass"])
            if entry is None:
                raise NoSuchUser(jid)
            change = LDAPEntry(str(entry.dn), conn)
            classes = {str(c).lower() for c in entry.get("objectClass", [])}
            if adds_mlink and MLINK_CLASS.lower() not in classes:
                change.change_attribute("objectClass", LDAPModOp.ADD, MLINK_CLASS)
            for name, values in changes.items():
                try:
                    change.change_attribute(name, LDAPModOp.REPLACE, *[bytes(v) for v in values])
                except ValueError as exc:
                    # bonsai refuses values equal but for case, client side.
                    raise DirectoryRefused(f"{name}: {exc}") from exc
            try:
                await change.modify(timeout=self.timeout)
            except bonsai.NoSuchObjectError as exc:
                raise NoSuchUser(jid) from exc
            except bonsai.LDAPError as exc:
                if _is_connection_failure(exc):
                    raise
                log.info("LDAP refused a change of %s (%s): %s", jid, entry.dn, exc)
                raise DirectoryRefused(_ldap_message(exc)) from exc

        if changes:
            await self._call(modify)

    async def _user_index(self) -> UserIndex:
        """Every user once: one paged search giving DN, JID and uids."""
        filt = f"(&{self.user_filter}({self.jid_attr}=*))"

        async def search(conn: TrioLDAPConnection) -> UserIndex:
            index = UserIndex()
            # Consume every page inside this one call (bonsai #99).
            results = await conn.paged_search(
                self.users_dn, LDAPSearchScope.SUBTREE, filt, [self.jid_attr, "uid"],
                timeout=self.timeout, page_size=PAGE_SIZE,
            )
            async for entry in results:
                jids = entry.get(self.jid_attr, [])
                if jids:
                    uids = [_as_text(u) for u in entry.get("uid", [])]
                    index.add(str(entry.dn), _as_text(jids[0]), uids)
            return index

        return await self._call(search, self.timeout * BULK_TIMEOUT_FACTOR)

    async def _group_entries(self, spec: RosterGroupConfig) -> list[tuple[str, dict[str, list]]]:
        """(DN, attributes by lower-case name) of the entries `spec` names."""
        attrs = group_attributes(spec)

        def plain(entry: LDAPEntry) -> tuple[str, dict[str, list]]:
            return str(entry.dn), {a.lower(): list(entry.get(a, [])) for a in attrs}

        if spec.dn:
            async def read(conn: TrioLDAPConnection) -> list[tuple[str, dict[str, list]]]:
                try:
                    found = await conn.search(
                        spec.dn, LDAPSearchScope.BASE, "(objectClass=*)", attrs,
                        timeout=self.timeout,
                    )
                except (bonsai.NoSuchObjectError, bonsai.InvalidDN):
                    log.warning("roster group %s: no such entry", spec.dn)
                    return []
                return [plain(e) for e in found]

            return await self._call(read, self.timeout * BULK_TIMEOUT_FACTOR)
        try:
            parse_filter(spec.filter or "")
        except FilterError as exc:
            raise DirectoryError(f"roster group filter {spec.filter!r}: {exc}") from exc
        base = spec.base or f"{GROUPS_RDN},{self.config.base_dn}"

        async def search(conn: TrioLDAPConnection) -> list[tuple[str, dict[str, list]]]:
            try:
                results = await conn.paged_search(
                    base, LDAPSearchScope.SUBTREE, spec.filter, attrs,
                    timeout=self.timeout, page_size=PAGE_SIZE,
                )
                return [plain(e) async for e in results]
            except bonsai.NoSuchObjectError:
                log.warning("roster groups: search base %s does not exist", base)
                return []

        return await self._call(search, self.timeout * BULK_TIMEOUT_FACTOR)

    async def roster_groups(self, specs: Sequence[RosterGroupConfig]) -> list[DirectoryGroup]:
        """One paged search of users, then one read or paged search per
        spec; members map to JIDs by lookups in memory (mlink.directory.groups)."""
        if not specs:
            return []
        users = await self._user_index()
        found: list[DirectoryGroup] = []
        for spec in specs:
            for dn, attrs in await self._group_entries(spec):
                found.append(
                    resolve_group(dn, lambda name, a=attrs: a.get(name.lower(), []), spec, users)
                )
        return dedupe(found)

    async def import_users(self, pairs: Iterable[tuple[str, str]]) -> int:
        """Derive every secret first (a few threads; PBKDF2 releases the
        GIL), then upsert with one task per pooled connection."""
        pairs = list(pairs)
        for jid, password in pairs:
            check_bare_jid(jid)
            if not password:
                raise DirectoryError(f"{jid}: empty password")

        def derive() -> list[list[str]]:
            def one(password: str) -> list[str]:
                return [s.to_auth_password() for s in derive_all(password)]

            with ThreadPoolExecutor(DERIVE_THREADS) as pool:
                return list(pool.map(one, (pw for _, pw in pairs), chunksize=64))

        derived = await trio.to_thread.run_sync(derive)
        send, receive = trio.open_memory_channel[tuple[str, str, list[str]]](0)

        async def worker(receive: trio.MemoryReceiveChannel) -> None:
            async with receive:
                async for jid, password, secrets in receive:
                    await self._call(
                        lambda c, j=jid, p=password, s=secrets: self._upsert_on(c, j, p, s, None)
                    )

        async with trio.open_nursery() as nursery:
            for _ in range(max(1, int(self.config.pool_size))):
                nursery.start_soon(worker, receive.clone())
            receive.close()
            async with send:
                for (jid, password), secrets in zip(pairs, derived, strict=True):
                    await send.send((jid, password, secrets))
        return len(pairs)


def _as_bytes(value: object) -> bytes:
    """bonsai gives str for values that decode as UTF-8, bytes otherwise."""
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


def _as_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _ldap_message(exc: bonsai.LDAPError) -> str:
    """The server's words for a refusal: bonsai's text without its
    "(0x0041 [65])" result-code suffix."""
    text = str(exc).strip()
    if text.endswith(")") and " (0x" in text:
        text = text[: text.rindex(" (0x")]
    return text or type(exc).__name__


def _close(conn: TrioLDAPConnection | None) -> None:
    if conn is None:
        return
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing a dead link may fail; nothing to do
        log.debug("closing an LDAP connection failed", exc_info=True)
