"""Stores of one module: namespaced key-value, map and archive stores.

Why: a new feature must not add methods to the central `Store`. A module
asks its context for `module.store.map("name")` (per user: key -> bytes),
`module.store.keyval("name")` (per user: one value) or
`module.store.archive("name")` (per user: an append-only, paged log, the
shape XEP-0313 archives and audit logs need), all in the shared SQLite file,
namespaced by module and store name. A module that needs tables of its own
declares migrations with `schema(steps)`; the server applies them when it
opens the store, versioned per module in `module_schema`, each step in one
transaction like the core's own migrations.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from mlink.store.sqlite import Store

# Rows one archive query may return: a page, not a dump (XEP-0059 paging
# asks for pages; 500 bounds memory and the time one query holds a thread).
MAX_ARCHIVE_PAGE = 500


@dataclass(frozen=True, slots=True)
class ArchivedItem:
    id: int
    at: float
    with_jid: str
    value: bytes


class ModuleStore:
    """The stores of module `module` (see the module docstring)."""

    def __init__(self, store: Callable[[], Store], module: str) -> None:
        self._store = store
        self.module = module
        self.migrations: tuple[tuple[str, ...], ...] = ()

    def map(self, name: str) -> MapStore:
        return MapStore(self._store, self.module, name)

    def keyval(self, name: str) -> KeyValueStore:
        return KeyValueStore(MapStore(self._store, self.module, name))

    def archive(self, name: str) -> ArchiveStore:
        return ArchiveStore(self._store, self.module, name)

    def schema(self, steps: Sequence[Sequence[str]]) -> None:
        """This module's own tables: step n takes its schema from version n
        to n+1. Append steps in new releases; never edit a shipped one."""
        self.migrations = tuple(tuple(step) for step in steps)

    async def migrate(self) -> int:
        """Apply pending steps (the server calls this once the store is
        open); returns the version found before."""
        steps, module = self.migrations, self.module

        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT version FROM module_schema WHERE module = ?",
                               (module,)).fetchone()
            found = 0 if row is None else int(row[0])
            if found > len(steps):
                raise sqlite3.DatabaseError(
                    f"module {module} has schema version {found}; this mlink knows {len(steps)}")
            for step in steps[found:]:
                for statement in step:
                    conn.execute(statement)
            if found < len(steps):
                conn.execute("INSERT OR REPLACE INTO module_schema (module, version) "
                             "VALUES (?, ?)", (module, len(steps)))
            return found

        return await self._store().write(work)


class MapStore:
    """Per user: key -> bytes."""

    def __init__(self, store: Callable[[], Store], module: str, name: str) -> None:
        self._store = store
        self._ns = (module, name)

    async def get(self, user: str, key: str) -> bytes | None:
        ns = self._ns

        def work(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT value FROM module_kv WHERE module = ? AND store = ? AND user = ? "
                "AND item_key = ?", (*ns, user, key)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._store().read(work)

    async def items(self, user: str) -> dict[str, bytes]:
        ns = self._ns

        def work(conn: sqlite3.Connection) -> dict[str, bytes]:
            rows = conn.execute(
                "SELECT item_key, value FROM module_kv WHERE module = ? AND store = ? "
                "AND user = ?", (*ns, user))
            return {key: bytes(value) for key, value in rows}

        return await self._store().read(work)

    async def users(self) -> set[str]:
        """Every user with an item in this store (one index scan): lets a
        module tell at once that a user has nothing stored, without a read."""
        ns = self._ns

        def work(conn: sqlite3.Connection) -> set[str]:
            rows = conn.execute("SELECT DISTINCT user FROM module_kv WHERE module = ? AND "
                                "store = ?", ns)
            return {user for (user,) in rows}

        return await self._store().read(work)

    async def set(self, user: str, key: str, value: bytes | None) -> None:
        """Store `value` under `key` (None deletes it); durable on return."""
        ns = self._ns
        data = None if value is None else bytes(value)

        def work(conn: sqlite3.Connection) -> None:
            if data is None:
                conn.execute("DELETE FROM module_kv WHERE module = ? AND store = ? AND user = ? "
                             "AND item_key = ?", (*ns, user, key))
            else:
                conn.execute("INSERT OR REPLACE INTO module_kv (module, store, user, item_key, "
                             "value) VALUES (?, ?, ?, ?, ?)", (*ns, user, key, data))

        await self._store().write(work)

    async def set_within(self, user: str, items: dict[str, bytes], max_bytes: int) -> bool:
        """Store every item of `items` in one transaction, unless the user's
        keys and values would then take more than `max_bytes` (0: no
        limit): False, and nothing written. Checked and written under the
        store's write lock, so two sets at once (two resources, two shards)
        cannot both squeeze past the quota."""
        ns = self._ns
        rows = [(key, bytes(value)) for key, value in items.items()]
        added = sum(len(key.encode()) + len(value) for key, value in rows)

        def work(conn: sqlite3.Connection) -> bool:
            if max_bytes:
                marks = ", ".join("?" for _ in rows)
                (kept,) = conn.execute(
                    "SELECT COALESCE(SUM(LENGTH(CAST(item_key AS BLOB)) + LENGTH(value)), 0) "
                    "FROM module_kv WHERE module = ? AND store = ? AND user = ? "
                    f"AND item_key NOT IN ({marks})",
                    (*ns, user, *(key for key, _ in rows))).fetchone()
                if int(kept) + added > max_bytes:
                    return False
            conn.executemany(
                "INSERT OR REPLACE INTO module_kv (module, store, user, item_key, value) "
                "VALUES (?, ?, ?, ?, ?)", [(*ns, user, key, value) for key, value in rows])
            return True

        return await self._store().write(work)

    async def clear(self, user: str) -> None:
        ns = self._ns

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM module_kv WHERE module = ? AND store = ? AND user = ?",
                         (*ns, user))

        await self._store().write(work)


class KeyValueStore:
    """Per user: one value."""

    def __init__(self, backing: MapStore) -> None:
        self._map = backing

    async def get(self, user: str) -> bytes | None:
        return await self._map.get(user, "")

    async def users(self) -> set[str]:
        return await self._map.users()

    async def set(self, user: str, value: bytes | None) -> None:
        await self._map.set(user, "", value)


@dataclass(slots=True)
class _Append:
    """One item waiting for the next group commit (`ArchiveStore.append`)."""

    user: str
    at: float
    with_jid: str
    value: bytes
    id: int | None = None


class ArchiveIds:
    """Archive ids made without the store: unique across shards (the shard
    is in the low 6 bits), increasing on each shard, and in time order
    across shards to the microsecond: microseconds since 1970 << 6 | shard
    (about 2^57 today). More than one id per microsecond on a shard borrows
    the next microseconds. Ids the store assigns itself (`append`) are
    always above every id used before, so both kinds mix in one log."""

    SHARD_BITS = 6  # up to 64 shards

    def __init__(self, shard: int) -> None:
        if not 0 <= shard < 1 << self.SHARD_BITS:
            raise ValueError(f"shard {shard} does not fit in {self.SHARD_BITS} bits")
        self.shard = shard
        self._last = 0

    def next(self, now: float | None = None) -> int:
        clock = int((time.time() if now is None else now) * 1_000_000)
        counter = max(self._last + 1, clock)
        self._last = counter
        return counter << self.SHARD_BITS | self.shard

    def above(self, existing: int) -> None:
        """Make every later id larger than `existing` (the largest id in
        the store at start): a clock stepped back across a restart then
        cannot make an id that is taken already."""
        self._last = max(self._last, existing >> self.SHARD_BITS)


class ArchiveStore:
    """Per user: an append-only log, read in pages by id.

    Appends are group-committed: every append made while a write is in
    progress goes into the next transaction, so N concurrent appends cost
    one durable commit (one fsync), not N. An archive that logs every chat
    message before delivering it (XEP-0313) would otherwise be limited by
    the disk's fsync rate, about 2,500 a second here, for all users
    together. Each caller still returns only once its item is committed."""

    def __init__(self, store: Callable[[], Store], module: str, name: str) -> None:
        self._store = store
        self._ns = (module, name)
        self._pending: list[_Append] = []
        # Held by the one task writing a batch; FIFO, so waiting appenders
        # take turns leading the next batch.
        self._writing = trio.Lock()

    async def append(self, user: str, value: bytes, with_jid: str = "",
                     at: float | None = None) -> int:
        """Add an item; returns its id (increasing: arrival order), once
        committed."""
        entry = _Append(user, time.time() if at is None else at, with_jid, bytes(value))
        self._pending.append(entry)
        async with self._writing:
            if entry.id is None:
                batch, self._pending = self._pending, []
                try:
                    ids = await self._store().write(lambda conn: self._insert(conn, batch))
                except BaseException:
                    # Not written (an error, or cancelled before the write
                    # began): the items go back for the next batch's leader.
                    self._pending[:0] = [e for e in batch if e is not entry]
                    raise
                for item, item_id in zip(batch, ids, strict=True):
                    item.id = item_id
        assert entry.id is not None
        return entry.id

    def _insert(self, conn: sqlite3.Connection, batch: list[_Append]) -> list[int]:
        ids = []
        for item in batch:
            cur = conn.execute(
                "INSERT INTO module_archive (id, module, store, user, at, with_jid, value) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (item.id, *self._ns, item.user, item.at, item.with_jid, item.value))
            ids.append(int(cur.lastrowid or 0))
        return ids

    async def append_many(self, items: Sequence[tuple[int, str, float, str, bytes]]) -> None:
        """Add items whose ids the caller chose, (id, user, at, with_jid,
        value) each, in one transaction. Ids must be unique and should grow
        with time (pages are in id order); `ArchiveIds` makes such ids on
        every shard without asking the store, so a caller can name an item
        before it is written."""
        module, name = self._ns
        rows = [(item_id, module, name, user, at, with_jid, bytes(value))
                for item_id, user, at, with_jid, value in items]

        def work(conn: sqlite3.Connection) -> None:
            # One statement for the batch: a group commit of hundreds of
            # items is one call into SQLite, not hundreds.
            conn.executemany(
                "INSERT INTO module_archive (id, module, store, user, at, with_jid, value) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

        if rows:
            await self._store().write(work)

    @staticmethod
    def _where(conn: sqlite3.Connection, ns: tuple[str, str], user: str,
               before: int | None, after: int | None, with_jid: str | None,
               start: float | None, end: float | None) -> tuple[list[str], list[object]] | None:
        """The WHERE terms of a range of `user`'s log (None: the range is
        empty). A time bound is first turned into an id bound through
        `module_archive_by_time` (ids grow with time), so every query is an
        index range."""
        key = "module = ? AND store = ? AND user = ?"
        where = [key]
        args: list[object] = [*ns, user]
        if with_jid is not None:
            where.append("with_jid = ?")
            args.append(with_jid)
        if before is not None:
            where.append("id < ?")
            args.append(before)
        if after is not None:
            where.append("id > ?")
            args.append(after)
        # One index seek each: the earliest item at or after `start` has
        # (ids growing with time) the lowest id of the range.
        if start is not None:
            row = conn.execute(f"SELECT id FROM module_archive WHERE {key} AND at >= ? "
                               "ORDER BY at ASC LIMIT 1", (*ns, user, start)).fetchone()
            if row is None:
                return None
            where.append("id >= ? AND at >= ?")
            args += [int(row[0]), start]
        if end is not None:
            row = conn.execute(f"SELECT id FROM module_archive WHERE {key} AND at <= ? "
                               "ORDER BY at DESC LIMIT 1", (*ns, user, end)).fetchone()
            if row is None:
                return None
            where.append("id <= ? AND at <= ?")
            args += [int(row[0]), end]
        return where, args

    async def page(self, user: str, *, before: int | None = None, after: int | None = None,
                   with_jid: str | None = None, start: float | None = None,
                   end: float | None = None, limit: int = MAX_ARCHIVE_PAGE,
                   newest_first: bool = False) -> list[ArchivedItem]:
        """Up to `limit` items with ids in (after, before), stored at times
        in [start, end], oldest first unless `newest_first` (the last page
        of an archive).

        Every query is an index range: by id (`module_archive_by_user`), by
        peer and id (`..._by_peer`); a time bound is first turned into an id
        bound through `..._by_time` (ids grow with time), so the last page
        of a million-item log costs the same as of a small one."""
        ns, limit = self._ns, max(0, min(limit, MAX_ARCHIVE_PAGE))

        def work(conn: sqlite3.Connection) -> list[ArchivedItem]:
            found = self._where(conn, ns, user, before, after, with_jid, start, end)
            if found is None:
                return []
            where, args = found
            order = "DESC" if newest_first else "ASC"
            sql = (f"SELECT id, at, with_jid, value FROM module_archive "
                   f"WHERE {' AND '.join(where)} ORDER BY id {order} LIMIT ?")
            return [ArchivedItem(int(i), float(at), w, bytes(v))
                    for i, at, w, v in conn.execute(sql, (*args, limit))]

        return await self._store().read(work)

    async def count(self, user: str, *, before: int | None = None, after: int | None = None,
                    with_jid: str | None = None, start: float | None = None,
                    end: float | None = None) -> int:
        """How many items `page` would find without a limit (XEP-0059
        `<count/>` and `<first index>`): counted in the covering index
        (`..._by_user` or `..._by_peer`), never reading a stored value."""
        ns = self._ns

        def work(conn: sqlite3.Connection) -> int:
            found = self._where(conn, ns, user, before, after, with_jid, start, end)
            if found is None:
                return 0
            where, args = found
            (n,) = conn.execute(f"SELECT COUNT(*) FROM module_archive "
                                f"WHERE {' AND '.join(where)}", args).fetchone()
            return int(n)

        return await self._store().read(work)

    async def get_many(self, user: str, ids: Sequence[int]) -> list[ArchivedItem]:
        """The items of `user`'s log with these ids that exist, in id order
        (XEP-0313 `ids`); the caller bounds how many ids it asks for."""
        ns, wanted = self._ns, sorted(set(ids))

        def work(conn: sqlite3.Connection) -> list[ArchivedItem]:
            marks = ", ".join("?" for _ in wanted)
            rows = conn.execute(
                "SELECT id, at, with_jid, value FROM module_archive WHERE module = ? AND "
                f"store = ? AND user = ? AND id IN ({marks}) ORDER BY id", (*ns, user, *wanted))
            return [ArchivedItem(int(i), float(at), w, bytes(v)) for i, at, w, v in rows]

        return await self._store().read(work) if wanted else []

    async def bounds(self, user: str) -> tuple[tuple[int, float], tuple[int, float]] | None:
        """(id, time) of the first and the last item of `user`'s log, None
        when it is empty (XEP-0313 metadata): two index seeks."""
        ns = self._ns
        key = "module = ? AND store = ? AND user = ?"

        def work(conn: sqlite3.Connection) -> tuple[tuple[int, float], tuple[int, float]] | None:
            first = conn.execute(f"SELECT id, at FROM module_archive WHERE {key} "
                                 "ORDER BY id ASC LIMIT 1", (*ns, user)).fetchone()
            if first is None:
                return None
            last = conn.execute(f"SELECT id, at FROM module_archive WHERE {key} "
                                "ORDER BY id DESC LIMIT 1", (*ns, user)).fetchone()
            return (int(first[0]), float(first[1])), (int(last[0]), float(last[1]))

        return await self._store().read(work)

    async def delete_all(self, user: str) -> int:
        """Every item of `user`'s log (a destroyed room's archive)."""
        ns = self._ns

        def work(conn: sqlite3.Connection) -> int:
            cur = conn.execute("DELETE FROM module_archive WHERE module = ? AND store = ? "
                               "AND user = ?", (*ns, user))
            return int(cur.rowcount)

        return await self._store().write(work)

    async def max_id(self) -> int:
        """The largest id in any archive (0: none); one index lookup."""

        def work(conn: sqlite3.Connection) -> int:
            (found,) = conn.execute("SELECT MAX(id) FROM module_archive").fetchone()
            return int(found or 0)

        return await self._store().read(work)

    async def get(self, user: str, item_id: int) -> ArchivedItem | None:
        """One item of `user`'s log by id (None: not theirs, or gone)."""
        ns = self._ns

        def work(conn: sqlite3.Connection) -> ArchivedItem | None:
            row = conn.execute("SELECT id, at, with_jid, value FROM module_archive WHERE "
                               "module = ? AND store = ? AND user = ? AND id = ?",
                               (*ns, user, item_id)).fetchone()
            return None if row is None else ArchivedItem(int(row[0]), float(row[1]), row[2],
                                                         bytes(row[3]))

        return await self._store().read(work)

    async def delete_older(self, at: float, batch: int = 10_000) -> int:
        """Retention for every user: drop up to `batch` items older than
        `at` (call again while it returns `batch`: one short write at a
        time keeps other writers waiting briefly); how many. Read in id
        order, the oldest items come first, so a batch reads about as many
        rows as it deletes."""
        ns = self._ns

        def work(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "DELETE FROM module_archive WHERE id IN (SELECT id FROM module_archive "
                "WHERE module = ? AND store = ? AND at < ? ORDER BY id LIMIT ?)",
                (*ns, at, batch))
            return int(cur.rowcount)

        return await self._store().write(work)

    async def delete_before(self, user: str, at: float) -> int:
        """Retention: drop items older than `at`; returns how many."""
        ns = self._ns

        def work(conn: sqlite3.Connection) -> int:
            cur = conn.execute("DELETE FROM module_archive WHERE module = ? AND store = ? "
                               "AND user = ? AND at < ?", (*ns, user, at))
            return int(cur.rowcount)

        return await self._store().write(work)
