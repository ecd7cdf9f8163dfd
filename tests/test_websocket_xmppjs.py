"""A real web client: xmpp.js (npm @xmpp/client, version pinned in
tests/js/package.json) logs in to mlink over ws:// with SCRAM and chats
with slixmpp connected over TCP.

The npm packages are installed here (`npm ci`) when missing, so the test
command is all CI needs; only a machine without Node.js skips.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
import slixmpp

from tests.serverproc import ALICE_PW, BOB, BOB_PW, DOMAIN, MlinkProcess

JS_DIR = Path(__file__).resolve().parent / "js"
# `npm ci` of a handful of small packages; generous for a slow registry.
NPM_TIMEOUT = 300
# The whole exchange takes well under a second on loopback.
CHAT_TIMEOUT = 60.0


@pytest.fixture(scope="session")
def node() -> str:
    """Node.js with tests/js's packages installed (`npm ci` when stale)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed (tools/setup --test installs it)")
    npm = shutil.which("npm")
    assert npm is not None, "Node.js is installed but npm is not: run tools/setup --test"
    marker = JS_DIR / "node_modules" / ".package-lock.json"
    lock = JS_DIR / "package-lock.json"
    if not marker.exists() or marker.stat().st_mtime < lock.stat().st_mtime:
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR,
                              capture_output=True, text=True, timeout=NPM_TIMEOUT)
        assert proc.returncode == 0, f"npm ci failed:\n{proc.stdout}\n{proc.stderr}"
    return node


def test_xmppjs_chats_with_slixmpp(node: str, embedded_server: MlinkProcess,
                                   ca_file: Path) -> None:
    assert embedded_server.ws_port is not None
    since = embedded_server.log.mark()
    service = f"ws://localhost:{embedded_server.ws_port}/xmpp-websocket"

    async def chat() -> tuple[int, list[dict[str, str]], str, list[tuple[str, str]]]:
        bob = slixmpp.ClientXMPP(f"{BOB}/slix", BOB_PW, sasl_mech="SCRAM-SHA-256")
        bob.ssl_context = ssl.create_default_context(cafile=str(ca_file))
        received: list[tuple[str, str]] = []
        ready = asyncio.get_running_loop().create_future()

        def on_message(msg: slixmpp.Message) -> None:
            if msg["body"]:
                received.append((str(msg["from"]), msg["body"]))
                msg.reply(f"pong: {msg['body']}").send()

        bob.add_event_handler("session_start", lambda _e: ready.done() or ready.set_result(None))
        bob.add_event_handler("message", on_message)
        bob.connect(host="127.0.0.1", port=embedded_server.c2s_port)
        try:
            await asyncio.wait_for(ready, CHAT_TIMEOUT)
            proc = await asyncio.create_subprocess_exec(
                node, str(JS_DIR / "chat.mjs"), service, DOMAIN, "alice", ALICE_PW,
                f"{BOB}/slix", "ping from xmpp.js",
                cwd=JS_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(), CHAT_TIMEOUT)
            except TimeoutError:
                proc.kill()
                raise
        finally:
            bob.disconnect()
        events = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
        assert proc.returncode is not None
        return proc.returncode, events, err.decode(), received

    code, events, stderr, received = asyncio.run(chat())
    assert code == 0, f"xmpp.js exited {code}: {events}\n{stderr}"
    online = next(e for e in events if e["event"] == "online")
    assert online["jid"] == "alice@localhost/xmppjs"
    assert received == [("alice@localhost/xmppjs", "ping from xmpp.js")]
    reply = next(e for e in events if e["event"] == "message")
    assert reply == {"event": "message", "from": f"{BOB}/slix",
                     "body": "pong: ping from xmpp.js"}
    assert events[-1] == {"event": "stopped"}
    embedded_server.wait_for_log(r"authenticated alice@localhost with SCRAM-SHA-(1|256)\b",
                                 since=since)
