"""Where uploaded files live, and the blocking file work on them (always
run in a worker thread: `trio.to_thread.run_sync`, never on the loop).

Layout under the upload directory (outside any web root, default
`<data>/upload`):

    <owner>/<slot id>          the file, as uploaded
    <owner>/<slot id>.json     its name, content type and size
    <owner>/.part-<slot id>-<random>   an upload in progress

Names on disk come from the owner id and the slot id only, both checked
to be hex/base64url before any path is built: nothing a client writes
reaches the file system. A finished upload is linked into place
(`os.link`, which fails if the name exists), so of two PUTs to the same
slot exactly one wins, on any shard. Expiry is by modification time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from mlink.modules.http_upload.slots import OWNER_RE
from mlink.util.keyfile import load_or_create_key

log = logging.getLogger(__name__)

# The key that signs slots and hides owners, in the data directory.
KEY_FILE = "http-upload.key"
KEY_BYTES = 32
META_SUFFIX = ".json"
PART_PREFIX = ".part-"
# A partial upload older than this is left over from a crash (a live one
# is written to at least every idle timeout); the sweep removes it.
STALE_PART_SECONDS = 3600
# Metadata files are a few hundred bytes; anything larger is not ours.
MAX_META_BYTES = 4096
# Random suffix of a partial upload's name, hex: six bytes make two
# shards' parts of one slot distinct.
PART_TOKEN_BYTES = 6
# Every name the store writes in an owner directory: `<slot id>`,
# `<slot id>.json`, `.part-<slot id>-<hex>` and `.part-<slot id>-<hex>.json`
# (the slot id's 24 characters keep the parts apart though it may hold `-`).
_SLOT = r"[A-Za-z0-9_-]{24}"
_OURS_RES = (
    re.compile(rf"^{_SLOT}(?:{re.escape(META_SUFFIX)})?$"),
    re.compile(rf"^{re.escape(PART_PREFIX)}{_SLOT}-[0-9a-f]{{{2 * PART_TOKEN_BYTES}}}"
               rf"(?:{re.escape(META_SUFFIX)})?$"),
)
# A file system's own directory at the root of a mount point; tolerated
# in the upload root (a dedicated disk), never touched.
LOST_FOUND = "lost+found"
# How many foreign names one warning or start error lists.
MAX_NAMES_SHOWN = 3


def is_ours(name: str) -> bool:
    """Whether `name`, in an owner directory, is one the store writes (so
    one it may remove)."""
    return any(pattern.match(name) for pattern in _OURS_RES)


def load_key(data_dir: Path) -> bytes:
    """The upload key, created (mode 0600) on first use; shards starting at
    once agree (mlink.util.keyfile)."""
    return load_or_create_key(data_dir / KEY_FILE, KEY_BYTES)


@dataclass(frozen=True, slots=True)
class Meta:
    name: str
    content_type: str
    size: int


@dataclass(frozen=True, slots=True)
class Stored:
    """A file found for a download."""

    path: Path
    meta: Meta
    size: int


class UploadStore:
    """The upload directory. Every method blocks: call it in a thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Foreign names last reported by the sweep: a warning is logged
        # when they change, not every hour.
        self._reported: frozenset[str] = frozenset()

    def foreign_entries(self) -> list[str]:
        """Names directly under the root that the store did not create
        (sorted); `lost+found` excepted. Empty for a missing root."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return sorted(
            e.name for e in entries
            if not (e.is_dir(follow_symlinks=False)
                    and (OWNER_RE.match(e.name) or e.name == LOST_FOUND)))

    def _owner_dir(self, owner: str) -> Path:
        return self.root / owner

    def usage(self, owner: str, expiry: float, now: float) -> int:
        """Bytes `owner` has stored and not expired, uploads in progress
        included (so parallel uploads cannot overrun the quota by much)."""
        total = 0
        try:
            entries = list(os.scandir(self._owner_dir(owner)))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if entry.name.endswith(META_SUFFIX):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.name.startswith(PART_PREFIX) or st.st_mtime + expiry >= now:
                total += st.st_size
        return total

    def exists(self, owner: str, slot_id: str) -> bool:
        return (self._owner_dir(owner) / slot_id).exists()

    def open_part(self, owner: str, slot_id: str, size: int) -> tuple[Path, int]:
        """A new private file for an upload in progress: (path, fd). It
        has the upload's full size from the start (sparse), so the quota
        counts an upload in progress at what it will be."""
        directory = self._owner_dir(owner)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / f"{PART_PREFIX}{slot_id}-{secrets.token_hex(PART_TOKEN_BYTES)}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return path, fd

    def commit(self, part: Path, fd: int, owner: str, slot_id: str, meta: Meta) -> bool:
        """Make the finished upload `part` the slot's file; False if the
        slot already has one (the part is removed either way).

        The file is linked first and its metadata written only by the PUT
        whose link won: a loser of a race on one slot must not leave its
        name or content type on the winner's file. Until the metadata is
        in place a GET finds no file (`find` needs both), never a wrong
        content type."""
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            directory = self._owner_dir(owner)
            try:
                os.link(part, directory / slot_id)
            except FileExistsError:
                return False
            token = secrets.token_hex(PART_TOKEN_BYTES)
            meta_tmp = directory / f"{PART_PREFIX}{slot_id}-{token}{META_SUFFIX}"
            try:
                meta_tmp.write_text(json.dumps({
                    "name": meta.name, "content-type": meta.content_type,
                    "size": meta.size}))
                os.replace(meta_tmp, directory / f"{slot_id}{META_SUFFIX}")
            except OSError:
                # No metadata, no file: the slot stays usable for a retry.
                meta_tmp.unlink(missing_ok=True)
                (directory / slot_id).unlink(missing_ok=True)
                raise
            return True
        finally:
            part.unlink(missing_ok=True)

    @staticmethod
    def abandon(part: Path, fd: int) -> None:
        """Remove an upload that did not finish."""
        with contextlib.suppress(OSError):
            os.close(fd)
        part.unlink(missing_ok=True)

    def find(self, owner: str, slot_id: str, expiry: float, now: float) -> Stored | None:
        """The file of a slot for a download, None if there is none or it
        has expired."""
        directory = self._owner_dir(owner)
        path = directory / slot_id
        try:
            st = path.stat()
            raw = (directory / f"{slot_id}{META_SUFFIX}").read_bytes()[:MAX_META_BYTES]
            data = json.loads(raw)
            meta = Meta(str(data["name"]), str(data["content-type"]), int(data["size"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if st.st_mtime + expiry < now:
            return None
        return Stored(path, meta, st.st_size)

    def sweep(self, expiry: float, now: float) -> int:
        """Remove expired files, their metadata, and leftovers of crashed
        uploads; how many files were removed. Only owner directories and
        the names the store writes are looked at; anything else is left
        alone and reported (once while it stays the same)."""
        removed = 0
        foreign = set(self.foreign_entries())
        try:
            owners = [e for e in os.scandir(self.root)
                      if e.is_dir(follow_symlinks=False) and OWNER_RE.match(e.name)]
        except FileNotFoundError:
            return 0
        for owner in owners:
            try:
                entries = {e.name: e for e in os.scandir(owner.path)}
            except FileNotFoundError:
                continue
            for name, entry in entries.items():
                if not is_ours(name) or not entry.is_file(follow_symlinks=False):
                    foreign.add(f"{owner.name}/{name}")
                    continue
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                if name.startswith(PART_PREFIX):
                    dead = mtime + STALE_PART_SECONDS < now
                elif name.endswith(META_SUFFIX):
                    # Its file is gone, and it is not one being written.
                    dead = (name[:-len(META_SUFFIX)] not in entries
                            and mtime + STALE_PART_SECONDS < now)
                else:
                    dead = mtime + expiry < now
                    if dead:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(owner.path, name + META_SUFFIX))
                if dead:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
        self._report(foreign)
        return removed

    def remove_owner(self, owner: str) -> int:
        """Remove everything the store holds for `owner` (an account that
        was deleted), then the directory if that left it empty; how many
        files were removed. Foreign names in it stay (and are reported)."""
        if not OWNER_RE.match(owner):
            raise ValueError(f"not an owner id: {owner!r}")
        directory = self._owner_dir(owner)
        removed = 0
        foreign: set[str] = set()
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not is_ours(entry.name) or not entry.is_file(follow_symlinks=False):
                foreign.add(f"{owner}/{entry.name}")
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
        if not foreign:
            # Another shard may be removing it too, or an upload may have
            # just started in it: either way it is not ours to insist on.
            with contextlib.suppress(FileNotFoundError, OSError):
                directory.rmdir()
        self._report(foreign | set(self.foreign_entries()))
        return removed

    def _report(self, foreign: set[str]) -> None:
        names = frozenset(foreign)
        if names and names != self._reported:
            shown = ", ".join(sorted(names)[:MAX_NAMES_SHOWN])
            extra = len(names) - MAX_NAMES_SHOWN
            more = f" and {extra} more" if extra > 0 else ""
            log.warning("%s holds %d entr%s the upload store did not write (%s%s); "
                        "left alone", self.root, len(names), "y" if len(names) == 1 else "ies",
                        shown, more)
        self._reported = names
