"""The SQLite store: round trips, roster versions, the offline limit under
concurrency (tasks, store instances and processes), ordering, persistence,
crash durability, schema versioning and file creation."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

import mlink.store.sqlite
from mlink.store import SCHEMA_VERSION, RosterItem, SchemaTooNewError, Store, StoreError
from mlink.store.module_store import ArchiveIds, ModuleStore

ALICE = "alice@example.com"
BOB = "bob@example.com"
CAROL = "carol@example.net"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "mlink.sqlite3"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(db_path)
    try:
        yield s
    finally:
        await s.aclose()


def msg(n: int) -> bytes:
    return f"<message to='{ALICE}'><body>m{n}</body></message>".encode()


async def run_python(code: str) -> trio.CompletedProcess[bytes]:
    """Run `code` in a fresh interpreter (another "process" of the server)."""
    return await trio.run_process(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        check=False,
        capture_stdout=True,
        capture_stderr=True,
    )


# --- opening ------------------------------------------------------------------


async def test_open_creates_missing_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c" / "store.db"
    async with await Store.open(path) as s:
        assert await s.offline_put(ALICE, msg(1), 10)
    assert path.is_file()
    assert (path.stat().st_mode & 0o777) == 0o600


async def test_settings_in_effect(store: Store, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()
    for side in (store._writer, store._reader):
        live = side.live()
        assert live.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert live.execute("PRAGMA busy_timeout").fetchone()[0] > 0


async def test_newer_schema_refused(db_path: Path) -> None:
    s = await Store.open(db_path)
    await s.offline_put(ALICE, msg(1), 10)
    await s.aclose()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaTooNewError, match=f"schema version {SCHEMA_VERSION + 1}"):
        await Store.open(db_path)
    conn = sqlite3.connect(db_path)
    try:  # untouched by the refused open
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert conn.execute("SELECT count(*) FROM offline_message").fetchone()[0] == 1
    finally:
        conn.close()


async def test_foreign_database_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not ours"):
        await Store.open(path)


async def test_reopen_migrates_nothing(db_path: Path) -> None:
    await (await Store.open(db_path)).aclose()
    async with await Store.open(db_path) as s:
        assert await s.offline_count(ALICE) == 0


async def test_closed_store_raises(db_path: Path) -> None:
    s = await Store.open(db_path)
    await s.aclose()
    await s.aclose()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await s.roster(ALICE)
    with pytest.raises(StoreError, match="closed"):
        await s.offline_put(ALICE, msg(1), 10)


# --- rosters --------------------------------------------------------------------


def test_roster_item_normalises_groups_and_checks_state() -> None:
    item = RosterItem(BOB, groups=("b", "a", "b"))
    assert item.groups == ("a", "b")
    assert item == RosterItem(BOB, groups=("a", "b"))
    with pytest.raises(ValueError):
        RosterItem(BOB, subscription="remove")


async def test_roster_round_trip_and_versions(store: Store) -> None:
    assert await store.roster(ALICE) == (0, {})
    bob = RosterItem(BOB, name="Bob", groups=("Friends", "Äöü"), subscription="both")
    carol = RosterItem(CAROL, subscription="none", ask=True, approved=True)
    v1 = await store.roster_put(ALICE, bob)
    v2 = await store.roster_put(ALICE, carol)
    assert 0 < v1 < v2
    assert await store.roster(ALICE) == (v2, {BOB: bob, CAROL: carol})

    bob2 = RosterItem(BOB, name=None, subscription="to")
    v3 = await store.roster_put(ALICE, bob2)  # replace
    assert v3 > v2
    assert await store.roster(ALICE) == (v3, {BOB: bob2, CAROL: carol})

    assert await store.roster_delete(ALICE, "nobody@example.com") is None
    assert (await store.roster(ALICE))[0] == v3  # no change, no new version
    v4 = await store.roster_delete(ALICE, BOB)
    assert v4 is not None and v4 > v3
    assert await store.roster(ALICE) == (v4, {CAROL: carol})
    # Other users are separate.
    assert await store.roster(BOB) == (0, {})


async def test_roster_versions_shared_between_instances(store: Store, db_path: Path) -> None:
    other = await Store.open(db_path)
    try:
        seen = []
        for i in range(6):
            s = store if i % 2 else other
            seen.append(await s.roster_put(ALICE, RosterItem(f"c{i}@example.com")))
        assert seen == sorted(set(seen))  # strictly increasing across instances
        assert (await store.roster(ALICE))[0] == seen[-1]
        assert len((await other.roster(ALICE))[1]) == 6
    finally:
        await other.aclose()


# --- subscription requests ----------------------------------------------------------


async def test_subscription_requests(store: Store) -> None:
    assert await store.subscription_requests(ALICE) == []
    await store.subscription_request_put(ALICE, BOB, b"<presence type='subscribe'>1</presence>")
    await store.subscription_request_put(ALICE, CAROL, b"<presence type='subscribe'>2</presence>")
    assert await store.subscription_requests(ALICE) == [
        (BOB, b"<presence type='subscribe'>1</presence>"),
        (CAROL, b"<presence type='subscribe'>2</presence>"),
    ]
    # A repeated request replaces the earlier one and counts as the newest.
    await store.subscription_request_put(ALICE, BOB, b"<presence type='subscribe'>3</presence>")
    assert await store.subscription_requests(ALICE) == [
        (CAROL, b"<presence type='subscribe'>2</presence>"),
        (BOB, b"<presence type='subscribe'>3</presence>"),
    ]
    assert await store.subscription_request_delete(ALICE, CAROL)
    assert not await store.subscription_request_delete(ALICE, CAROL)
    assert await store.subscription_requests(ALICE) == [
        (BOB, b"<presence type='subscribe'>3</presence>")
    ]
    assert await store.subscription_requests(BOB) == []


# --- offline messages ---------------------------------------------------------------


async def test_offline_round_trip_and_order(store: Store) -> None:
    for n in range(50):
        assert await store.offline_put(ALICE, msg(n), 100)
    await store.offline_put(BOB, b"<message/>", 100)
    fetched = await store.offline_fetch(ALICE)
    assert [stanza for _, stanza in fetched] == [msg(n) for n in range(50)]
    ids = [i for i, _ in fetched]
    assert ids == sorted(ids)
    assert await store.offline_count(ALICE) == 50

    await store.offline_delete(ALICE, ids[:10])
    bob_ids = [i for i, _ in await store.offline_fetch(BOB)]
    await store.offline_delete(ALICE, bob_ids)  # not Alice's: ignored
    await store.offline_delete(ALICE, [])
    assert await store.offline_count(BOB) == 1
    assert await store.offline_fetch(ALICE) == fetched[10:]
    # New messages sort after the survivors; ids are never reused.
    await store.offline_delete(ALICE, ids[-5:])
    await store.offline_put(ALICE, msg(99), 100)
    last_id, last = (await store.offline_fetch(ALICE))[-1]
    assert last == msg(99) and last_id > ids[-1]


async def test_offline_limit(store: Store) -> None:
    for n in range(3):
        assert await store.offline_put(ALICE, msg(n), 3)
    assert not await store.offline_put(ALICE, msg(3), 3)
    assert await store.offline_count(ALICE) == 3
    assert not await store.offline_put(BOB, msg(0), 0)
    assert await store.offline_count(BOB) == 0


async def test_offline_limit_concurrent_tasks(store: Store) -> None:
    results: list[bool] = []

    async def put(n: int) -> None:
        results.append(await store.offline_put(ALICE, msg(n), 10))

    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(put, n)
    assert results.count(True) == 10
    assert await store.offline_count(ALICE) == 10


async def test_offline_limit_concurrent_instances(store: Store, db_path: Path) -> None:
    others = [await Store.open(db_path) for _ in range(3)]
    stores = [store, *others]
    results: list[bool] = []

    async def put(n: int) -> None:
        results.append(await stores[n % len(stores)].offline_put(ALICE, msg(n), 10))

    try:
        async with trio.open_nursery() as nursery:
            for n in range(40):
                nursery.start_soon(put, n)
    finally:
        for s in others:
            await s.aclose()
    assert results.count(True) == 10
    assert await store.offline_count(ALICE) == 10


async def test_offline_limit_concurrent_processes(db_path: Path) -> None:
    await (await Store.open(db_path)).aclose()  # create the schema once
    code = f"""
        import trio
        from pathlib import Path
        from mlink.store import Store

        async def main():
            async with await Store.open(Path({str(db_path)!r})) as s:
                async with trio.open_nursery() as n:
                    for i in range(15):
                        n.start_soon(s.offline_put, {ALICE!r}, b"<message/>", 25)

        trio.run(main)
    """
    results: list[trio.CompletedProcess[bytes]] = []

    async def one() -> None:
        results.append(await run_python(code))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
    for r in results:
        assert r.returncode == 0, r.stderr.decode()
    async with await Store.open(db_path) as s:
        assert await s.offline_count(ALICE) == 25


# --- blocking, private storage, last activity -----------------------------------------


async def test_blocklist(store: Store) -> None:
    assert await store.blocklist(ALICE) == set()
    await store.block(ALICE, [BOB, CAROL, "example.org"])
    await store.block(ALICE, [BOB])  # already blocked
    await store.block(ALICE, iter([]))
    assert await store.blocklist(ALICE) == {BOB, CAROL, "example.org"}
    await store.unblock(ALICE, (j for j in [BOB, "nobody@example.com"]))
    assert await store.blocklist(ALICE) == {CAROL, "example.org"}
    await store.block(BOB, [ALICE])
    await store.unblock(ALICE, None)
    assert await store.blocklist(ALICE) == set()
    assert await store.blocklist(BOB) == {ALICE}


async def test_private_storage(store: Store) -> None:
    key = "{storage:bookmarks}storage"
    assert await ModuleStore(lambda: store, "private").map("xml").get(ALICE, key) is None
    await ModuleStore(lambda: store, "private").map("xml").set(ALICE, key, b"<storage xmlns='storage:bookmarks'/>")
    await ModuleStore(lambda: store, "private").map("xml").set(ALICE, "{x:y}z", b"<z xmlns='x:y'/>")
    assert await ModuleStore(lambda: store, "private").map("xml").get(ALICE, key) == b"<storage xmlns='storage:bookmarks'/>"
    await ModuleStore(lambda: store, "private").map("xml").set(ALICE, key, b"<storage xmlns='storage:bookmarks'><c/></storage>")
    assert (
        await ModuleStore(lambda: store, "private").map("xml").get(ALICE, key) == b"<storage xmlns='storage:bookmarks'><c/></storage>"
    )
    assert await ModuleStore(lambda: store, "private").map("xml").get(ALICE, "{x:y}z") == b"<z xmlns='x:y'/>"
    assert await ModuleStore(lambda: store, "private").map("xml").get(BOB, key) is None


async def test_last_activity(store: Store) -> None:
    assert await store.last_activity(ALICE) is None
    await store.last_activity_put(ALICE, 1700000000.5, "gone fishing")
    assert await store.last_activity(ALICE) == (1700000000.5, "gone fishing")
    await store.last_activity_put(ALICE, 1700000100.0, "")
    assert await store.last_activity(ALICE) == (1700000100.0, "")


async def test_delete_user_data(store: Store) -> None:
    v = await store.roster_put(ALICE, RosterItem(BOB))
    await store.subscription_request_put(ALICE, CAROL, b"<presence/>")
    await store.offline_put(ALICE, msg(1), 10)
    await store.block(ALICE, [CAROL])
    await ModuleStore(lambda: store, "private").map("xml").set(ALICE, "{a:b}c", b"<c/>")
    await store.last_activity_put(ALICE, 1.0, "x")
    await store.roster_put(BOB, RosterItem(ALICE))
    await store.offline_put(BOB, msg(2), 10)

    await store.delete_user_data(ALICE)
    version, items = await store.roster(ALICE)
    assert items == {} and version > v  # versions never repeat for a re-created account
    assert await store.subscription_requests(ALICE) == []
    assert await store.offline_count(ALICE) == 0
    assert await store.blocklist(ALICE) == set()
    assert await ModuleStore(lambda: store, "private").map("xml").get(ALICE, "{a:b}c") is None
    assert await store.last_activity(ALICE) is None
    # Bob's data is untouched.
    assert set((await store.roster(BOB))[1]) == {ALICE}
    assert await store.offline_count(BOB) == 1

    await store.delete_user_data("never@example.com")
    assert await store.roster("never@example.com") == (0, {})


# --- persistence and sharing -------------------------------------------------------------


async def test_survives_reopen(db_path: Path) -> None:
    item = RosterItem(BOB, name="B", groups=("g",), subscription="from", approved=True)
    async with await Store.open(db_path) as s:
        v = await s.roster_put(ALICE, item)
        await s.subscription_request_put(ALICE, CAROL, b"<presence/>")
        await s.offline_put(ALICE, msg(1), 10)
        await s.block(ALICE, [CAROL])
        await ModuleStore(lambda: s, "private").map("xml").set(ALICE, "{a:b}c", b"<c/>")
        await s.last_activity_put(ALICE, 5.0, "bye")
    async with await Store.open(db_path) as s:
        assert await s.roster(ALICE) == (v, {BOB: item})
        assert await s.subscription_requests(ALICE) == [(CAROL, b"<presence/>")]
        assert [m for _, m in await s.offline_fetch(ALICE)] == [msg(1)]
        assert await s.blocklist(ALICE) == {CAROL}
        assert await ModuleStore(lambda: s, "private").map("xml").get(ALICE, "{a:b}c") == b"<c/>"
        assert await s.last_activity(ALICE) == (5.0, "bye")


async def test_second_instance_sees_writes(store: Store, db_path: Path) -> None:
    other = await Store.open(db_path)
    try:
        await store.offline_put(ALICE, msg(1), 10)
        await store.block(ALICE, [BOB])
        assert await other.offline_count(ALICE) == 1
        assert await other.blocklist(ALICE) == {BOB}
        await other.roster_put(ALICE, RosterItem(BOB))
        assert BOB in (await store.roster(ALICE))[1]
    finally:
        await other.aclose()


async def test_write_by_another_process_visible(store: Store, db_path: Path) -> None:
    code = f"""
        import trio
        from pathlib import Path
        from mlink.store import RosterItem, Store

        async def main():
            async with await Store.open(Path({str(db_path)!r})) as s:
                await s.roster_put({ALICE!r}, RosterItem({BOB!r}, subscription="both"))

        trio.run(main)
    """
    r = await run_python(code)
    assert r.returncode == 0, r.stderr.decode()
    version, items = await store.roster(ALICE)
    assert version == 1 and items == {BOB: RosterItem(BOB, subscription="both")}


async def test_acknowledged_write_survives_sigkill(db_path: Path) -> None:
    # The child kills itself the moment offline_put returns: no close, no
    # checkpoint, no interpreter shutdown.
    code = f"""
        import os, signal, trio
        from pathlib import Path
        from mlink.store import Store

        async def main():
            s = await Store.open(Path({str(db_path)!r}))
            assert await s.offline_put({ALICE!r}, b"<message>kept</message>", 10)
            os.kill(os.getpid(), signal.SIGKILL)

        trio.run(main)
    """
    r = await run_python(code)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    async with await Store.open(db_path) as s:
        assert [m for _, m in await s.offline_fetch(ALICE)] == [b"<message>kept</message>"]


async def test_reads_during_write_transaction_of_other_connection(
    store: Store, db_path: Path
) -> None:
    """WAL: a write lock held elsewhere (another process mid-transaction)
    does not block readers, and our writes wait for it rather than fail.
    (Whether the worker thread reaches its BEGIN before the COMMIT below is
    up to the scheduler; either way the write must succeed.)"""
    await store.offline_put(ALICE, msg(1), 10)
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO offline_message (user, stanza) VALUES (?, ?)", (ALICE, msg(2)))
        assert await store.offline_count(ALICE) == 1  # not blocked, uncommitted row unseen
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def write() -> None:
                await store.offline_put(ALICE, msg(3), 10)
                done.set()

            nursery.start_soon(write)
            await trio.testing.wait_all_tasks_blocked()
            conn.execute("COMMIT")
        assert done.is_set()
    finally:
        conn.close()
    assert [m for _, m in await store.offline_fetch(ALICE)] == [msg(1), msg(2), msg(3)]


async def test_lock_held_too_long_is_store_error(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mlink.store.sqlite, "BUSY_TIMEOUT_MS", 50)
    async with await Store.open(db_path) as s:
        conn = sqlite3.connect(db_path, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError, match="locked"):
                await s.offline_put(ALICE, msg(1), 10)
            assert await s.offline_count(ALICE) == 0  # reads still work
            conn.execute("ROLLBACK")
        finally:
            conn.close()
        assert await s.offline_put(ALICE, msg(1), 10)  # the connection is still usable


def test_shards_opening_a_new_store_together(tmp_path):
    """Every shard process opens the store at start: several first opens of
    a new file at once must all succeed (switching to WAL races otherwise)."""
    # Each child imports everything, says so, and opens the store once told
    # to on stdin, so that the opens really overlap.
    script = (
        "import sys, trio\n"
        "from mlink.store import Store\n"
        "async def main():\n"
        "    store = await Store.open(sys.argv[1])\n"
        "    await store.aclose()\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "trio.run(main)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for attempt in range(5):  # the race is timing-dependent: try it several times
        path = tmp_path / f"fresh{attempt}" / "mlink.sqlite3"
        procs = [subprocess.Popen([sys.executable, "-c", script, str(path)], env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(6)]
        for proc in procs:
            assert proc.stdout.readline() == "ready\n"
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err


# --- module stores ----------------------------------------------------------------------


async def test_module_stores_are_namespaced_by_module_and_name(store: Store) -> None:
    mine, theirs = ModuleStore(lambda: store, "mine"), ModuleStore(lambda: store, "theirs")
    await mine.map("a").set(ALICE, "k", b"1")
    await mine.map("b").set(ALICE, "k", b"2")
    await theirs.map("a").set(ALICE, "k", b"3")
    assert await mine.map("a").items(ALICE) == {"k": b"1"}
    assert await mine.map("b").get(ALICE, "k") == b"2"
    assert await theirs.map("a").get(ALICE, "k") == b"3"
    assert await mine.map("a").get(BOB, "k") is None
    await mine.map("a").set(ALICE, "k", None)
    assert await mine.map("a").get(ALICE, "k") is None
    await mine.keyval("v").set(ALICE, b"x")
    assert await mine.keyval("v").get(ALICE) == b"x"
    await store.delete_user_data(ALICE)
    assert await mine.map("b").items(ALICE) == {} and await mine.keyval("v").get(ALICE) is None


async def test_module_archive_pages_by_id(store: Store) -> None:
    log = ModuleStore(lambda: store, "mine").archive("log")
    ids = [await log.append(ALICE, f"m{i}".encode(), with_jid=BOB if i % 2 else CAROL,
                            at=1000.0 + i) for i in range(10)]
    assert ids == sorted(ids)
    last = await log.page(ALICE, limit=3, newest_first=True)
    assert [item.value for item in last] == [b"m9", b"m8", b"m7"]
    earlier = await log.page(ALICE, before=last[-1].id, limit=3, newest_first=True)
    assert [item.value for item in earlier] == [b"m6", b"m5", b"m4"]
    with_bob = await log.page(ALICE, with_jid=BOB, after=ids[4])
    assert [item.value for item in with_bob] == [b"m5", b"m7", b"m9"]
    assert await log.delete_before(ALICE, 1005.0) == 5
    assert [item.value for item in await log.page(ALICE)][:1] == [b"m5"]


async def test_module_archive_group_commits_concurrent_appends(store: Store) -> None:
    """Appends made while a write is under way share the next commit: 40 at
    once cost a handful of transactions, each caller gets its own id, and
    ids follow the order the appends were made in."""
    log = ModuleStore(lambda: store, "mine").archive("group")
    writes = 0
    real_write = store.write

    async def counting_write(work):  # type: ignore[no-untyped-def]
        nonlocal writes
        writes += 1
        return await real_write(work)

    store.write = counting_write  # type: ignore[method-assign]
    got: dict[int, int] = {}

    async def one(n: int) -> None:
        got[n] = await log.append(ALICE, f"g{n}".encode(), at=2000.0 + n)

    async with trio.open_nursery() as nursery:
        for n in range(40):
            nursery.start_soon(one, n)
            await trio.lowlevel.checkpoint()  # start them in order
    store.write = real_write  # type: ignore[method-assign]
    assert sorted(got.values()) == [got[n] for n in range(40)]
    assert len(set(got.values())) == 40
    assert writes < 10, writes
    stored = await log.page(ALICE, limit=100)
    assert [item.value for item in stored] == [f"g{n}".encode() for n in range(40)]
    assert [item.id for item in stored] == [got[n] for n in range(40)]


def test_archive_ids_are_unique_across_shards_and_ordered_in_time() -> None:
    zero, one = ArchiveIds(0), ArchiveIds(1)
    same_us = [zero.next(1000.0) for _ in range(3000)]  # many in one microsecond
    assert same_us == sorted(same_us) and len(set(same_us)) == 3000
    later = one.next(1000.5)
    assert later not in same_us and later % 64 == 1  # the shard is in the low bits
    assert zero.next(1001.0) > same_us[-1]
    assert one.next(2000.000002) > zero.next(2000.000001)  # time order across shards
    with pytest.raises(ValueError):
        ArchiveIds(64)
    # After a restart with the clock stepped back, ids stay above the store's.
    restarted = ArchiveIds(0)
    restarted.above(same_us[-1])
    assert restarted.next(500.0) > same_us[-1]


async def test_module_archive_items_with_chosen_ids(store: Store) -> None:
    log = ModuleStore(lambda: store, "mine").archive("chosen")
    ids = ArchiveIds(3)
    chosen = [ids.next(3000.0 + n) for n in range(3)]
    await log.append_many([(i, ALICE, 3000.0 + n, BOB, f"c{n}".encode())
                           for n, i in enumerate(chosen)])
    assert [item.id for item in await log.page(ALICE)] == chosen
    later = await log.append(ALICE, b"auto")  # the store's own ids stay above
    assert later > chosen[-1]


async def test_module_archive_time_bounds(store: Store) -> None:
    log = ModuleStore(lambda: store, "mine").archive("timed")
    for i in range(10):
        await log.append(ALICE, f"t{i}".encode(), at=5000.0 + i)
    page = await log.page(ALICE, start=5003.0, end=5006.0)
    assert [item.value for item in page] == [b"t3", b"t4", b"t5", b"t6"]
    assert await log.page(ALICE, start=6000.0) == []
    assert [item.value for item in await log.page(ALICE, end=5001.0, newest_first=True)] == [
        b"t1", b"t0"]
    assert await log.delete_older(5005.0, batch=3) == 3
    assert await log.delete_older(5005.0, batch=3) == 2
    assert [item.value for item in await log.page(ALICE)][:1] == [b"t5"]


async def test_module_schema_migrations_apply_once(store: Store) -> None:
    own = ModuleStore(lambda: store, "mine")
    own.schema([["CREATE TABLE mine_thing (id INTEGER PRIMARY KEY, v TEXT)"]])
    assert await own.migrate() == 0
    assert await own.migrate() == 1  # already there: nothing run again
    own.schema([["CREATE TABLE mine_thing (id INTEGER PRIMARY KEY, v TEXT)"],
                ["ALTER TABLE mine_thing ADD COLUMN w TEXT"]])
    assert await own.migrate() == 1

    def columns(conn: sqlite3.Connection) -> list[str]:
        return [row[1] for row in conn.execute("PRAGMA table_info(mine_thing)")]

    assert await store.read(columns) == ["id", "v", "w"]
