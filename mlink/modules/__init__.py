"""Features, one module each; `load_modules` registers them on the hooks.

A module is a file with `register(server)`: it declares the disco features
it adds and hooks the events it handles (see `mlink.hooks`). It talks to
clients only through `server.router`, and to data only through
`server.directory` and `server.store`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlink.modules import (
    avatar,
    blocking,
    carbons,
    disco,
    last,
    offline,
    ping,
    presence,
    private,
    roster,
    shared_groups,
    subscription,
    user_profile,
    vcard,
    version,
)

if TYPE_CHECKING:
    from mlink.server import Server

# Order matters only where two modules hook one event at the same priority.
MODULES = (
    roster, presence, subscription, offline, blocking, carbons, disco, ping, version, last, private,
    vcard, user_profile, avatar,
    shared_groups,
)


def load_modules(server: Server) -> None:
    for module in MODULES:
        module.register(server)
    # XEP-0115: the caps hash covers every module's features, so it can
    # only be computed once all have registered.
    server.hooks.stream_features.append(disco.caps_element(server))
