"""Apply a reloaded configuration to a running server.

`mlink reload` and SIGHUP make the supervisor read the file again; each
shard then calls `reload_from_file`, which reads it itself (a snapshot
holds module option objects that do not cross a process boundary) and
`apply_config`s it. A file that cannot be used is refused with its
one-line `file:line: problem` and the running configuration stays:
everything that can fail (reading, profile checks, loading the new
certificate) happens before anything is swapped.

What changes live: the TLS certificate and key for new connections, the
log level, limits (stream settings are built per connection from
`server.config`), profile policies, the client listeners (`<listen>`
added, removed or changed: opened and closed on every shard, connections
already accepted staying up), and whatever modules take from the
`config/reloaded` event (their options, roster groups). What needs a
restart is listed by `restart_needed`, which the supervisor logs once.

A new listener that cannot be opened (its port in use, a privileged
port) refuses the whole reload on that shard, with one line naming it:
its sockets are bound before anything is swapped, so nothing changes.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlink.config import ConfigError, load_config
from mlink.config_model import Config

if TYPE_CHECKING:
    from mlink.server import Server
    from mlink.transport.tls import ServerTLS

log = logging.getLogger(__name__)

# The event modules hook to take a new configuration (the new Config is
# the event); it fires after the server's own settings are swapped.
RELOADED_EVENT = "config/reloaded"

# Settings that only a restart applies, by the name the log gives them:
# the served domains (the router and directory are
# built for them), the directory connection, where the store lives, the
# WebSocket endpoints (built per listener at start) and which modules run.
RESTART_SETTINGS: tuple[tuple[str, Callable[[Config], object]], ...] = (
    ("domains (<domain>)", lambda c: c.domains),
    ("directory backend and servers (<directory>)", lambda c: c.directory),
    ("configuration source (<configuration>)", lambda c: c.configuration),
    ("data directory (<data dir>)", lambda c: c.data_dir),
    ("WebSocket settings (<websocket>)", lambda c: c.websocket),
    ("module list (<modules>)", lambda c: c.modules),
    ("static roster attribute (<rosters static-attribute>)",
     lambda c: c.rosters.static_attribute),
    ("web console listener (<console>)",
     lambda c: (c.console.enabled, c.console.address, c.console.port)),
    ("component port and names (<components>)",
     lambda c: (c.components.address, c.components.port,
                tuple(x.name for x in c.components.components))),
)


class ReloadError(Exception):
    """A configuration that loads but cannot be applied (a certificate
    that does not parse, a profile policy that cannot work); one line."""


def restart_needed(old: Config, new: Config) -> list[str]:
    """The settings that differ between `old` and `new` and keep their old
    value until the server restarts."""
    return [name for name, get in RESTART_SETTINGS if get(old) != get(new)]


def load_checked(path: Path) -> Config:
    """`load_config` plus the checks only feature code can make (unknown
    profile field names), as `mlink check` and `mlink serve` do; every
    problem raised as a one-line ConfigError."""
    from mlink.profile import check_profiles

    config = load_config(path)
    problems = check_profiles(config)
    if problems:
        raise ConfigError(path, None, problems[0])
    return config


async def load_checked_async(path: Path) -> Config:
    """`load_checked` from inside a Trio loop: a configuration held in the
    directory (mlink.config_directory) is read without blocking the loop;
    a file is read as before."""
    from mlink.config import _parse_xml, _read
    from mlink.config_directory import is_directory_source, load_directory_source_async

    if not is_directory_source(_parse_xml(Path(path), _read(Path(path)))[0]):
        return load_checked(path)
    from mlink.profile import check_profiles

    config = await load_directory_source_async(path)
    problems = check_profiles(config)
    if problems:
        raise ConfigError(path, None, problems[0])
    return config


def _new_tls(config: Config) -> ServerTLS | None:
    """A ServerTLS for `config`, read now: a certificate renewed in place
    (Let's Encrypt rewrites the same path) is picked up too."""
    from mlink.transport.tls import ServerTLS

    tls = config.tls
    if tls.certificate is None or tls.key is None:
        return None
    try:
        return ServerTLS(tls.certificate, tls.key, tls.client_cas)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ReloadError(f"{config.path}: cannot load certificate {str(tls.certificate)!r} "
                          f"with key {str(tls.key)!r}: {exc}") from None


def _set_log_level(level: str) -> None:
    logging.getLogger().setLevel(getattr(logging, level.upper(), logging.INFO))


async def apply_config(server: Server, new: Config) -> list[str]:
    """Make `new` the running configuration of `server`, applying what can
    change live; ReloadError, with nothing changed, when it cannot be.
    Returns what happened to listeners (`listening for c2s on ...`).

    New connections read `server.config` and `server.tls` when they start,
    so swapping them is what makes limits and the certificate apply to new
    connections while established ones keep what they negotiated.
    """
    from mlink.profile.fields import ProfileConfigError

    tls = _new_tls(new)
    profiles = server.shared_services.get("profiles")
    if profiles is not None:
        from mlink.profile.fields import resolve_fields

        try:
            resolve_fields(new)
        except ProfileConfigError as exc:
            raise ReloadError(f"{new.path}: {exc}") from None
    from mlink.transport.listeners import ListenerError

    try:
        listeners = await server.prepare_listeners(new, tls)
    except ListenerError as exc:
        raise ReloadError(f"{new.path}: {exc.strerror}") from None
    # Nothing below fails: the bound sockets are committed, never dropped.
    old = server.config
    if tls is not None:
        tls.trust_client_cas(server.module_client_cas)
    server.tls = tls
    from mlink.jid import set_cache_size

    set_cache_size(new.caches.jids)
    server.config = new
    server.apply_limits()
    if new.log_level != old.log_level:
        _set_log_level(new.log_level)
        log.info("log level is now %s", new.log_level)
    if profiles is not None:
        profiles.apply_config(new)
    changed = server.commit_listeners(listeners)
    await server.hooks.notify(RELOADED_EVENT, new)
    return changed


async def reload_from_file(server: Server, path: Path | None = None) -> dict[str, Any]:
    """Read `path` (default: the file the server was started from) and
    apply it. The result goes back to the supervisor as is: `ok`, and
    `error` (one line) when the file was refused."""
    path = path or server.config.path
    if path is None:
        return {"ok": False, "error": "the server was not started from a file"}
    try:
        new = await load_checked_async(path)
        listeners = await apply_config(server, new)
    except (ConfigError, ReloadError) as exc:
        log.error("configuration reload refused: %s", exc)
        return {"ok": False, "error": str(exc)}
    source = new.configuration
    log.info("configuration reloaded from %s", f"the directory entry {source.entry}"
             if source.source == "directory" else path)
    return {"ok": True, "listeners": listeners}
