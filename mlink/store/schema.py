"""Schema of the SQLite store and the migrations that build it.

The schema version lives in `PRAGMA user_version` (in the database header,
so it changes in the same transaction as the tables). `MIGRATIONS[n]` takes
a database from version n to n+1; a new release appends to the list and
never edits an entry already shipped. Migrations are lists of single
statements rather than scripts because `executescript` commits on its own,
and all steps must sit in one transaction: a crash mid-migration leaves the
old version intact, and a second process opening the file at the same time
waits on the write lock and then sees the migrated version.

`PRAGMA application_id` marks the file as ours, so pointing the data
directory at some other application's SQLite file fails loudly instead of
adding our tables to it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mlink.store.model import SchemaTooNewError, StoreError

# "mlnk" in ASCII; written to the header of every database we create.
APPLICATION_ID = 0x6D6C6E6B

# Column names avoid SQL keywords (KEY, GROUPS) so no statement needs quoting.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 0 -> 1: the RFC 6121 data set.
    (
        # One counter per user (RFC 6121 §2.6). It lives in the database, not
        # in memory, so shard processes sharing the file agree on it.
        """CREATE TABLE roster_version (
            user TEXT PRIMARY KEY,
            version INTEGER NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE roster_item (
            user TEXT NOT NULL,
            jid TEXT NOT NULL,
            name TEXT,
            group_names TEXT NOT NULL DEFAULT '[]',
            subscription TEXT NOT NULL DEFAULT 'none'
                CHECK (subscription IN ('none', 'to', 'from', 'both')),
            ask INTEGER NOT NULL DEFAULT 0,
            approved INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (user, jid)
        ) WITHOUT ROWID""",
        # AUTOINCREMENT: ids are never reused, so arrival order is id order
        # and an id read by one process can never name a newer row.
        """CREATE TABLE subscription_request (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user TEXT NOT NULL,
            contact TEXT NOT NULL,
            stanza BLOB NOT NULL,
            UNIQUE (user, contact)
        )""",
        "CREATE INDEX subscription_request_by_user ON subscription_request (user, id)",
        """CREATE TABLE offline_message (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user TEXT NOT NULL,
            stanza BLOB NOT NULL
        )""",
        "CREATE INDEX offline_message_by_user ON offline_message (user, id)",
        """CREATE TABLE block (
            user TEXT NOT NULL,
            jid TEXT NOT NULL,
            PRIMARY KEY (user, jid)
        ) WITHOUT ROWID""",
        """CREATE TABLE private_xml (
            user TEXT NOT NULL,
            element_key TEXT NOT NULL,
            xml BLOB NOT NULL,
            PRIMARY KEY (user, element_key)
        ) WITHOUT ROWID""",
        """CREATE TABLE last_activity (
            user TEXT PRIMARY KEY,
            at REAL NOT NULL,
            status TEXT NOT NULL
        ) WITHOUT ROWID""",
    ),
    # 1 -> 2: profile fields with the `local` policy (mlink.profile), held
    # here and never sent to the directory. One value per field; the value
    # is bytes (UTF-8 text, or a photo when one is configured local).
    (
        """CREATE TABLE profile_field (
            user TEXT NOT NULL,
            field TEXT NOT NULL,
            value BLOB NOT NULL,
            PRIMARY KEY (user, field)
        ) WITHOUT ROWID""",
    ),
    # 2 -> 3: stores of modules (mlink.store.module_store), namespaced by
    # module and store name, so a new feature adds no table or method here;
    # a module's own tables are versioned in module_schema. Private XML
    # storage (XEP-0049) moves into its module's map store.
    (
        """CREATE TABLE module_kv (
            module TEXT NOT NULL,
            store TEXT NOT NULL,
            user TEXT NOT NULL,
            item_key TEXT NOT NULL,
            value BLOB NOT NULL,
            PRIMARY KEY (module, store, user, item_key)
        ) WITHOUT ROWID""",
        """CREATE TABLE module_archive (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            module TEXT NOT NULL,
            store TEXT NOT NULL,
            user TEXT NOT NULL,
            at REAL NOT NULL,
            with_jid TEXT NOT NULL DEFAULT '',
            value BLOB NOT NULL
        )""",
        # Paging a user's archive newest-first, and filtering by peer.
        "CREATE INDEX module_archive_by_user ON module_archive (module, store, user, id)",
        """CREATE INDEX module_archive_by_peer
            ON module_archive (module, store, user, with_jid, id)""",
        """CREATE TABLE module_schema (
            module TEXT PRIMARY KEY,
            version INTEGER NOT NULL
        ) WITHOUT ROWID""",
        """INSERT INTO module_kv (module, store, user, item_key, value)
            SELECT 'private', 'xml', user, element_key, xml FROM private_xml""",
        "DROP TABLE private_xml",
    ),
    # 2 -> 3: archive queries by time (XEP-0313 start/end) find their first
    # and last ids through this index instead of scanning the user's log.
    (
        """CREATE INDEX module_archive_by_time
            ON module_archive (module, store, user, at)""",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Bring the database on `conn` (autocommit mode) to `SCHEMA_VERSION` in
    one write transaction; return the version found before. Raises
    SchemaTooNewError or StoreError without changing the file."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if app_id not in (0, APPLICATION_ID):
            raise StoreError(f"{path} is not an mlink database (application_id {app_id:#x})")
        if found > SCHEMA_VERSION:
            raise SchemaTooNewError(
                f"{path} has schema version {found}, but this mlink only knows versions up "
                f"to {SCHEMA_VERSION}; run the newer mlink, or restore a backup"
            )
        if found == 0:
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise StoreError(f"{path} holds tables but no mlink schema version; not ours")
        for version in range(found, SCHEMA_VERSION):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            # PRAGMA takes no parameters; the value is our own integer.
            conn.execute(f"PRAGMA user_version = {version + 1}")
        if app_id == 0:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return found
