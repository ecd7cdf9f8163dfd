"""The LDAP directory backend (bonsai), pooled, with timeouts and failover.

Why worker threads instead of `bonsai.trio.TrioLDAPConnection`: bonsai's
async connect can ignore its timeout and block the whole event loop when a
server silently drops packets (bonsai issue #113). Here every bonsai call —
connect, bind, search, modify — runs in a worker thread
(`trio.to_thread.run_sync(..., abandon_on_cancel=True)`) under a Trio
deadline, so a dead or unreachable server can cost a request its timeout
but can never stall the loop. bonsai is also given the timeout, so an
abandoned thread ends by itself. The cost, a thread hop per request (tens of
microseconds), is small next to a network round trip.

The pool holds up to `pool_size` connections bound as the service account.
A connection that fails (connection error, timeout) is dropped together with
every idle one (after a server restart they are all dead), and the request
is retried once on a fresh connection; opening a connection tries the
configured servers in order, starting from the last one that answered.
Any failure to reach a server ends as `DirectoryUnavailable`.

Passwords: `check_password` binds as the user's DN on a short-lived
connection, so the directory's password policy (lockout, expiry) applies;
an empty password is refused without binding (RFC 4513 §5.1.2: an
unauthenticated bind would "succeed"). `add_user`/`set_password` write the
RFC 5803 `authPassword` values and set `userPassword` with the RFC 3062
password modify extended operation, so the directory hashes it per its own
policy (olcPasswordHash) and no clear password is stored by us.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import bonsai
import trio
from bonsai import LDAPEntry, LDAPModOp, LDAPSearchScope

from mlink.config_model import LDAPConfig
from mlink.directory.base import (
    Directory,
    DirectoryError,
    DirectoryUnavailable,
    NoSuchUser,
    UserExists,
)
from mlink.sasl.secrets import HASHES, ScramSecret, derive_all

log = logging.getLogger("mlink.directory")

T = TypeVar("T")

USER_OBJECT_CLASSES = ["top", "person", "organizationalPerson", "inetOrgPerson", "mlinkUser"]
MLINK_CLASS = "mlinkUser"
PAGE_SIZE = 500
DERIVE_THREADS = max(1, min(8, os.cpu_count() or 1))


def escape_filter_value(value: str) -> str:
    """Escape an assertion value for a search filter (RFC 4515 §3).

    (bonsai.escape_filter_exp writes NUL as `\\0`, which is not valid.)
    """
    out = []
    for ch in value:
        if ch in "\\*()\0":
            out.append(f"\\{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def escape_dn_value(value: str) -> str:
    """Escape an attribute value for a DN string (RFC 4514 §2.4)."""
    out = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        if ch in '\\"+,;<=>':
            out.append("\\" + ch)
        elif ch == "\0":
            out.append("\\00")
        elif (i == 0 and ch in " #") or (i == last and ch == " "):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def _is_connection_failure(exc: BaseException) -> bool:
    """A failure of the link, not an answer from the server. libldap's own
    client-side errors have negative result codes."""
    if isinstance(exc, bonsai.ConnectionError | bonsai.TimeoutError | bonsai.ClosedConnection):
        return True
    return isinstance(exc, bonsai.LDAPError) and getattr(exc, "code", 0) < 0


class _Unreachable(Exception):
    """No configured server could be reached (raised in worker threads)."""


def _check_jid(jid: str) -> None:
    if not jid or "@" not in jid or "/" in jid:
        raise DirectoryError(f"not a bare user JID: {jid!r}")


class LDAPDirectory(Directory):
    """Users in an LDAP directory; see the module docstring."""

    def __init__(self, config: LDAPConfig) -> None:
        if not config.servers:
            raise DirectoryError("no LDAP server configured")
        self.config = config
        self.timeout = float(config.timeout)
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
        # Threads for pooled requests, user binds and PBKDF2, kept apart so
        # that slow binds cannot starve searches. An abandoned thread (its
        # request timed out) keeps its token until bonsai's own timeout
        # ends it.
        self._pool_threads = trio.CapacityLimiter(size * 2)
        self._bind_threads = trio.CapacityLimiter(size * 2)
        self._derive_threads = trio.CapacityLimiter(DERIVE_THREADS)
        self._preferred = 0  # index of the server that last answered
        self._generation = 0  # bumped when the pool is flushed
        self._lock = threading.Lock()  # guards _preferred across threads
        self._closed = False

    # --- connections ------------------------------------------------------

    def _connect_sync(self, user: str, password: str) -> bonsai.LDAPConnection:
        """Open and bind a connection, trying servers in order (thread).

        AuthenticationError and other answers from a server propagate; only
        unreachable servers move on to the next one."""
        servers = self.config.servers
        with self._lock:
            start = self._preferred
        errors = []
        for i in range(len(servers)):
            index = (start + i) % len(servers)
            client = bonsai.LDAPClient(servers[index])
            client.set_credentials("SIMPLE", user=user, password=password)
            try:
                conn = client.connect(timeout=self.timeout)
            except bonsai.LDAPError as exc:
                if not _is_connection_failure(exc):
                    raise
                errors.append(f"{servers[index]}: {exc}")
                continue
            with self._lock:
                if self._preferred != index:
                    log.warning("LDAP: now using %s", servers[index])
                self._preferred = index
            return conn
        raise _Unreachable("; ".join(errors))

    def _open_service_sync(self) -> bonsai.LDAPConnection:
        try:
            return self._connect_sync(self.config.bind_dn, self.config.bind_password)
        except bonsai.AuthenticationError as exc:
            log.error("LDAP: the service account %r cannot bind: %s", self.config.bind_dn, exc)
            raise DirectoryUnavailable(f"service bind refused: {exc}") from exc

    def _flush(self) -> None:
        idle, self._idle = self._idle, []
        self._generation += 1
        for conn in idle:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a dead link may fail
                pass

    async def _call(self, fn: Callable[[bonsai.LDAPConnection], T]) -> T:
        """Run `fn(conn)` in a worker thread on a pooled connection, under
        the configured timeout (plus one connect timeout per server)."""
        if self._closed:
            raise DirectoryUnavailable("directory closed")
        budget = self.timeout * (len(self.config.servers) + 2)
        with trio.move_on_after(budget):
            async with self._slots:
                for attempt in range(2):
                    conn = self._idle.pop() if self._idle else None
                    reused = conn is not None
                    generation = self._generation
                    try:
                        if conn is None:
                            conn = await trio.to_thread.run_sync(
                                self._open_service_sync,
                                abandon_on_cancel=True,
                                limiter=self._pool_threads,
                            )
                        result = await trio.to_thread.run_sync(
                            fn, conn, abandon_on_cancel=True, limiter=self._pool_threads
                        )
                    except _Unreachable as exc:
                        log.warning("LDAP unreachable: %s", exc)
                        raise DirectoryUnavailable(str(exc)) from exc
                    except bonsai.LDAPError as exc:
                        if not _is_connection_failure(exc):
                            self._give_back(conn, generation)
                            raise DirectoryError(f"LDAP: {exc}") from exc
                        self._flush()
                        if reused and attempt == 0:
                            log.info("LDAP connection lost (%s); reconnecting", exc)
                            continue
                        log.warning("LDAP request failed: %s", exc)
                        raise DirectoryUnavailable(str(exc)) from exc
                    except Exception:  # NoSuchUser, UserExists, ...: the link is fine
                        self._give_back(conn, generation)
                        raise
                    # On cancellation `conn` is simply dropped: an abandoned
                    # thread may still be using it.
                    self._give_back(conn, generation)
                    return result
        raise DirectoryUnavailable(f"LDAP request timed out after {budget:.1f}s")

    def _give_back(self, conn: bonsai.LDAPConnection | None, generation: int) -> None:
        if conn is None:
            return
        if self._closed or generation != self._generation:
            conn.close()
        else:
            self._idle.append(conn)

    # --- lookups ----------------------------------------------------------

    def _user_filter(self, jid: str) -> str:
        return f"(&{self.user_filter}({self.jid_attr}={escape_filter_value(jid)}))"

    def _find_sync(
        self, conn: bonsai.LDAPConnection, jid: str, attrs: list[str]
    ) -> LDAPEntry | None:
        try:
            found = conn.search(
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
        return await self._call(lambda conn: self._find_sync(conn, jid, attrs))

    async def check_password(self, jid: str, password: str) -> bool:
        if not password:
            return False  # an unauthenticated bind would "succeed"
        entry = await self._find(jid, ["1.1"])
        if entry is None:
            return False
        dn = str(entry.dn)

        def bind() -> bool:
            try:
                conn = self._connect_sync(dn, password)
            except (bonsai.AuthenticationError, bonsai.UnwillingToPerform) as exc:
                log.debug("LDAP bind as %s refused: %s", dn, exc)
                return False
            conn.close()
            return True

        with trio.move_on_after(self.timeout * (len(self.config.servers) + 1)):
            try:
                return await trio.to_thread.run_sync(
                    bind, abandon_on_cancel=True, limiter=self._bind_threads
                )
            except _Unreachable as exc:
                raise DirectoryUnavailable(str(exc)) from exc
            except bonsai.LDAPError as exc:
                if _is_connection_failure(exc):
                    raise DirectoryUnavailable(str(exc)) from exc
                log.info("LDAP bind as %s failed: %s", dn, exc)
                return False
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

        def search(conn: bonsai.LDAPConnection) -> list[str]:
            jids: list[str] = []
            # Consume the pages inside this one call (bonsai #99).
            results = conn.paged_search(
                self.users_dn, LDAPSearchScope.SUBTREE, filt, [self.jid_attr],
                timeout=self.timeout, page_size=PAGE_SIZE,
            )
            for entry in results:
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

    def _upsert_sync(
        self,
        conn: bonsai.LDAPConnection,
        jid: str,
        password: str,
        secrets: list[str],
        create: bool | None,
    ) -> None:
        """Create (create=True), update (False) or either (None) one user."""
        entry = self._find_sync(conn, jid, ["objectClass"])
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
                conn.add(new, timeout=self.timeout)
            except bonsai.AlreadyExists as exc:
                raise UserExists(jid) from exc
            try:
                conn.modify_password(dn, password, timeout=self.timeout)
            except bonsai.LDAPError:
                try:  # do not leave a user without a userPassword behind
                    conn.delete(dn, timeout=self.timeout)
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
        change.modify(timeout=self.timeout)
        conn.modify_password(dn, password, timeout=self.timeout)

    async def _secrets(self, password: str) -> list[str]:
        if not password:
            raise DirectoryError("empty password")
        secrets = await trio.to_thread.run_sync(
            derive_all, password, limiter=self._derive_threads
        )
        return [s.to_auth_password() for s in secrets]

    async def _write(self, fn: Callable[[bonsai.LDAPConnection], Any]) -> Any:
        return await self._call(fn)

    async def add_user(self, jid: str, password: str) -> None:
        _check_jid(jid)
        secrets = await self._secrets(password)
        await self._write(lambda c: self._upsert_sync(c, jid, password, secrets, True))

    async def set_password(self, jid: str, password: str) -> None:
        secrets = await self._secrets(password)
        await self._write(lambda c: self._upsert_sync(c, jid, password, secrets, False))

    async def delete_user(self, jid: str) -> None:
        def delete(conn: bonsai.LDAPConnection) -> None:
            entry = self._find_sync(conn, jid, ["1.1"])
            if entry is None:
                raise NoSuchUser(jid)
            conn.delete(str(entry.dn), timeout=self.timeout)

        await self._write(delete)

    async def import_users(self, pairs: Iterable[tuple[str, str]]) -> int:
        pairs = list(pairs)
        for jid, password in pairs:
            _check_jid(jid)
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
                    await self._write(
                        lambda c, j=jid, p=password, s=secrets: self._upsert_sync(c, j, p, s, None)
                    )

        async with trio.open_nursery() as nursery:
            for _ in range(max(1, int(self.config.pool_size))):
                nursery.start_soon(worker, receive.clone())
            receive.close()
            async with send:
                for (jid, password), secrets in zip(pairs, derived, strict=True):
                    await send.send((jid, password, secrets))
        return len(pairs)
