"""MAM query latency on a large archive (issue 16: the last page of a
1M-message archive in under 50 ms).

    /work/main/.venv/bin/python bench/mam_query.py [--messages 1000000] [--others 9]
        [--reps 20] [--keep DIR]

Builds, in a temp dir, the store mlink uses (`mlink/store`, schema and
indexes as shipped) with one user's archive of --messages items spread
over 50 peers, one item per second of simulated time, plus --others users
with a tenth as many each (so the index holds other users' rows too). Then
times, through `ArchiveStore.page` exactly as `mlink/modules/mam.py` calls
it (limit = page + 1), the median and worst of --reps runs of:

- last page: `<before/>`, 50 items, newest first;
- a page in the middle: `<before>id</before>` half-way;
- last page with one peer (`with`);
- the first page after a `start` time near the end (a client syncing
  "since yesterday");
- a page between `start` and `end` in the middle.

It prints SQLite's query plan for the last-page query too, so a change
that loses the index shows. The store is filled with one INSERT per row
in big transactions (the fill is not what is measured).
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlink.store import Store  # noqa: E402
from mlink.store.module_store import ModuleStore  # noqa: E402

USER = "heavy@bench.local"
PAGE = 50
PEERS = 50
FILL_BATCH = 50_000
# A realistic archived chat message (~300 bytes serialised).
VALUE = (b"<message xmlns='jabber:client' type='chat' from='peer@bench.local/phone' "
         b"to='heavy@bench.local/laptop' id='a1b2c3d4'><body>Lorem ipsum dolor sit amet, "
         b"consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore</body>"
         b"<stanza-id xmlns='urn:xmpp:sid:0' by='heavy@bench.local' id='123456'/></message>")
T0 = 1_700_000_000.0


async def fill(store: Store, user: str, count: int, first_id_time: float) -> None:
    def work(conn: sqlite3.Connection, start: int, n: int) -> None:
        conn.executemany(
            "INSERT INTO module_archive (module, store, user, at, with_jid, value) "
            "VALUES ('mam', 'messages', ?, ?, ?, ?)",
            ((user, first_id_time + i, f"peer{i % PEERS}@bench.local", VALUE)
             for i in range(start, start + n)))

    done = 0
    while done < count:
        n = min(FILL_BATCH, count - done)
        start = done
        await store.write(lambda conn, s=start, k=n: work(conn, s, k))  # type: ignore[misc]
        done += n


async def timed(call: Callable[[], Awaitable[object]], reps: int) -> tuple[float, float]:
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        await call()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), max(times)


async def main(args: argparse.Namespace, where: Path) -> None:
    store = await Store.open(where / "mlink.sqlite")
    module_store = ModuleStore(lambda: store, "mam")
    archive = module_store.archive("messages")
    began = time.perf_counter()
    # Interleave: others first and last, so the heavy user's rows are not
    # alone at the end of the table.
    for n in range(args.others):
        await fill(store, f"other{n}@bench.local", args.messages // 10, T0)
    await fill(store, USER, args.messages, T0)
    print(f"filled {args.messages:,} items (+{args.others} x {args.messages // 10:,}) "
          f"in {time.perf_counter() - began:.0f} s")
    last = await archive.page(USER, limit=1, newest_first=True)
    top = last[0].id
    first = (await archive.page(USER, limit=1))[0].id
    middle = (first + top) // 2
    end_time = T0 + args.messages

    def plan(conn: sqlite3.Connection) -> list[str]:
        rows = conn.execute(
            "EXPLAIN QUERY PLAN SELECT id, at, with_jid, value FROM module_archive WHERE "
            "module = ? AND store = ? AND user = ? ORDER BY id DESC LIMIT ?",
            ("mam", "messages", USER, PAGE + 1)).fetchall()
        return [str(r[-1]) for r in rows]

    print("plan (last page):", "; ".join(await store.read(plan)))
    cases: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("last page", lambda: archive.page(USER, limit=PAGE + 1, newest_first=True)),
        ("page in the middle", lambda: archive.page(USER, before=middle, limit=PAGE + 1,
                                                    newest_first=True)),
        ("last page, one peer", lambda: archive.page(
            USER, with_jid="peer7@bench.local", limit=PAGE + 1, newest_first=True)),
        ("after start near the end", lambda: archive.page(
            USER, start=end_time - 86400, limit=PAGE + 1)),
        ("start..end in the middle", lambda: archive.page(
            USER, start=T0 + args.messages / 2, end=T0 + args.messages / 2 + 3600,
            limit=PAGE + 1)),
    ]
    print(f"{'query':28} {'median ms':>10} {'worst ms':>9}")
    for name, call in cases:
        got = await call()
        assert len(got) == PAGE + 1, (name, len(got))  # type: ignore[arg-type]
        median, worst = await timed(call, args.reps)
        print(f"{name:28} {median:10.2f} {worst:9.2f}")
    await store.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--others", type=int, default=9)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--keep", type=Path, default=None,
                        help="build the store in DIR and leave it there")
    options = parser.parse_args()
    directory = options.keep or Path(tempfile.mkdtemp(prefix="mlink-mam-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        trio.run(main, options, directory)
    finally:
        if options.keep is None:
            shutil.rmtree(directory, ignore_errors=True)
