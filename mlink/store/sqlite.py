"""The SQLite store: one database file in the data directory, shared by every
shard process.

Why these settings
------------------
* WAL journal: readers never block the writer and vice versa, and several
  processes can use the file at once (same host, local file system only:
  WAL needs shared memory, so open refuses a file where WAL cannot be set).
* `synchronous=FULL`: in WAL mode each commit fsyncs the WAL, so a write we
  acknowledge to a client survives power loss, not just a crash of mlink.
  NORMAL only syncs at checkpoints and may lose the last commits on power
  loss. Measured cost through this class (ext4 on a virtio disk, 2 vCPUs,
  1000 writes each): `offline_put` one after another ~2,500/s with FULL
  against ~5,400/s with NORMAL; 1000 concurrent tasks ~3,000/s against
  ~5,400/s; `roster_put` ~3,200/s against ~6,000/s. NORMAL is bounded by
  the thread hand-off (reads run at ~7,000/s), FULL by the fsync, which is
  slower on disks without a volatile write cache (expect a few hundred per
  second there). We pay it: an acknowledged message must not vanish.
* `busy_timeout` (`BUSY_TIMEOUT_MS`): another process holding the write lock
  makes us wait, in a worker thread, instead of failing at once.
* Writes start with `BEGIN IMMEDIATE`, taking the write lock before reading,
  so a read-then-write (the offline limit check) cannot be interleaved with
  another process's write, and no transaction ever has to upgrade a read
  lock (an upgrade that fails with SQLITE_BUSY without waiting).
* Transactions hold one method's statements and nothing else: no lock is
  held across an `await`.

Threads
-------
Every sqlite3 call runs in a worker thread (`trio.to_thread.run_sync`), so a
slow disk or a lock held by another process never stalls the event loop.
There are two connections: one for writes and one for reads, each used by
one thread at a time (a `CapacityLimiter(1)` per connection, passed to
`run_sync`), so a long read never waits behind a write and vice versa. The
calls are not abandoned on cancellation: a write whose caller is cancelled
still finishes (and commits or rolls back) before the connection is reused.

No state lives only in this process: roster versions and offline counts are
read from the database inside the writing transaction.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import trio

from mlink.store.model import RosterItem, StoreError
from mlink.store.schema import migrate

T = TypeVar("T")

# File name of the database inside the data directory.
DEFAULT_FILENAME = "mlink.sqlite3"

# How long a statement waits for another connection's (or process's) lock
# before failing with "database is locked". Writes are short (one method's
# statements), so 10 s means something is wrong, not merely busy.
BUSY_TIMEOUT_MS = 10_000

# Durability of a commit; see the module docstring for the measured cost.
SYNCHRONOUS = "FULL"

# Upsert (ON CONFLICT DO UPDATE) arrived in SQLite 3.24.0.
MIN_SQLITE_VERSION = (3, 24, 0)

# The database holds private messages: owner-only file and directory.
# SQLite creates the -wal and -shm files with the database file's mode.
FILE_MODE = 0o600
DIR_MODE = 0o700


def _fsync_dir(path: Path) -> None:
    """Make a file creation or rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Switching a new database to WAL can fail at once with "database is
# locked" when two shards open it together: SQLite does not run the busy
# handler where waiting could deadlock. Retry, each after this pause, for
# at most the busy timeout (we are in a worker thread: sleeping is fine).
WAL_RETRY_PAUSE = 0.01


def _set_wal(conn: sqlite3.Connection) -> str:
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(WAL_RETRY_PAUSE)


def _connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (we issue BEGIN/COMMIT ourselves) with
    the WAL, durability and lock-wait settings; worker thread."""
    conn = sqlite3.connect(
        path,
        timeout=BUSY_TIMEOUT_MS / 1000,
        isolation_level=None,
        check_same_thread=False,  # used by one worker thread at a time, see limiters
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = _set_wal(conn)
        if str(mode).lower() != "wal":
            raise StoreError(
                f"{path}: cannot use WAL journal mode (got {mode!r}); the data directory "
                "must be on a local file system"
            )
        conn.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
    except BaseException:
        conn.close()
        raise
    return conn


def _open_sync(path: Path) -> tuple[sqlite3.Connection, sqlite3.Connection]:
    """Create the directory and file if needed, migrate, and return (writer,
    reader) connections; worker thread."""
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        raise StoreError(
            f"SQLite {sqlite3.sqlite_version} is too old; mlink needs "
            + ".".join(map(str, MIN_SQLITE_VERSION))
        )
    missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=DIR_MODE, exist_ok=True)  # exist_ok: another shard raced us
        _fsync_dir(directory.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        pass
    else:
        os.close(fd)
        _fsync_dir(path.parent)
    writer = _connect(path)
    try:
        migrate(writer, path)
        reader = _connect(path)
    except BaseException:
        writer.close()
        raise
    # The reader never writes; make a slip loud instead of a lock surprise.
    reader.execute("PRAGMA query_only = ON")
    return writer, reader


class _Conn:
    """One connection and the limiter that lets a single thread use it."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn: sqlite3.Connection | None = conn
        self.limiter = trio.CapacityLimiter(1)

    def live(self) -> sqlite3.Connection:
        """The connection, or StoreError if the store was closed (checked in
        the worker thread, under the limiter, so it cannot race aclose)."""
        if self.conn is None:
            raise StoreError("store is closed")
        return self.conn


