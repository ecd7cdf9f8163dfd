"""What other modules may do with an account's PEP nodes, and the event
that tells them a client changed one.

Why: XEP-0411 / XEP-0402 §5.3 keep bookmarks in step between PEP nodes and
private XML storage (`mlink.modules.bookmarks`); the PEP module's stores
are its own (`module.store` is namespaced by module), so it lends these
operations through `module.shared(ACCESS, …)` instead. They act as the
owner would, notifications included, but fire no `CHANGED` event: a
conversion writing one side must not be taken for a client's change and
converted back.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mlink.modules.pep.node import NodeConfig

# The name the PEP module shares `NodeAccess` under.
ACCESS = "pep/nodes"
# Fired after a client published to, retracted from, purged or deleted one
# of its nodes; payload: (owner bare JID, node).
CHANGED = "pep/changed"


@dataclass(frozen=True, slots=True)
class NodeAccess:
    # (owner, node) -> [(item id, payload)], oldest first; [] when no node.
    items: Callable[[str, str], Awaitable[list[tuple[str, ET.Element]]]]
    # (owner, node, item id, payload, config for a node that does not exist yet)
    publish: Callable[[str, str, str, ET.Element, NodeConfig], Awaitable[None]]
    # (owner, node, item ids): those that exist are retracted, subscribers told.
    retract: Callable[[str, str, list[str]], Awaitable[None]]
