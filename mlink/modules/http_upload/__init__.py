"""XEP-0363 HTTP File Upload: a slot service on `upload.<domain>`, and PUT
and GET of the files on the server's HTTPS (`websocket-tls`) listener
under `/upload/`.

Off by default: it needs an HTTPS listener that clients can reach under
the domain's name (or a `<public-url>` in front of it) and disk space an
administrator decided to give, so it is listed to be enabled:

    <module name="http_upload">
      <max-file-size>52428800</max-file-size>
      <quota>524288000</quota>
      <expiry-days>30</expiry-days>
    </module>

Files live under `<directory>` (default `<data>/upload`), outside any
web root, named by a keyed hash of the uploader and a random slot id
(`storage.py`). Slots are signed, not stored (`slots.py`), so the PUT
may reach any shard. The XMPP side is `service.py`, the HTTP side
`web.py`; docs/mobile.md describes the whole.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from mlink.config_schema import Int, Invalid, Kind, PathKind, option
from mlink.modules.http_upload.service import UPLOAD_NS, UploadService
from mlink.modules.http_upload.slots import PATH_PREFIX, owner_id
from mlink.modules.http_upload.storage import MAX_NAMES_SHOWN, UploadStore, load_key
from mlink.modules.http_upload.web import UploadWeb

if TYPE_CHECKING:
    from mlink.config_schema import ParseEnv
    from mlink.module import Module

# The service's subdomain of every local domain.
HOST_PREFIX = "upload"
# Expired files are removed this often (and once at start); between two
# passes an expired file is already refused (its age is checked on GET).
SWEEP_INTERVAL = 3600.0
# Where the files go under the data directory when no <directory> is set.
DEFAULT_SUBDIR = "upload"
MIB = 1024 * 1024


class HttpsURL(Kind):
    doc = "https:// URL"

    def parse(self, raw: str, env: ParseEnv) -> str:
        url = raw.strip()
        if not url.lower().startswith("https://") or len(url) <= 8 or any(
                ch.isspace() or ch in "<>'\"\\?#" for ch in url):
            raise Invalid(f"must be an https:// URL, not {url!r}")
        return url.rstrip("/")


@dataclass(frozen=True, slots=True)
class Options:
    max_file_size: int = option(
        50 * MIB, kind=Int(minimum=1),
        doc="Largest file in bytes; announced in disco#info (XEP-0363 §2).",
        why="photos, voice messages and short videos fit; larger files are better sent "
            "by other means")
    quota: int = option(
        500 * MIB, kind=Int(minimum=1),
        doc="Bytes one user may have stored (files not yet expired).",
        why="ten files of the largest size; bounds what one account can fill")
    expiry_days: int = option(
        30, kind=Int(minimum=1, maximum=3650),
        doc="Days a file is kept; then it is refused and removed.",
        why="messages that link to a file are read within days; the disk is not an archive")
    slots_per_minute: int = option(
        20, kind=Int(minimum=1, maximum=10_000),
        doc="Upload slots one user may ask for per minute (per shard); more get an "
            "error with a `<retry>` time.",
        why="a person shares a few files a minute; a script asking for thousands is stopped")
    idle_timeout: int = option(
        30, kind=Int(minimum=1, maximum=600),
        doc="Seconds an upload or download may stall before the connection is dropped "
            "(a stalled upload's partial file is removed).",
        why="a mobile network pauses for seconds, not half a minute")
    directory: Path | None = option(
        None, kind=PathKind(), default_doc="`<data>/upload`",
        doc="Where the files are kept; outside any web root. Applies at restart.")
    public_url: str | None = option(
        None, kind=HttpsURL(), default_doc="`https://<domain>:<websocket-tls port>`",
        doc="The base URL of upload and download links, e.g. `https://files.example.org` "
            "when a reverse proxy forwards `/upload/` to the HTTPS listener.")


OPTIONS = Options


def service_hosts(options: object, domains: frozenset[str]) -> dict[str, str]:
    """Service domain -> the local domain it belongs to (`upload.<domain>`);
    the configuration check uses it too, to refuse a component of that name."""
    return {f"{HOST_PREFIX}.{domain}": domain for domain in sorted(domains)}


def setup(module: Module) -> None:
    def options() -> Options:
        current: Any = module.options
        return current if isinstance(current, Options) else Options()

    data_dir = module.config.data_dir
    root = options().directory or data_dir / DEFAULT_SUBDIR
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = load_key(data_dir)
    except OSError as exc:
        # The shard reports an OSError in one line and the server does
        # not start; the message says which module and which directory.
        raise OSError(exc.errno, f"http_upload: cannot use {exc.filename or root}: "
                                 f"{exc.strerror or exc}") from None
    store = UploadStore(root)
    foreign = store.foreign_entries()
    if foreign:
        # A root that holds other things is a mistake (a shared folder, the
        # data directory): the sweep would never touch them, but an
        # administrator deserves to hear at once that files go elsewhere.
        shown = ", ".join(repr(name) for name in foreign[:MAX_NAMES_SHOWN])
        raise OSError(errno.ENOTEMPTY,
                      f"http_upload: {root} holds {len(foreign)} foreign "
                      f"entr{'y' if len(foreign) == 1 else 'ies'} ({shown}), not uploads; "
                      "set <directory> to a directory of its own")
    hosts = service_hosts(options(), module.domains)
    service = UploadService(module, key, store, options, hosts)
    web = UploadWeb(key, store, options, module.log)
    for host, parent in hosts.items():
        module.add_host(host, parent, service.hosted)
    module.add_http_handler(PATH_PREFIX, web.handle)

    async def sweeper() -> None:
        """Remove expired files; one shard does it (any could)."""
        if module.owner("http_upload:sweep") != module.shard:
            return
        while True:
            removed = await trio.to_thread.run_sync(
                store.sweep, options().expiry_days * 86400.0, time.time())
            if removed:
                module.log.info("removed %d expired upload file(s)", removed)
            await trio.sleep(SWEEP_INTERVAL)

    module.spawn(sweeper)

    async def account_removed(user: str) -> None:
        """A deleted account's files go with it: otherwise a new account
        of the same JID (same owner id) would inherit their quota, and
        the links in old messages would keep working."""
        owner = owner_id(key, user)
        if module.owner(f"http_upload:{owner}") != module.shard:
            return  # every shard hears it; one removes the files
        try:
            removed = await trio.to_thread.run_sync(store.remove_owner, owner)
        except OSError as exc:
            module.log.warning("could not remove the uploads of %s: %s", user, exc)
            return
        if removed:
            module.log.info("removed %d upload file(s) of the deleted account %s",
                            removed, user)

    module.hook("account/removed", account_removed)


__all__ = ["OPTIONS", "UPLOAD_NS", "Options", "service_hosts", "setup"]
