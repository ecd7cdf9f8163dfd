"""The slot service on `upload.<domain>` (XEP-0363 §3-§5): disco#info with
the store/file identity and the max-file-size form, and slot requests
answered with signed PUT/GET URLs or the XEP's errors."""

from __future__ import annotations

import datetime as dt
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from mlink.hooks import StanzaEvent
from mlink.modules.http_upload.slots import (
    SLOT_LIFETIME,
    Slot,
    SlotRefused,
    check_content_type,
    check_filename,
    check_size,
    new_slot_id,
    owner_id,
)
from mlink.modules.http_upload.storage import UploadStore
from mlink.modules.util import iq_result
from mlink.stream.errors import stanza_error

if TYPE_CHECKING:
    from mlink.module import Module
    from mlink.modules.http_upload import Options

UPLOAD_NS = "urn:xmpp:http:upload:0"
DISCO_INFO_NS = "http://jabber.org/protocol/disco#info"
DISCO_ITEMS_NS = "http://jabber.org/protocol/disco#items"
DATA_NS = "jabber:x:data"
SERVICE_NAME = "HTTP File Upload"
# Users whose slot buckets are remembered per shard; past this the full
# (idle) buckets are forgotten, which costs nothing: a full bucket is
# what a new user gets.
MAX_TRACKED_USERS = 10_000


