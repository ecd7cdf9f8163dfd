"""`mlink backup DIR` while a server runs and a chat goes on: the copy
starts a second server with the same users, who log in with their
passwords and receive exactly the offline messages the copy holds, in
order and without a gap (one consistent moment of the store)."""

from __future__ import annotations

import re
import shutil
import sqlite3
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.rawclient import CLIENT_NS
from tests.serverproc import DOMAIN, mlink, serve, start_mlink, stop
from tests.test_im_services import ALICE, BOB, CAROL, USERS, Client, body_of
from tests.test_migrate import init_for_serve

# Messages sent before the backup starts (certainly in the copy), and at
# most this many more while it runs (the load stops when the backup ends).
BEFORE = 5
MAX_DURING = 3000


def offline_bodies(db: Path, user: str) -> list[str]:
    """The bodies of `user`'s offline messages in a store file, in order."""
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT stanza FROM offline_message WHERE user = ? ORDER BY id",
                            (user,)).fetchall()
    finally:
        conn.close()
    return [ET.fromstring(bytes(stanza)).findtext(f"{{{CLIENT_NS}}}body") or ""
            for (stanza,) in rows]


def test_a_backup_during_a_chat_starts_a_second_server(tmp_path: Path, cert_files,
                                                       ca_file) -> None:
    users = {u: USERS[u] for u in (ALICE, BOB, CAROL)}
    copy = tmp_path / "backup"
    room = lambda text: re.sub(r'offline-limit="\d+"',  # noqa: E731
                               f'offline-limit="{BEFORE + MAX_DURING}"', text)
    with start_mlink(tmp_path / "live", DOMAIN, cert_files, users=users,
                     edit_config=room) as live:
        alice = Client(live, ca_file, ALICE)
        for n in range(BEFORE):
            alice.message(BOB, f"m{n}")
        assert alice.sync() == []
        done = threading.Event()
        sent = [BEFORE]

        def chat() -> None:
            """Alice keeps writing to offline bob until the backup is done."""
            n = BEFORE
            while not done.is_set() and n < BEFORE + MAX_DURING:
                alice.message(BOB, f"m{n}")
                n += 1
            sent[0] = n

        load = threading.Thread(target=chat)
        load.start()
        try:
            out = mlink("backup", str(copy), "--config", str(live.config))
        finally:
            done.set()
            load.join()
        assert alice.sync() == []  # every message stored, none bounced
        alice.close()
        lines = out.stdout.splitlines()
        assert f"wrote {copy / 'mlink.sqlite3'}: store (SQLite online backup)" in lines
        assert any(line.startswith(f"wrote {copy / 'directory.ldif'}: embedded directory")
                   for line in lines), out.stdout
        assert any(line.startswith(f"wrote {copy / 'mlink.xml'}: configuration")
                   for line in lines), out.stdout
        assert (copy.stat().st_mode & 0o777) == 0o700
        # A second backup into the same directory is refused, not mixed in.
        again = mlink("backup", str(copy), "--config", str(live.config), check=False)
        assert again.returncode == 1 and "not empty" in again.stderr
    kept = offline_bodies(copy / "mlink.sqlite3", BOB)
    # A prefix of what alice sent: at least what was sent before the backup.
    assert BEFORE <= len(kept) <= sent[0]
    assert kept == [f"m{n}" for n in range(len(kept))]
    # Restore onto a new setup (docs/backup.md): the files in place, serve.
    restored = tmp_path / "restored"
    init_for_serve(restored, cert_files)
    config = restored / "mlink.xml"
    config.write_text(room(config.read_text()))
    shutil.copyfile(copy / "mlink.sqlite3", restored / "mlink.sqlite3")
    shutil.copyfile(copy / "directory.ldif", restored / "directory.ldif")
    assert mlink("user", "list", "--config", str(restored / "mlink.xml")).stdout.split() == \
        sorted(users)
    second = serve(restored / "mlink.xml", DOMAIN)
    try:
        bob = Client(second, ca_file, BOB)
        bob.send("<presence/>")
        got = [bob.expect(lambda s: s.tag == f"{{{CLIENT_NS}}}message", f"message {n}")
               for n in range(len(kept))]
        assert [body_of(m) for m in got] == kept
        assert [s for s in bob.sync() if s.tag == f"{{{CLIENT_NS}}}message"] == []
        bob.close()
        Client(second, ca_file, CAROL).close()  # she logs in with her password too
    finally:
        assert stop(second) == 0, second.log.text()
