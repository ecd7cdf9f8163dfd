"""Multi-user chat (XEP-0045) on `conference.<domain>`, with XEP-0249
direct invitations passing between clients untouched.

The package, one idea per file:
- `roles`: affiliations, roles and who may change them;
- `config`: a room's configuration and the `muc#roomconfig` form;
- `room`: one room's state and rules, sans-IO;
- `service`: the rooms of this shard, creation limits, delivery, the
  service's disco, the room listing shared between shards, history kept
  in the module store;
- `persist`: persistent rooms as directory entries, followed through the
  change feed;
- `options`: the module's settings.

The core knows nothing of multi-user chat: the module serves its
subdomains with `Module.add_host`, so the router hands it every stanza for
`conference.<domain>` and the JIDs under it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlink.modules.muc.options import OPTIONS, Options
from mlink.modules.muc.persist import RoomDirectory, rooms_dn
from mlink.modules.muc.room import MUC_NS
from mlink.modules.muc.service import LISTING_CHANNEL, ROOM_CHANNEL, MucService
from mlink.modules.stream_management import ack_barriers
from mlink.router.directory_watch import watch_of

if TYPE_CHECKING:
    from mlink.module import Module

__all__ = ["OPTIONS", "Options", "setup", "service_hosts"]

# The name other code (the command line, tests) finds this shard's service by.
SERVICE = "muc/service"


def service_hosts(options: Options, domains: frozenset[str]) -> dict[str, str]:
    """Service domain -> the local domain it belongs to."""
    if options.hosts:
        found = {}
        for host in options.hosts:
            parent = next((d for d in domains if host.endswith("." + d)), None)
            if parent is None:
                raise ValueError(f"muc host {host!r} is not a subdomain of a local domain")
            found[host] = parent
        return found
    if not options.prefix:
        return {}
    return {f"{options.prefix}.{domain}": domain for domain in sorted(domains)}


def setup(module: Module) -> None:
    options = module.options if isinstance(module.options, Options) else Options()
    hosts = service_hosts(options, module.domains)
    service = MucService(module, hosts)
    module.shared(SERVICE, lambda: service)
    for host, parent in hosts.items():
        module.add_host(host, parent, service.hosted)
    module.add_feature(MUC_NS)
    module.hook("server/stopping", lambda _: service.shutdown())
    module.hook("server/stopped", lambda _: service.archive.writer.flush())
    module.on_bus(service.from_bus, channel=ROOM_CHANNEL)
    module.on_bus(service.listing_received, channel=LISTING_CHANNEL)
    module.spawn(service.listing_publisher)
    module.spawn(service.idle_sweeper)
    module.spawn(service.unreached_checker)
    module.spawn(service.archive.writer.run)
    # An occupant's ack (XEP-0198) waits for this shard's room archive writes.
    ack_barriers(module).append(service.archive.writer.flush_bounded)
    module.spawn(service.archive.retention)
    if hosts:
        service.persist = RoomDirectory(module.directory,
                                        rooms_dn(module.directory, options.rooms_dn))
        watch_of(module).subscribe(service.on_directory_changes)
        module.spawn(service.follow_rooms)