class SlotLimiter:
    """Slot requests per user: `per_minute` at once, refilled at that rate
    per minute (a token bucket per user, on this shard)."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, user: str, per_minute: int, now: float) -> float:
        """0 when `user` may have a slot now (one is spent), else the
        seconds until one is available."""
        rate = per_minute / 60.0
        tokens, stamp = self._buckets.get(user, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - stamp) * rate)
        if tokens < 1.0:
            self._buckets[user] = (tokens, now)
            return (1.0 - tokens) / rate
        self._buckets[user] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_TRACKED_USERS:
            self._forget_full(per_minute, now)
        return 0.0

    def _forget_full(self, per_minute: int, now: float) -> None:
        rate = per_minute / 60.0
        self._buckets = {u: (t, s) for u, (t, s) in self._buckets.items()
                         if t + (now - s) * rate < per_minute}


def stamp(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class UploadService:
    """The XMPP side; `options()` gives the current options (reloadable)."""

    def __init__(self, module: Module, key: bytes, store: UploadStore,
                 options: Callable[[], Options], hosts: dict[str, str]) -> None:
        self.module = module
        self.key = key
        self.store = store
        self.options = options
        self.hosts = hosts  # upload domain -> its local domain
        self.limiter = SlotLimiter()

    async def hosted(self, event: StanzaEvent) -> bool:
        """Every stanza to `upload.<domain>` (`hosted/http_upload`)."""
        stanza = event.stanza
        if event.kind != "iq" or event.type not in ("get", "set") or event.to.local:
            return False  # the router refuses what needs refusing
        payload = stanza[0] if len(stanza) == 1 else None
        if payload is None or event.type != "get":
            return False
        if payload.tag == f"{{{DISCO_INFO_NS}}}query" and payload.get("node") is None:
            await self.module.router.route(iq_result(stanza, self.info()))
            return True
        if payload.tag == f"{{{DISCO_ITEMS_NS}}}query" and payload.get("node") is None:
            await self.module.router.route(
                iq_result(stanza, ET.Element(f"{{{DISCO_ITEMS_NS}}}query")))
            return True
        if payload.tag == f"{{{UPLOAD_NS}}}request":
            await self.request(event, payload)
            return True
        return False

    def info(self) -> ET.Element:
        """XEP-0363 §2: identity, feature and the max-file-size form."""
        query = ET.Element(f"{{{DISCO_INFO_NS}}}query")
        ET.SubElement(query, f"{{{DISCO_INFO_NS}}}identity",
                      {"category": "store", "type": "file", "name": SERVICE_NAME})
        for var in (DISCO_INFO_NS, UPLOAD_NS):
            ET.SubElement(query, f"{{{DISCO_INFO_NS}}}feature", {"var": var})
        form = ET.SubElement(query, f"{{{DATA_NS}}}x", {"type": "result"})
        for var, value in (("FORM_TYPE", UPLOAD_NS),
                           ("max-file-size", str(self.options().max_file_size))):
            field = ET.SubElement(form, f"{{{DATA_NS}}}field", {"var": var})
            if var == "FORM_TYPE":
                field.set("type", "hidden")
            ET.SubElement(field, f"{{{DATA_NS}}}value").text = value
        return query

    async def request(self, event: StanzaEvent, request: ET.Element) -> None:
        """A slot request (§4): checks in the order that tells the client
        the most useful thing first, then the slot."""
        stanza, router = event.stanza, self.module.router
        parent = self.hosts.get(event.to.domain)
        if event.origin is None or parent is None or event.sender.domain != parent \
                or not event.sender.local:
            await router.bounce(stanza, "not-allowed",
                                "only users of this domain may upload here")
            return
        options = self.options()
        try:
            name = check_filename(request.get("filename", ""))
            size = check_size(request.get("size"))
            content_type = check_content_type(request.get("content-type"))
        except SlotRefused as exc:
            await router.bounce(stanza, "bad-request", str(exc))
            return
        if size > options.max_file_size:
            await self._error(stanza, "not-acceptable", "modify",
                              f"the file is larger than {options.max_file_size} bytes",
                              self._too_large(options.max_file_size))
            return
        user = str(event.sender.bare)
        now = time.time()
        wait = self.limiter.take(user, options.slots_per_minute, now)
        if wait > 0:
            retry = ET.Element(f"{{{UPLOAD_NS}}}retry", {"stamp": stamp(now + wait + 1)})
            await self._error(stanza, "resource-constraint", "wait",
                              f"at most {options.slots_per_minute} uploads a minute", retry)
            return
        owner = owner_id(self.key, user)
        used = await trio.to_thread.run_sync(
            self.store.usage, owner, options.expiry_days * 86400.0, now)
        if used + size > options.quota:
            await self._error(stanza, "resource-constraint", "wait",
                              f"quota reached: {used} of {options.quota} bytes stored", None)
            return
        base = self.base_url(parent)
        if base is None:
            await router.bounce(stanza, "service-unavailable", "no HTTPS listener is open")
            return
        slot = Slot(owner, new_slot_id(), name, size, content_type,
                    int(now) + SLOT_LIFETIME)
        url = base + slot.path()
        answer = ET.Element(f"{{{UPLOAD_NS}}}slot")
        put = ET.SubElement(answer, f"{{{UPLOAD_NS}}}put", {"url": url})
        ET.SubElement(put, f"{{{UPLOAD_NS}}}header",
                      {"name": "Authorization"}).text = slot.authorization(self.key)
        ET.SubElement(answer, f"{{{UPLOAD_NS}}}get", {"url": url})
        self.module.log.info("upload slot for %s: %d bytes, %s", user, size,
                             content_type or "any type")
        await router.route(iq_result(stanza, answer))

    def base_url(self, parent: str) -> str | None:
        """`<public-url>` when set, else https://<domain>:<port> of this
        server's HTTPS (websocket-tls) listener."""
        options = self.options()
        if options.public_url:
            return options.public_url.rstrip("/")
        port = self.module.listener_port("websocket-tls")
        if port is None:
            return None
        return f"https://{parent}" + ("" if port == 443 else f":{port}")

    @staticmethod
    def _too_large(limit: int) -> ET.Element:
        element = ET.Element(f"{{{UPLOAD_NS}}}file-too-large")
        ET.SubElement(element, f"{{{UPLOAD_NS}}}max-file-size").text = str(limit)
        return element

    async def _error(self, stanza: ET.Element, condition: str, error_type: str, text: str,
                     extra: ET.Element | None) -> None:
        """A stanza error with the XEP's application-specific child."""
        reply = stanza_error(stanza, condition, text, error_type)
        if extra is not None:
            reply[-1].append(extra)
        await self.module.router.route(reply)
