"""XEP-0215 external service discovery: the STUN and TURN servers clients
use for audio/video calls (Jingle), as configured.

    <module name="external_services">
      <services>stun:stun.example.org turn:turn.example.org?transport=udp
                turns:turn.example.org:5349?transport=tcp</services>
      <secret>shared secret of the TURN server</secret>
      <ttl>86400</ttl>
    </module>

Services are written as RFC 7064 / RFC 7065 URIs (`stun:`, `stuns:`,
`turn:`, `turns:`; port 3478, or 5349 for the TLS schemes, when none is
given; `?transport=udp|tcp`). With a `<secret>`, TURN services come with
time-limited credentials in the TURN REST API form that coturn, eturnal
and others check with the same shared secret (`use-auth-secret`):
username `<expiry>:<user's bare JID>`, password base64(HMAC-SHA1(secret,
username)), and `expires`/`restricted='1'` on the service. Without one,
TURN services are listed without credentials.

Only local users may ask (iq-get to the server); `<services type='turn'/>`
filters by type; `<credentials><service host type/></credentials>` asks
for one service's credentials (`item-not-found` for one not configured).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlink.config_schema import Int, Invalid, Kind, Raw, option
from mlink.hooks import StanzaEvent
from mlink.modules.util import iq_result

if TYPE_CHECKING:
    from mlink.config_schema import ParseEnv
    from mlink.module import Module

EXTDISCO_NS = "urn:xmpp:extdisco:2"
SCHEMES = {"stun": ("stun", 3478, False), "stuns": ("stun", 5349, True),
           "turn": ("turn", 3478, False), "turns": ("turn", 5349, True)}
# RFC 7064/7065: scheme ":" host [":" port] ["?transport=" udp|tcp]; the
# host is a name, an IPv4 address or a bracketed IPv6 address.
URI_RE = re.compile(r"^(stuns?|turns?):(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?"
                    r"(?:\?transport=(udp|tcp))?$")
# Services one configuration may list: a handful in practice.
MAX_SERVICES = 32


@dataclass(frozen=True, slots=True)
class Service:
    scheme: str
    type: str
    host: str
    port: int
    transport: str

    def element(self) -> ET.Element:
        attrs = {"type": self.type, "host": self.host, "port": str(self.port),
                 "transport": self.transport}
        return ET.Element(f"{{{EXTDISCO_NS}}}service", attrs)


def parse_services(raw: str) -> tuple[Service, ...]:
    """Services from whitespace-separated STUN/TURN URIs; ValueError
    naming the one that is not."""
    services = []
    for uri in raw.split():
        m = URI_RE.match(uri)
        if m is None:
            raise ValueError(f"{uri!r} is not a stun:, stuns:, turn: or turns: URI")
        scheme, host, port, transport = m.groups()
        kind, default_port, secure = SCHEMES[scheme]
        number = int(port) if port else default_port
        if not 0 < number < 65536:
            raise ValueError(f"{uri!r}: port out of range")
        services.append(Service(scheme, kind, host.strip("[]"), number,
                                transport or ("tcp" if secure else "udp")))
    if len(services) > MAX_SERVICES:
        raise ValueError(f"at most {MAX_SERVICES} services")
    return tuple(services)


class ServiceList(Kind):
    doc = "stun:/stuns:/turn:/turns: URIs, separated by spaces"

    def parse(self, raw: str, env: ParseEnv) -> tuple[Service, ...]:
        try:
            return parse_services(raw)
        except ValueError as exc:
            raise Invalid(str(exc)) from None

    def render(self, value: Any, base: Path) -> str:
        return " ".join(f"{s.scheme}:{s.host}:{s.port}?transport={s.transport}"
                        for s in value)


@dataclass(frozen=True, slots=True)
class Options:
    services: tuple[Service, ...] = option(
        (), kind=ServiceList(), default_doc="none",
        doc="The STUN and TURN servers to announce, as RFC 7064/7065 URIs.")
    secret: str | None = option(
        None, kind=Raw(), default_doc="none",
        doc="The TURN server's shared secret (TURN REST API, coturn's "
            "`static-auth-secret`): TURN services then carry credentials.")
    ttl: int = option(
        86400, kind=Int(minimum=60, maximum=30 * 86400),
        doc="Seconds TURN credentials stay valid.",
        why="a day covers any call started with them; a leaked pair expires on its own")


OPTIONS = Options


def turn_credentials(secret: str, user: str, ttl: int, now: float) -> tuple[str, str, float]:
    """(username, password, expiry) in the TURN REST API form."""
    expires = int(now) + ttl
    username = f"{expires}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii"), float(expires)


def stamp(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def setup(module: Module) -> None:
    router = module.router

    def described(service: Service, user: str) -> ET.Element:
        element = service.element()
        options: Options | None = module.options
        if service.type == "turn" and options is not None and options.secret:
            username, password, expires = turn_credentials(
                options.secret, user, options.ttl, time.time())
            element.set("username", username)
            element.set("password", password)
            element.set("expires", stamp(expires))
            element.set("restricted", "1")
        return element

    async def services(event: StanzaEvent) -> bool:
        request = event.stanza[0]
        tag = request.tag.rpartition("}")[2]
        if tag not in ("services", "credentials"):
            return False
        if event.origin is None:
            await router.bounce(event.stanza, "forbidden", "for local users only")
            return True
        options: Options | None = module.options
        configured = options.services if options is not None else ()
        user = str(event.sender.bare)
        answer = ET.Element(f"{{{EXTDISCO_NS}}}{tag}")
        if tag == "services":
            wanted = request.get("type")
            for service in configured:
                if wanted is None or service.type == wanted:
                    answer.append(described(service, user))
        else:
            asked = request.find(f"{{{EXTDISCO_NS}}}service")
            if asked is None:
                await router.bounce(event.stanza, "bad-request", "name a service")
                return True
            found = [s for s in configured if s.host == asked.get("host")
                     and s.type == asked.get("type", s.type)
                     and (asked.get("port") is None or str(s.port) == asked.get("port"))]
            if not found:
                await router.bounce(event.stanza, "item-not-found", "no such service")
                return True
            answer.append(described(found[0], user))
        await router.route(iq_result(event.stanza, answer))
        return True

    module.add_feature(EXTDISCO_NS)
    module.hook(f"iq-get/host/{EXTDISCO_NS}", services)
