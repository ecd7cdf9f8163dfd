"""A module that lives outside mlink/: the proof that the core is open
(issue 11). It declares a replicated per-session field, a stream feature,
a SASL mechanism with its own credential source, and handlers that crash or
hold on purpose, all through its `Module` context and without any edit to
a file under mlink/.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from typing import Any

import trio

from mlink.hooks import StanzaEvent
from mlink.jid import InvalidJID, parse_jid
from mlink.module import Codec, Module
from mlink.modules.util import iq_result
from mlink.sasl.events import Challenge, Failure, Success
from mlink.sasl.registry import NeedCredential, SaslStreamInfo

PROBE_NS = "urn:mlink:test:probe"
MECHANISM = "X-MLINK-TOKEN"
TOKEN_KIND = "x-mlink-token"


class TokenMechanism:
    """Initial response "user\\0token"; the token is checked by the module's
    credential source."""

    name = MECHANISM

    def __init__(self) -> None:
        self._user = ""

    def receive(self, data: bytes | None) -> Any:
        if data is None:
            return Challenge(b"")
        user, sep, token = data.decode("utf-8", "replace").partition("\0")
        if not sep or not user:
            return Failure("malformed-request")
        self._user = user
        return NeedCredential(TOKEN_KIND, user, None, {"token": token})

    def provide(self, answer: Any) -> Any:
        if answer is True:
            return Success(None, self._user, None)
        return Failure("not-authorized")


class TokenProvider:
    name = MECHANISM
    strength = 50

    def offered(self, stream: SaslStreamInfo) -> bool:
        return stream.tls_active

    def create(self, stream: SaslStreamInfo) -> TokenMechanism:
        return TokenMechanism()


def block_the_loop(seconds: float) -> None:
    """A handler that forgets to await: the loop watchdog must name it."""
    time.sleep(seconds)


def setup(module: Module) -> None:
    tag = module.session_field("tag", "", Codec(str.encode, lambda b: b.decode()))
    released = trio.Event()

    async def check_token(jid: str, request: NeedCredential) -> bool:
        return bool(request.detail["token"] == "token-for-" + jid.partition("@")[0])

    async def handle_set(event: StanzaEvent) -> bool:
        child = event.stanza[0]
        name = child.tag.rpartition("}")[2]
        if name == "tag" and event.origin is not None:
            tag.set(event.origin, child.get("value", ""))
        elif name == "crash":
            raise RuntimeError("the probe module crashes on purpose")
        elif name == "hold":
            module.log.info("holding %s", event.stanza.get("id"))
            await released.wait()
        elif name == "release":
            released.set()
        elif name == "block":
            block_the_loop(float(child.get("seconds", "0.3")))
        await module.router.route(iq_result(event.stanza))
        return True

    async def handle_get(event: StanzaEvent) -> bool:
        try:
            full = parse_jid(event.stanza[0].get("jid", ""))
        except InvalidJID:
            await module.router.bounce(event.stanza, "jid-malformed")
            return True
        info = module.router.session(full)
        answer = ET.Element(f"{{{PROBE_NS}}}tag",
                            {"value": tag.get(info) if info is not None else "-"})
        await module.router.route(iq_result(event.stanza, answer))
        return True

    module.add_feature(PROBE_NS)
    module.hook(f"iq-set/self/{PROBE_NS}", handle_set)
    module.hook(f"iq-get/self/{PROBE_NS}", handle_get)
    module.add_stream_feature(lambda stream: ET.Element(f"{{{PROBE_NS}}}probe"),
                              authenticated=True)
    module.add_sasl_mechanism(TokenProvider())
    module.add_credential_source(TOKEN_KIND, check_token)
