"""Log in with slixmpp, a real client library, and report what happened."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path

import slixmpp

# A login on loopback takes milliseconds; this bounds a hung one.
LOGIN_TIMEOUT = 20.0


@dataclass
class LoginResult:
    bound_jid: str | None
    failed_auth: bool
    pong: bool


def slixmpp_login(jid: str, password: str, port: int, mechanism: str, ca_file: Path,
                  direct_tls: bool = False, tls12: bool = False) -> LoginResult:
    """Connect, authenticate with `mechanism`, bind, ping the server, leave.

    `tls12` caps TLS at 1.2: slixmpp on Python 3.11 can only get channel-
    binding data (tls-unique) there, so -PLUS mechanisms need it."""

    async def run() -> LoginResult:
        client = slixmpp.ClientXMPP(jid, password, sasl_mech=mechanism)
        client.register_plugin("xep_0199")
        ctx = ssl.create_default_context(cafile=str(ca_file))
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        client.ssl_context = ctx
        client.enable_direct_tls = direct_tls
        client.enable_starttls = not direct_tls
        result = LoginResult(None, False, False)
        done = asyncio.get_running_loop().create_future()

        async def on_start(_event: object) -> None:
            result.bound_jid = str(client.boundjid)
            try:
                await client.plugin["xep_0199"].send_ping(client.boundjid.domain, timeout=5)
                result.pong = True
            finally:
                client.disconnect()

        def on_failed(_event: object) -> None:
            result.failed_auth = True
            client.disconnect()

        client.add_event_handler("session_start", on_start)
        client.add_event_handler("failed_all_auth", on_failed)
        client.add_event_handler("disconnected", lambda _e: done.done() or done.set_result(None))
        client.connect(host="127.0.0.1", port=port)
        try:
            await asyncio.wait_for(done, LOGIN_TIMEOUT)
        finally:
            client.abort() if hasattr(client, "abort") else None
        return result

    return asyncio.run(run())