def _transaction(
    conn: sqlite3.Connection, begin: str, work: Callable[[sqlite3.Connection], T]
) -> T:
    """Run `work` in one transaction and commit before returning: a result
    handed back means the change is on disk. Worker thread."""
    conn.execute(begin)
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def bump_roster_version(conn: sqlite3.Connection, user: str) -> int:
    """Increment and return the user's roster version, inside the caller's
    write transaction (so two processes can never hand out the same one)."""
    conn.execute(
        "INSERT INTO roster_version (user, version) VALUES (?, 1) "
        "ON CONFLICT (user) DO UPDATE SET version = version + 1",
        (user,),
    )
    return int(
        conn.execute("SELECT version FROM roster_version WHERE user = ?", (user,)).fetchone()[0]
    )


def _roster_item(row: tuple[Any, ...]) -> RosterItem:
    jid, name, groups, subscription, ask, approved = row
    return RosterItem(
        jid=jid,
        name=name,
        groups=tuple(json.loads(groups)),
        subscription=subscription,
        ask=bool(ask),
        approved=bool(approved),
    )


class Store:
    """Durable RFC 6121 data of local users: rosters, pending inbound
    subscription requests, offline messages, blocking lists, private XML,
    last activity and local profile fields. `user` and `contact` arguments
    are bare JIDs already normalised by the caller; stanzas and XML are
    serialised bytes, stored as given.

    Every write method returns only after its transaction has committed.
    Errors from SQLite surface as StoreError.
    """

    def __init__(self, path: Path, writer: sqlite3.Connection, reader: sqlite3.Connection) -> None:
        """Use `Store.open`; this only wraps already-prepared connections."""
        self.path = path
        self._writer = _Conn(writer)
        self._reader = _Conn(reader)

    @classmethod
    async def open(cls, path: Path) -> Store:
        """Open (creating the directory, file and schema as needed) the
        database at `path`. SchemaTooNewError if a newer mlink wrote it."""
        path = Path(path)
        try:
            writer, reader = await trio.to_thread.run_sync(_open_sync, path)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {path}: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"cannot create {path}: {exc}") from exc
        return cls(path, writer, reader)

    async def aclose(self) -> None:
        """Close both connections once in-flight calls on them are done;
        later calls raise StoreError. Idempotent."""
        for side in (self._reader, self._writer):
            async with side.limiter:
                conn, side.conn = side.conn, None
                if conn is not None:
                    await trio.to_thread.run_sync(conn.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- plumbing ------------------------------------------------------------

    async def _run(
        self, side: _Conn, begin: str | None, work: Callable[[sqlite3.Connection], T]
    ) -> T:
        """Run `work` on `side`'s connection in a worker thread, inside a
        transaction opened with `begin` (None: a single autocommit
        statement)."""

        def call() -> T:
            conn = side.live()
            try:
                if begin is None:
                    return work(conn)
                return _transaction(conn, begin, work)
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc

        return await trio.to_thread.run_sync(call, limiter=side.limiter)

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """A write transaction holding the database write lock from its
        first statement; committed before this returns."""
        return await self._run(self._writer, "BEGIN IMMEDIATE", work)

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Reads that must see one snapshot (several statements)."""
        return await self._run(self._reader, "BEGIN", work)

    async def _read1(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """A single-statement read (its own implicit snapshot)."""
        return await self._run(self._reader, None, work)

    # Module stores (mlink.store.module_store) run their own statements
    # through the same connections, threads and error mapping.
    write = _write
    read = _read

    # --- rosters (RFC 6121 §2) -------------------------------------------------

    async def roster(self, user: str) -> tuple[int, dict[str, RosterItem]]:
        """(version, items by JID); version 0 for a user who never had a
        roster change. Version and items come from one snapshot."""

        def work(conn: sqlite3.Connection) -> tuple[int, dict[str, RosterItem]]:
            row = conn.execute(
                "SELECT version FROM roster_version WHERE user = ?", (user,)
            ).fetchone()
            items = conn.execute(
                "SELECT jid, name, group_names, subscription, ask, approved "
                "FROM roster_item WHERE user = ?",
                (user,),
            ).fetchall()
            return (int(row[0]) if row else 0), {r[0]: _roster_item(r) for r in items}

        return await self._read(work)

    async def roster_put(self, user: str, item: RosterItem) -> int:
        """Insert or replace `item`; return the new roster version."""
        params = (
            user,
            item.jid,
            item.name,
            json.dumps(list(item.groups), ensure_ascii=False),
            item.subscription,
            int(item.ask),
            int(item.approved),
        )

        def work(conn: sqlite3.Connection) -> int:
            conn.execute(
                "INSERT OR REPLACE INTO roster_item "
                "(user, jid, name, group_names, subscription, ask, approved) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                params,
            )
            return bump_roster_version(conn, user)

        return await self._write(work)

    async def roster_delete(self, user: str, contact: str) -> int | None:
        """Remove `contact` from the roster; None (and no version change) if
        there was no such item, else the new roster version."""

        def work(conn: sqlite3.Connection) -> int | None:
            cur = conn.execute(
                "DELETE FROM roster_item WHERE user = ? AND jid = ?", (user, contact)
            )
            return bump_roster_version(conn, user) if cur.rowcount else None

        return await self._write(work)

    # --- pending inbound subscription requests (RFC 6121 §3.1.3) ---------------

    async def subscription_request_put(self, user: str, contact: str, stanza: bytes) -> None:
        """Keep `contact`'s subscribe request for `user`, replacing an earlier
        one from the same contact. The replacement counts as a new arrival
        (it moves to the end of the order), since it is the newer stanza."""
        data = bytes(stanza)

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO subscription_request (user, contact, stanza) "
                "VALUES (?, ?, ?)",
                (user, contact, data),
            )

        await self._write(work)

    async def subscription_request_delete(self, user: str, contact: str) -> bool:
        """Drop a pending request; False if there was none."""

        def work(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "DELETE FROM subscription_request WHERE user = ? AND contact = ?",
                (user, contact),
            )
            return cur.rowcount > 0

        return await self._write(work)

    async def subscription_requests(self, user: str) -> list[tuple[str, bytes]]:
        """(contact, stanza) pairs, in arrival order."""

        def work(conn: sqlite3.Connection) -> list[tuple[str, bytes]]:
            rows = conn.execute(
                "SELECT contact, stanza FROM subscription_request WHERE user = ? ORDER BY id",
                (user,),
            ).fetchall()
            return [(contact, bytes(stanza)) for contact, stanza in rows]

        return await self._read1(work)

    # --- offline messages (XEP-0160) ---------------------------------------------

    async def offline_put(self, user: str, stanza: bytes, limit: int) -> bool:
        """Store a message for later delivery unless `user` already has
        `limit` of them: False then, and nothing is stored. The count and
        the insert are one statement inside a write transaction, so
        concurrent callers (in any process) cannot overshoot the limit."""
        data = bytes(stanza)

        def work(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO offline_message (user, stanza) SELECT ?, ? "
                "WHERE (SELECT count(*) FROM offline_message WHERE user = ?) < ?",
                (user, data, user, limit),
            )
            return cur.rowcount == 1

        return await self._write(work)

    async def offline_fetch(self, user: str, limit: int | None = None,
                            max_bytes: int | None = None) -> list[tuple[int, bytes]]:
        """(id, stanza) pairs, oldest first: at most `limit` of them and,
        past the first, at most `max_bytes` in all. Nothing is removed: the
        caller deletes the ids it actually delivered, so a crash
        mid-delivery loses nothing."""

        def work(conn: sqlite3.Connection) -> list[tuple[int, bytes]]:
            rows = conn.execute(
                "SELECT id, stanza FROM offline_message WHERE user = ? ORDER BY id LIMIT ?",
                (user, -1 if limit is None else limit))
            out: list[tuple[int, bytes]] = []
            size = 0
            for row_id, stanza in rows:
                size += len(stanza)
                if out and max_bytes is not None and size > max_bytes:
                    break
                out.append((int(row_id), bytes(stanza)))
            return out

        return await self._read1(work)

    async def offline_delete(self, user: str, ids: list[int]) -> None:
        """Delete the given messages of `user` (ids of other users' messages
        are ignored). One statement per id keeps clear of SQLite's bound
        parameter limit however many ids are given."""
        params = [(user, int(i)) for i in ids]
        if not params:
            return

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM offline_message WHERE user = ? AND id = ?", params)

        await self._write(work)

    async def offline_count(self, user: str) -> int:
        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT count(*) FROM offline_message WHERE user = ?", (user,)
            ).fetchone()
            return int(row[0])

        return await self._read1(work)

    # --- blocking (XEP-0191) -------------------------------------------------------

    async def blocklist(self, user: str) -> set[str]:
        def work(conn: sqlite3.Connection) -> set[str]:
            rows = conn.execute("SELECT jid FROM block WHERE user = ?", (user,)).fetchall()
            return {jid for (jid,) in rows}

        return await self._read1(work)

    async def blocking_users(self) -> set[str]:
        """Every user with at least one blocklist entry: few users block
        anyone, and this set lets every other user's stanzas skip the
        blocklist read (the primary key's first column makes it an index
        scan)."""
        def work(conn: sqlite3.Connection) -> set[str]:
            return {user for (user,) in conn.execute("SELECT DISTINCT user FROM block")}

        return await self._read1(work)

    async def block(self, user: str, jids: Iterable[str]) -> None:
        """Add JIDs to the blocklist; already-blocked ones are left alone."""
        params = [(user, jid) for jid in jids]
        if not params:
            return

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT OR IGNORE INTO block (user, jid) VALUES (?, ?)", params)

        await self._write(work)

    async def unblock(self, user: str, jids: Iterable[str] | None) -> None:
        """Remove JIDs from the blocklist; None empties it (XEP-0191 §3.4)."""
        params = None if jids is None else [(user, jid) for jid in jids]
        if params == []:
            return

        def work(conn: sqlite3.Connection) -> None:
            if params is None:
                conn.execute("DELETE FROM block WHERE user = ?", (user,))
            else:
                conn.executemany("DELETE FROM block WHERE user = ? AND jid = ?", params)

        await self._write(work)

    # --- private XML storage (XEP-0049) --------------------------------------------

    # --- last activity (XEP-0012) ----------------------------------------------------

    async def last_activity_put(self, user: str, when: float, status: str) -> None:
        """Record when the user's last session ended (Unix time) and the
        status text of its last presence."""

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO last_activity (user, at, status) VALUES (?, ?, ?)",
                (user, float(when), status),
            )

        await self._write(work)

    async def last_activity(self, user: str) -> tuple[float, str] | None:
        def work(conn: sqlite3.Connection) -> tuple[float, str] | None:
            row = conn.execute(
                "SELECT at, status FROM last_activity WHERE user = ?", (user,)
            ).fetchone()
            return None if row is None else (float(row[0]), str(row[1]))

        return await self._read1(work)

    # --- local profile fields (mlink.profile) -------------------------------------

    async def profile_local(self, user: str) -> dict[str, bytes]:
        """The user's `local`-policy profile fields: field name → value."""

        def work(conn: sqlite3.Connection) -> dict[str, bytes]:
            rows = conn.execute(
                "SELECT field, value FROM profile_field WHERE user = ?", (user,)
            ).fetchall()
            return {name: bytes(value) for name, value in rows}

        return await self._read1(work)

    async def profile_local_put(self, user: str, fields: dict[str, bytes | None]) -> None:
        """Set (or, for None, delete) several fields in one transaction, so a
        profile update is stored whole or not at all."""
        puts = [(user, name, bytes(v)) for name, v in fields.items() if v is not None]
        deletes = [(user, name) for name, v in fields.items() if v is None]
        if not puts and not deletes:
            return

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR REPLACE INTO profile_field (user, field, value) VALUES (?, ?, ?)",
                puts,
            )
            conn.executemany("DELETE FROM profile_field WHERE user = ? AND field = ?", deletes)

        await self._write(work)

    # --- account removal -------------------------------------------------------------

    async def delete_user_data(self, user: str) -> None:
        """Remove everything stored for `user`, in one transaction.

        The roster version counter is bumped, not deleted: if the account is
        re-created, its versions carry on from there, so a client that cached
        the old account's roster at version N can never be told "unchanged"
        for a different roster that happens to reach N again. Data other
        users hold about `user` (their roster items, requests from `user`)
        is theirs; the caller unsubscribes them (RFC 6121 §2.5 style)."""

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM roster_item WHERE user = ?", (user,))
            # Every roster item implies a version row; no row, nothing to bump.
            known = conn.execute("SELECT 1 FROM roster_version WHERE user = ?", (user,)).fetchone()
            if known:
                bump_roster_version(conn, user)
            for table in (
                "subscription_request",
                "offline_message",
                "block",
                "last_activity",
                "profile_field",
                "module_kv",
                "module_archive",
            ):
                conn.execute(f"DELETE FROM {table} WHERE user = ?", (user,))

        await self._write(work)
