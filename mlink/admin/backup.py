"""`mlink backup DIR`: a consistent copy of a setup's data while it runs.

Why not `cp`: the store is a SQLite database in WAL mode, written by every
shard at any moment; a file copy can catch the database and its WAL at two
different moments, and the copy is then corrupt or silently older. SQLite's
online backup API copies one read transaction's view of every page (WAL
readers block no writer), so the copy is the database as it was at one
commit, and it is checked (`PRAGMA quick_check`) before we say so.

The embedded directory file is replaced atomically (written to a temp
file, renamed over the old one, under an exclusive flock on
`<file>.lock`). We take that lock shared, so no write is half-way, open the
file and copy from the open descriptor: whatever is renamed over it
meanwhile, the descriptor reads the one inode we opened, complete.

Also copied: the configuration file and the SCRAM mock-salt key (so an
unknown user's challenge looks the same after a restore). TLS certificates
and keys are listed, not copied: they are usually renewed by another tool
(Let's Encrypt) and a restore should take the current ones. An LDAP
directory is the LDAP administrator's to back up (slapcat); we say so.
See docs/backup.md for the restore.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mlink.sasl.mock_key import MOCK_SALT_KEY_FILE
from mlink.store import DEFAULT_FILENAME

if TYPE_CHECKING:
    from mlink.config_model import Config

# How long the backup's read of the store waits for a lock (a checkpoint
# or a schema migration): the store's own busy timeout.
BUSY_TIMEOUT_S = 10.0
# The copy holds private messages and password hashes: owner only.
DIR_MODE = 0o700
FILE_MODE = 0o600
# Names inside the backup directory.
CONFIG_NAME = "mlink.xml"
DIRECTORY_NAME = "directory.ldif"


class BackupError(Exception):
    """The backup could not be made; the message is one line."""


@dataclass
class BackupReport:
    """What was written (description, path) and what was only noted."""

    written: list[tuple[str, Path]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _prepare(target: Path) -> None:
    """A new or empty directory, owner-only: a backup never mixes with, or
    overwrites, an older one."""
    if target.exists():
        if not target.is_dir():
            raise BackupError(f"{target}: exists and is not a directory")
        if any(target.iterdir()):
            raise BackupError(f"{target}: not empty; give a new directory for each backup")
    try:
        target.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(target, DIR_MODE)
    except OSError as exc:
        raise BackupError(f"{target}: cannot create: {exc.strerror}") from None


def backup_store(source: Path, copy: Path) -> None:
    """SQLite's online backup of `source` into the new file `copy`, in one
    step (one read transaction: one consistent moment), then checked."""
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    os.close(fd)
    try:
        # Read-only: a backup must never create, migrate or checkpoint the
        # live database.
        src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True,
                              timeout=BUSY_TIMEOUT_S)
        try:
            dst = sqlite3.connect(copy)
            try:
                src.backup(dst)
                (verdict,) = dst.execute("PRAGMA quick_check").fetchone()
                if verdict != "ok":
                    raise BackupError(f"{copy}: the copy fails SQLite's check: {verdict}")
                # A self-contained file: no -wal beside it to lose.
                dst.execute("PRAGMA journal_mode = DELETE")
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise BackupError(f"{source}: backup failed: {exc}") from None


@contextlib.contextmanager
def _shared_lock(lock_path: Path) -> Iterator[None]:
    """The embedded directory's writers' flock, shared: no write runs while
    we hold it. No lock file means no writer ever ran: nothing to wait for."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def backup_file(source: Path, copy: Path, lock_path: Path | None = None) -> None:
    """Copy `source` through one open descriptor (one inode, complete even
    if a new version is renamed over the name meanwhile), under `lock_path`
    shared when given."""
    with _shared_lock(lock_path) if lock_path else contextlib.nullcontext():
        with open(source, "rb") as src:
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            with os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())


def run_backup(config: Config, target: Path) -> BackupReport:
    """Copy the store, the embedded directory, the configuration and the
    mock-salt key into the new directory `target`."""
    _prepare(target)
    report = BackupReport()
    try:
        db = config.data_dir / DEFAULT_FILENAME
        if db.exists():
            backup_store(db, target / DEFAULT_FILENAME)
            report.written.append(("store (SQLite online backup)", target / DEFAULT_FILENAME))
        else:
            report.notes.append(f"no store at {db} yet (the server never ran): nothing to copy")
        if config.directory.backend == "embedded":
            ldif = Path(config.directory.embedded.file)
            if ldif.exists():
                backup_file(ldif, target / DIRECTORY_NAME,
                            ldif.with_name(ldif.name + ".lock"))
                report.written.append((f"embedded directory (from {ldif})",
                                       target / DIRECTORY_NAME))
            else:
                report.notes.append(f"no embedded directory file at {ldif} yet")
        else:
            report.notes.append("the LDAP directory is not copied: back it up on the LDAP "
                                "server (slapcat)")
        if config.path is not None:
            backup_file(Path(config.path), target / CONFIG_NAME)
            report.written.append((f"configuration (from {config.path})", target / CONFIG_NAME))
        salt = config.data_dir / MOCK_SALT_KEY_FILE
        if salt.exists():
            backup_file(salt, target / MOCK_SALT_KEY_FILE)
            report.written.append(("SCRAM mock-salt key", target / MOCK_SALT_KEY_FILE))
    except OSError as exc:
        raise BackupError(f"{exc.filename or target}: {exc.strerror}") from None
    for what, path in (("TLS certificate", config.tls.certificate),
                       ("TLS key", config.tls.key)):
        if path is not None:
            report.notes.append(f"{what} {path}: not copied (keep it with your certificate "
                                "renewal, or copy it yourself)")
    _fsync_dir(target)
    return report


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
