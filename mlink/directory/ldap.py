"""The LDAP port (bonsai): a pool of connections, timeouts, failover, and a
change feed that polls `modifyTimestamp`.

`LDAPPort` speaks the operations of `mlink.directory.port`; `LDAPDirectory`
is the directory (accounts, groups, profiles: `mlink.directory.core`) on it.

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
server ends as `DirectoryUnavailable`. A paged search is consumed to its
last page inside one pooled call (bonsai #99: materialising the iterator
elsewhere kills the connection).

Binds (`bind`) use a short-lived connection of their own, so the
directory's password policy (lockout, expiry) applies to the user.

The change feed: bonsai offers neither persistent search nor syncrepl, so
`changes` polls with `(modifyTimestamp>=T)` under the base (see its
docstring for how nothing is missed or repeated). Deletions are invisible to
such a poll; they show through the consumers' periodic full reads.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import TypeVar

import bonsai
import trio
from bonsai import LDAPEntry, LDAPModOp, LDAPSearchScope
from bonsai.trio import TrioLDAPConnection

from mlink.config_model import LDAPConfig
from mlink.directory.base import (
    DirectoryError,
    DirectoryRefused,
    DirectoryUnavailable,
)
from mlink.directory.core import Layout, PortDirectory
from mlink.directory.ldif import Entry, Value
from mlink.directory.names import escape_filter_value, normalize_dn
from mlink.directory.policy import Verdict, expiry_notice
from mlink.directory.port import (
    DEFAULT_CHANGES_SECONDS,
    MIN_CHANGES_SECONDS,
    Add,
    Change,
    Delete,
    DirectoryPort,
    EntryExists,
    Modify,
    NoSuchEntry,
    Operation,
    PasswordModify,
    Scope,
    SizeLimitExceeded,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Entries per page of a paged search (RFC 2696). Below slapd's default
# size limit (500), so paging, not the limit, decides; a 5,000-user
# directory is ten round trips.
PAGE_SIZE = 500
# The change feed asks again for changes stamped up to this long before the
# newest one it saw: a write committed a little after a later-stamped one
# (two masters, a slow transaction) is still found; changes seen twice are
# recognised by their entryCSN and reported once.
FEED_OVERLAP_SECONDS = 5
# At start the feed assumes the server's clock may be this far from ours;
# what changed in that window before it started is read once as the
# baseline and not reported.
FEED_CLOCK_SKEW_SECONDS = 60
# Operational attributes the feed reads beside the user attributes.
FEED_ATTRIBUTES = ("*", "modifyTimestamp", "createTimestamp", "entryCSN")

_SCOPES = {
    Scope.BASE: LDAPSearchScope.BASE,
    Scope.ONELEVEL: LDAPSearchScope.ONELEVEL,
    Scope.SUBTREE: LDAPSearchScope.SUBTREE,
}
_OPS = {"add": LDAPModOp.ADD, "delete": LDAPModOp.DELETE, "replace": LDAPModOp.REPLACE}


def _is_connection_failure(exc: BaseException) -> bool:
    """A failure of the link, not an answer from the server. libldap's own
    client-side errors have negative result codes."""
    if isinstance(exc, bonsai.ConnectionError | bonsai.TimeoutError | bonsai.ClosedConnection):
        return True
    return isinstance(exc, bonsai.LDAPError) and getattr(exc, "code", 0) < 0


def _to_entry(entry: LDAPEntry) -> Entry:
    """bonsai's entry as the port's (str values when UTF-8, else bytes)."""
    return Entry(str(entry.dn), {name: list(values) for name, values in entry.items()
                                 if name.lower() != "dn"})


def _generalized_time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y%m%d%H%M%SZ")


def _parse_generalized_time(value: Value | None) -> datetime.datetime | None:
    if value is None:
        return None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    if isinstance(value, datetime.datetime):
        return value
    try:
        return datetime.datetime.strptime(text[:14], "%Y%m%d%H%M%S").replace(tzinfo=datetime.UTC)
    except ValueError:
        return None


class LDAPPort(DirectoryPort):
    """The port on an LDAP server; see the module docstring."""

    def __init__(self, config: LDAPConfig) -> None:
        if not config.servers:
            raise DirectoryError("no LDAP server configured")
        self.config = config
        self.base_dn = config.base_dn
        self.timeout = float(config.timeout)
        # Bounds libldap's blocking TCP connect (see the module docstring).
        os.environ.setdefault("LDAPNETWORK_TIMEOUT", str(max(1, math.ceil(self.timeout))))
        size = max(1, int(config.pool_size))
        self.pool_size = size
        self._idle: list[bonsai.LDAPConnection] = []
        self._slots = trio.Semaphore(size)
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

    async def _connect(self, user: str, password: str,
                       policy: list[dict[str, int]] | None = None) -> TrioLDAPConnection:
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
            if policy is not None:
                # Ask for the password-policy response control (expiry
                # warnings, grace logins; failures as AccountLocked, ...).
                client.set_password_policy(True)
            try:
                with trio.fail_after(self.timeout):
                    await self._probe(url)
                    conn = await client.connect(is_async=True, timeout=self.timeout)
                    if policy is not None and isinstance(conn, tuple):
                        conn, control = conn
                        policy.append(dict(control or {}))
            except trio.TooSlowError:
                errors.append(f"{url}: no answer within {self.timeout}s")
                continue
            except OSError as exc:
                errors.append(f"{url}: {exc}")
                continue
            except bonsai.PasswordPolicyError:
                raise  # the server answered: locked, expired (its codes look like I/O errors)
            except bonsai.LDAPError as exc:
                if not _is_connection_failure(exc):
                    raise
                errors.append(f"{url}: {exc}")
                continue
            if self._preferred != index:
                log.warning("LDAP: now using %s", url)
                self._preferred = index
            return conn  # type: ignore[no-any-return]
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


    # --- the port ----------------------------------------------------------

    async def readable_by(self, dn: str, password: str, base: str,
                          attributes: Sequence[str]) -> list[str]:
        """DNs under `base` whose `attributes` someone bound as `dn` ("" for
        anonymous) can read: `mlink check` uses it to prove that secrets
        are readable only by the service account. More matches than the
        probe looks at (the size limit exceeded) is `[base]`: readable too,
        not none."""
        with trio.fail_after(self.timeout * 2):
            conn = await self._connect(dn, password)
        try:
            filt = "(|" + "".join(f"({a}=*)" for a in attributes) + ")"
            with trio.fail_after(self.timeout * 2):
                found = await conn.search(base, bonsai.LDAPSearchScope.SUBTREE, filt,
                                          list(attributes), sizelimit=READABLE_PROBE_ENTRIES)
        except bonsai.SizeLimitError:
            return [base]
        except bonsai.NoSuchObjectError:
            found = []
        finally:
            _close(conn)
        return [str(e.dn) for e in found
                if any(e.get(a) for a in attributes)]

    async def bind_outcome(self, dn: str, password: str) -> tuple[bool, Verdict]:
        """A bind with the password-policy control: whether it succeeded,
        and the directory's reason when it did not (locked, expired, must
        change) or its warning when it did (expiry soon, grace logins)."""
        if not password:
            return False, Verdict()
        with trio.move_on_after(self.timeout * (len(self.config.servers) + 1)):
            controls: list[dict[str, int]] = []
            try:
                conn = await self._connect(dn, password, controls)
            except bonsai.AccountLocked:
                return False, Verdict("account-disabled", "this account is locked")
            except bonsai.PasswordExpired:
                return False, Verdict("credentials-expired", "the password has expired: change it")
            except bonsai.ChangeAfterReset:
                return False, Verdict("credentials-expired",
                                      "the password was reset: change it before logging in")
            except (bonsai.AuthenticationError, bonsai.UnwillingToPerform) as exc:
                log.debug("LDAP bind as %s refused: %s", dn, exc)
                return False, Verdict()
            except bonsai.LDAPError as exc:
                log.info("LDAP bind as %s failed: %s", dn, exc)
                return False, Verdict()
            _close(conn)
            control = controls[0] if controls else {}
            expire, grace = int(control.get("expire", -1)), int(control.get("grace", -1))
            if expire > 0:
                return True, Verdict(notice=expiry_notice(expire))
            if grace >= 0:
                return True, Verdict(notice=f"Your password has expired; {grace} login(s) "
                                            "left before the account is locked: change it.")
            return True, Verdict()
        raise DirectoryUnavailable("LDAP bind timed out")

    async def bind(self, dn: str, password: str) -> bool:
        if not password:
            return False  # an unauthenticated bind would "succeed"
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
        attrs = list(attributes) or None

        async def run(conn: TrioLDAPConnection) -> list[Entry]:
            try:
                if paged:
                    # Consume every page inside this one call (bonsai #99).
                    results = await conn.paged_search(
                        base, _SCOPES[scope], filter, attrs, timeout=self.timeout,
                        sizelimit=size_limit, page_size=PAGE_SIZE,
                    )
                    entries = [_to_entry(e) async for e in results]
                else:
                    found = await conn.search(base, _SCOPES[scope], filter, attrs,
                                              timeout=self.timeout, sizelimit=size_limit)
                    entries = [_to_entry(e) for e in found]
                if not entries and not await conn.search(
                        base, LDAPSearchScope.BASE, "(objectClass=*)", ["1.1"],
                        timeout=self.timeout):
                    # bonsai answers noSuchObject with no entries; tell the
                    # caller, as the port promises (one more round trip,
                    # for empty results only).
                    raise NoSuchEntry(base)
                return entries
            except bonsai.SizeLimitError as exc:
                raise SizeLimitExceeded(f"more than {size_limit} entries under {base}") from exc
            except (bonsai.NoSuchObjectError, bonsai.InvalidDN) as exc:
                raise NoSuchEntry(base) from exc

        return await self._call(run, self.timeout * timeout_factor)

    async def compare(self, dn: str, attribute: str, value: Value) -> bool:
        """A base search with an equality filter: bonsai has no compare
        operation, and the answer (the attribute's equality rule) is the
        same where the service account may read the attribute."""
        text = value.decode("utf-8") if isinstance(value, bytes) else value
        found = await self.search(dn, Scope.BASE, f"({attribute}={escape_filter_value(text)})",
                                  ["1.1"])
        return bool(found)

    async def write(self, operations: Sequence[Operation]) -> None:
        """Operations on one DN in order on one connection; different DNs
        on up to `pool_size` connections at once (bulk imports)."""
        chains: dict[str, list[Operation]] = {}
        for op in operations:
            dn = op.entry.dn if isinstance(op, Add) else op.dn
            chains.setdefault(normalize_dn(dn), []).append(op)
        # A chain (add, set the password, store the secrets) is bounded by
        # one timeout per operation, not one for all: a password modify is a
        # slow hash on the server (Argon2), and a busy server serves a bulk
        # import's chains side by side.
        if len(chains) == 1:
            (chain,) = chains.values()
            await self._call(lambda conn: self._apply(conn, chain),
                             self.timeout * len(chain))
            return
        send, receive = trio.open_memory_channel[list[Operation]](0)

        async def worker(receive: trio.MemoryReceiveChannel[list[Operation]]) -> None:
            async with receive:
                async for chain in receive:
                    await self._call(partial(self._apply, chain=chain),
                                     self.timeout * len(chain))

        async with trio.open_nursery() as nursery:
            for _ in range(min(self.pool_size, len(chains))):
                nursery.start_soon(worker, receive.clone())
            receive.close()
            async with send:
                for chain in chains.values():
                    await send.send(chain)

    async def _apply(self, conn: TrioLDAPConnection, chain: list[Operation]) -> None:
        for op in chain:
            try:
                await self._apply_one(conn, op)
            except bonsai.LDAPError as exc:
                if _is_connection_failure(exc):
                    raise
                if isinstance(exc, bonsai.AlreadyExists):
                    raise EntryExists(op.entry.dn if isinstance(op, Add) else "") from exc
                if isinstance(exc, bonsai.NoSuchObjectError):
                    raise NoSuchEntry(getattr(op, "dn", "")) from exc
                log.info("LDAP refused %s: %s", type(op).__name__, exc)
                raise DirectoryRefused(_ldap_message(exc)) from exc

    async def _apply_one(self, conn: TrioLDAPConnection, op: Operation) -> None:
        if isinstance(op, Add):
            new = LDAPEntry(op.entry.dn)
            for name, values in op.entry.attrs.items():
                new[name] = list(values)
            await conn.add(new, timeout=self.timeout)
        elif isinstance(op, Modify):
            change = LDAPEntry(op.dn, conn)
            for mod in op.changes:
                values = [v if isinstance(v, bytes) else v.encode("utf-8") for v in mod.values]
                try:
                    change.change_attribute(mod.attribute, _OPS[mod.op],
                                            *values)  # type: ignore[arg-type]
                except ValueError as exc:
                    # bonsai refuses values equal but for case, client side.
                    raise DirectoryRefused(f"{mod.attribute}: {exc}") from exc
            await change.modify(timeout=self.timeout)
        elif isinstance(op, Delete):
            await conn.delete(op.dn, timeout=self.timeout)  # type: ignore[no-untyped-call]
        elif isinstance(op, PasswordModify):
            await conn.modify_password(op.dn, op.password, timeout=self.timeout)

    async def ping(self) -> None:
        await self._call(lambda conn: conn.whoami(timeout=self.timeout))

    async def aclose(self) -> None:
        self._closed = True
        self._flush()

    # --- the change feed ------------------------------------------------------

    async def changes(self, base: str, interval: float = DEFAULT_CHANGES_SECONDS
                      ) -> AsyncIterator[list[Change]]:
        """Poll `(modifyTimestamp>=T)` under `base` every `interval`.

        T trails the newest modifyTimestamp seen by FEED_OVERLAP_SECONDS, so
        every poll also returns the changes of the last few seconds again;
        each is remembered by (DN, entryCSN) (or its modifyTimestamp where
        the server keeps no entryCSN) until it falls out of the window, and
        reported once. The timestamps have one-second resolution, which is
        why T cannot simply be the newest one seen plus one second. At start
        T is our clock minus FEED_CLOCK_SKEW_SECONDS and what that first
        poll finds is the baseline, not a change. A failed poll (server
        down) keeps T, so what changed during the outage comes with the
        first poll that succeeds."""
        interval = max(MIN_CHANGES_SECONDS, interval)
        now = datetime.datetime.now(datetime.UTC)
        newest = now - datetime.timedelta(seconds=FEED_CLOCK_SKEW_SECONDS)
        seen: dict[tuple[str, str], datetime.datetime] = {}  # (DN key, CSN) -> stamp
        known: dict[str, datetime.datetime] = {}  # DN key -> stamp, same window
        baseline = True
        down = False
        while True:
            since = newest - datetime.timedelta(seconds=FEED_OVERLAP_SECONDS)
            try:
                found = await self.search(
                    base, Scope.SUBTREE, f"(modifyTimestamp>={_generalized_time(since)})",
                    FEED_ATTRIBUTES, paged=True,
                )
            except DirectoryError as exc:
                if not down:
                    log.warning("directory change feed: poll failed (%s); retrying every "
                                "%.1f s", exc, interval)
                down = True
                await trio.sleep(interval)
                continue
            if down:
                log.info("directory change feed: the directory answers again")
                down = False
            batch: list[Change] = []
            for entry in found:
                stamp = _parse_generalized_time(entry.first("modifyTimestamp"))
                if stamp is None:
                    continue
                csn = entry.first("entryCSN") or entry.first("modifyTimestamp")
                key = normalize_dn(entry.dn)
                ident = (key, str(csn))
                if ident in seen:
                    continue
                # Created and not changed since (timestamps have seconds
                # only, so an entry seen before is a modify in any case).
                created = (entry.first("createTimestamp") == entry.first("modifyTimestamp")
                           and key not in known)
                seen[ident] = stamp
                known[key] = stamp
                newest = max(newest, stamp)
                if not baseline:
                    batch.append(Change("add" if created else "modify", entry.dn,
                                        _user_attributes(entry), key=key))
            horizon = newest - datetime.timedelta(seconds=2 * FEED_OVERLAP_SECONDS)
            for ident in [i for i, stamp in seen.items() if stamp < horizon]:
                del seen[ident]
            for key in [k for k, stamp in known.items() if stamp < horizon]:
                del known[key]
            if baseline:
                baseline = False
                yield []  # the baseline is taken: changes from here on are reported
            elif batch:
                yield batch
            await trio.sleep(interval)


def _user_attributes(entry: Entry) -> Entry:
    """The entry without the operational attributes the feed asked for."""
    skip = {"modifytimestamp", "createtimestamp", "entrycsn"}
    return Entry(entry.dn, {k: v for k, v in entry.attrs.items() if k.lower() not in skip})


class LDAPDirectory(PortDirectory):
    """Users in an LDAP directory: the shared directory code on `LDAPPort`."""

    def __init__(self, config: LDAPConfig, changes_seconds: float = DEFAULT_CHANGES_SECONDS
                 ) -> None:
        port = LDAPPort(config)
        user_filter = config.user_filter.strip() or "(objectClass=*)"
        if not user_filter.startswith("("):
            user_filter = f"({user_filter})"
        layout = Layout(
            base_dn=config.base_dn,
            users_dn=config.users_dn or f"ou=People,{config.base_dn}",
            user_filter=user_filter,
            jid_attribute=config.jid_attribute,
            scram_attribute=config.scram_attribute,
            password_policy_dn=config.password_policy,
            disabled_filter=config.disabled_filter,
        )
        super().__init__(port, layout, changes_seconds)
        self.config = config


# Entries `readable_by` looks at: one readable secret is one too many.
READABLE_PROBE_ENTRIES = 5


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
