"""Where each external component (XEP-0114) is connected, and delivery to it.

A component connects to one shard (the kernel picks which, as for any
connection). Its domain is served by the router as a hosted domain of the
service `component` (so `hosted/component` fires for every stanza to it,
and the parent domain's disco#items lists it); this table answers those
events: down the local connection, over the bus to the shard that has the
connection, or `service-unavailable` when it is connected nowhere. A
stanza for a component is never dropped silently.

Shards tell each other when a component connects or leaves (bus channel
`component/up`, `component/down`), send a newly (re)started peer what
they hold (hook `cluster/peer-up`), and forget what a dead peer held
(`cluster/peer-down`). The same table refuses a second connection for a
connected domain (`conflict`); two connections racing on two shards in
the same moment could both be taken (docs/architecture.md says so).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import Protocol

from mlink.hooks import Hooks, StanzaEvent
from mlink.router.router import HostedDomain, Router
from mlink.xml.serialize import CLIENT_NS, serialize

log = logging.getLogger(__name__)

SERVICE = "component"
# Bus channels (the server's module-bus mechanism, under the name `component`).
UP, DOWN, STANZA = f"{SERVICE}/up", f"{SERVICE}/down", f"{SERVICE}/stanza"

_WRAP_OPEN = f"<s xmlns='{CLIENT_NS}'>".encode()
_WRAP_CLOSE = b"</s>"


class ComponentLink(Protocol):
    """What the table needs of a component's connection."""

    def deliver(self, stanza: ET.Element) -> bool:
        """Queue `stanza` for the component; False when it is ending."""


# (channel, payload, shard or None for every other) -> whether it was queued.
BusSend = Callable[[str, bytes, int | None], bool]


class ComponentTable:
    """The component domains of this server and who holds their connections."""

    def __init__(self, router: Router, hooks: Hooks, domains: list[str]) -> None:
        self.router = router
        self.local: dict[str, ComponentLink] = {}
        self.remote: dict[str, int] = {}
        self._send: BusSend | None = None
        # The names served since the start (a reload changes only secrets).
        self.domains = frozenset(domains)
        for domain in domains:
            router.hosted[domain] = HostedDomain(_parent(domain, router.domains), SERVICE)
        hooks.on(f"hosted/{SERVICE}", self._hosted)
        hooks.on("cluster/peer-up", self._peer_up)
        hooks.on("cluster/peer-down", self._peer_down)

    def attach(self, send: BusSend,
               subscribe: Callable[[str, Callable[[int, bytes], Awaitable[None]]], None]
               ) -> None:
        """Talk to the tables of the other shards through the bus."""
        self._send = send
        subscribe(UP, self._remote_up)
        subscribe(DOWN, self._remote_down)
        subscribe(STANZA, self._remote_stanza)

    # -- connections --------------------------------------------------------------

    def connected(self, domain: str) -> bool:
        return domain in self.local or domain in self.remote

    def claim(self, domain: str, link: ComponentLink) -> bool:
        """Take `domain` for `link`; False (conflict) when it is connected
        here or on another shard already."""
        if self.connected(domain):
            return False
        self.local[domain] = link
        if self._send is not None:
            self._send(UP, domain.encode(), None)
        return True

    def release(self, domain: str, link: ComponentLink) -> None:
        if self.local.get(domain) is link:
            del self.local[domain]
            if self._send is not None:
                self._send(DOWN, domain.encode(), None)

    # -- delivery ------------------------------------------------------------------

    async def _hosted(self, event: StanzaEvent) -> bool:
        domain = event.to.domain
        stanza = event.stanza
        link = self.local.get(domain)
        if link is not None and link.deliver(stanza):
            return True
        shard = self.remote.get(domain)
        if shard is not None and self._send is not None:
            payload = domain.encode() + b"\0" + serialize(stanza, CLIENT_NS)
            if self._send(STANZA, payload, shard):
                return True
        await self._unavailable(stanza)
        return True

    async def _unavailable(self, stanza: ET.Element) -> None:
        """RFC 6120 §10.4.3: the component is not reachable now."""
        if stanza.tag.rpartition("}")[2] == "presence":
            return  # presence is not bounced (RFC 6121 §8.5)
        await self.router.bounce(stanza, "service-unavailable", "the component is not connected")

    # -- the other shards ------------------------------------------------------------

    async def _remote_up(self, source: int, payload: bytes) -> None:
        domain = payload.decode()
        if domain in self.router.hosted:
            self.remote[domain] = source
            log.info("component %s is on shard %d", domain, source)

    async def _remote_down(self, source: int, payload: bytes) -> None:
        domain = payload.decode()
        if self.remote.get(domain) == source:
            del self.remote[domain]
            log.info("component %s left shard %d", domain, source)

    async def _remote_stanza(self, source: int, payload: bytes) -> None:
        raw_domain, _, data = payload.partition(b"\0")
        stanza = ET.fromstring(_WRAP_OPEN + data + _WRAP_CLOSE)[0]
        link = self.local.get(raw_domain.decode())
        if link is None or not link.deliver(stanza):
            # It left between the sender's look-up and now.
            await self._unavailable(stanza)

    async def _peer_up(self, shard: object) -> None:
        if not isinstance(shard, int) or self._send is None:
            return
        for domain in list(self.remote):
            if self.remote[domain] == shard:
                del self.remote[domain]  # it restarted: it holds nothing now
        for domain in self.local:
            self._send(UP, domain.encode(), shard)

    async def _peer_down(self, shard: object) -> None:
        for domain in [d for d, s in self.remote.items() if s == shard]:
            del self.remote[domain]
            log.info("component %s was on shard %s, which is gone", domain, shard)


def _parent(domain: str, served: frozenset[str]) -> str:
    """The served domain whose disco#items lists `domain`: the one it is a
    subdomain of, or the first one."""
    under = [d for d in served if domain.endswith("." + d)]
    return max(under, key=len) if under else sorted(served)[0]

