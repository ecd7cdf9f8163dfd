"""Listeners changed live by a reload: a `<listen>` added is opened on every
shard, a removed one closed with the sessions accepted on it left up, and
a new one whose port cannot be bound refuses the reload with one line and
leaves the old listeners serving.

Two levels: the real `mlink serve` (one shard and two) driven by `mlink
reload`, and one Server in-process, where the shard's own refusal (after
the supervisor's check) is reached directly. Synchronisation is on
`mlink reload`'s answer, which comes once every shard has applied the
file, never on sleeps."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from mlink.config import load_config
from mlink.config_model import Config, ListenerConfig
from mlink.reload import ReloadError, apply_config
from mlink.server import Server
from tests.rawclient import RawClient, ping, read_stanza
from tests.serverproc import (
    ALICE,
    ALICE_PW,
    BOB,
    BOB_PW,
    DOMAIN,
    MlinkProcess,
    free_ports,
    mlink,
    start_mlink,
)

# Bounds every in-process step; each answer is immediate.
STEP_TIMEOUT = 10.0
HOST_META = b"GET /.well-known/host-meta HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def edit(server: MlinkProcess, old: str, new: str) -> None:
    text = server.config.read_text()
    assert re.search(old, text), old
    server.config.write_text(re.sub(old, new, text, count=1))


def refused(port: int) -> bool:
    """True when nothing accepts on 127.0.0.1:`port` any more."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT):
            return False
    except ConnectionRefusedError:
        return True


@contextlib.contextmanager
def port_taken() -> Iterator[int]:
    """A free port held, listening, by another socket (without
    SO_REUSEPORT): what another program on the port looks like."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", free_ports(1)[0]))
        blocker.listen(1)
        yield blocker.getsockname()[1]


# -- the real server, 1 and 2 shards --------------------------------------------------


@pytest.mark.parametrize("shards", [1, 2])
def test_listener_added_then_removed_keeps_established_sessions(
        tmp_path: Path, cert_files: tuple[Path, Path], ca_file: Path, shards: int) -> None:
    users = {ALICE: ALICE_PW, BOB: BOB_PW}
    with start_mlink(tmp_path / "setup", DOMAIN, cert_files, users=users,
                     shards=shards) as server:
        old_port = server.c2s_port
        established = RawClient(old_port, ca_file)
        later = RawClient(server.c2s_port, ca_file)  # accepted, no stream yet
        newcomer: RawClient | None = None
        try:
            alice = established.login(DOMAIN, ALICE, ALICE_PW, resource="old")
            new_port = free_ports(1)[0]
            found = re.search(r'<listen type="c2s"[^>]*/>', server.config.read_text())
            assert found
            old_line = found.group(0)
            # Added: opened on every shard, the old one still serving.
            edit(server, r"(<listen type=\"c2s\"[^>]*/>)",
                 rf'\1\n  <listen type="c2s" port="{new_port}" address="127.0.0.1"/>')
            done = mlink("reload", "--config", str(server.config))
            assert f"listening for c2s on 127.0.0.1 port {new_port}" in done.stdout, done.stdout
            assert "needs a restart" not in done.stdout
            status = mlink("status", "--config", str(server.config)).stdout
            assert f"c2s 127.0.0.1:{new_port}" in status and f":{old_port}" in status, status
            for _ in range(2 * shards):  # SO_REUSEPORT spreads them over the shards
                client = RawClient(new_port, ca_file)
                try:
                    client.login(DOMAIN, BOB, BOB_PW, resource="probe")
                finally:
                    client.close()
            # Removed: closed on every shard; what it accepted stays up.
            edit(server, r"\s*" + re.escape(old_line), "")
            done = mlink("reload", "--config", str(server.config))
            assert re.search(rf"stopped listening for c2s on \S+ port {old_port}", done.stdout), \
                done.stdout
            for _ in range(2 * shards):
                assert refused(old_port)
            status = mlink("status", "--config", str(server.config)).stdout
            assert f":{old_port}" not in status and f"c2s 127.0.0.1:{new_port}" in status
            ping(established, DOMAIN)
            newcomer = RawClient(new_port, ca_file)
            newcomer.login(DOMAIN, BOB, BOB_PW, resource="new")
            newcomer.send(f"<message to='{alice}' id='m1'><body>still here?</body></message>")
            assert read_stanza(established, "message", "m1").findtext(
                "{jabber:client}body") == "still here?"
            # Accepted before the close, it can still open its stream.
            later.login(DOMAIN, BOB, BOB_PW, resource="late")
        finally:
            established.close()
            later.close()
            if newcomer is not None:
                newcomer.close()
        assert "Traceback" not in server.log.text()


@pytest.mark.parametrize("shards", [1, 2])
def test_port_in_use_refuses_the_reload(tmp_path: Path, cert_files: tuple[Path, Path],
                                        ca_file: Path, shards: int) -> None:
    with start_mlink(tmp_path / "setup", DOMAIN, cert_files, users={ALICE: ALICE_PW},
                     shards=shards) as server, port_taken() as taken:
        good = server.config.read_text()
        edit(server, r"(<listen type=\"c2s\"[^>]*/>)",
             rf'\1\n  <listen type="c2s" port="{taken}" address="127.0.0.1"/>')
        edit(server, r'stanza-bytes="\d+"', 'stanza-bytes="10000"')
        mark = server.log.mark()
        done = mlink("reload", "--config", str(server.config), check=False)
        assert done.returncode == 1
        assert f"port {taken} on 127.0.0.1 is in use" in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        server.wait_for_log(rf"configuration reload refused: .*port {taken} .*in use",
                            since=mark)
        status = mlink("status", "--config", str(server.config)).stdout
        assert "last configuration change refused: " in status and str(taken) in status
        assert f":{taken}" not in status.split("last configuration")[0]
        # The old listeners serve, with the old limits.
        client = RawClient(server.c2s_port, ca_file)
        try:
            client.login(DOMAIN, ALICE, ALICE_PW)
        finally:
            client.close()
        # An address this host does not have (TEST-NET-1, RFC 5737).
        server.config.write_text(good.replace(
            "<listen ", f'<listen type="c2s" port="{taken}" address="192.0.2.1"/>\n  <listen ',
            1))
        done = mlink("reload", "--config", str(server.config), check=False)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert f"port {taken} on 192.0.2.1 cannot be bound: " in done.stderr, done.stderr
        server.config.write_text(good)
        done = mlink("reload", "--config", str(server.config))
        assert "configuration reloaded" in done.stdout
        assert "last configuration change refused" not in mlink(
            "status", "--config", str(server.config)).stdout


def test_port_zero_with_several_shards_is_refused(
        tmp_path: Path, cert_files: tuple[Path, Path]) -> None:
    with start_mlink(tmp_path / "setup", DOMAIN, cert_files, shards=2) as server:
        edit(server, r"(<listen type=\"c2s\"[^>]*/>)",
             r'\1\n  <listen type="c2s" port="0" address="127.0.0.1"/>')
        done = mlink("reload", "--config", str(server.config), check=False)
        assert done.returncode == 1 and "several shards need fixed listener ports" in done.stderr
        assert done.stderr.count("\n") == 1


# -- one shard in-process: its own refusal, WebSocket, a changed type ------------------


def _config(tmp_path: Path, cert_files: tuple[Path, Path]) -> Config:
    cert, key = cert_files
    setup = tmp_path / "setup"
    mlink("init", str(setup), "--domain", DOMAIN, "--c2s-port", "0", "--tls-port", "0",
          "--ws-port", "0", "--tls-cert", str(cert), "--tls-key", str(key))
    config = load_config(setup / "mlink.xml")
    return dataclasses.replace(config, listeners=(
        ListenerConfig(kind="c2s", port=0, address="127.0.0.1"),))


async def _stream_features(stream: trio.SocketStream) -> bytes:
    """Open an XMPP stream on `stream`; what the server sent up to its features."""
    await stream.send_all(f"<?xml version='1.0'?><stream:stream to='{DOMAIN}' version='1.0' "
                          "xmlns='jabber:client' "
                          "xmlns:stream='http://etherx.jabber.org/streams'>".encode())
    data = b""
    while b"</stream:features>" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, data
        data += chunk
    return data


async def _connect_refused(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return True
    await stream.aclose()
    return False


def test_shard_refuses_a_listener_it_cannot_bind_and_changes_nothing(
        tmp_path: Path, cert_files: tuple[Path, Path]) -> None:
    config = _config(tmp_path, cert_files)
    c2s = config.listeners[0]
    ws_port = free_ports(1)[0]

    async def main() -> None:
        server = Server(config)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(STEP_TIMEOUT):
                await nursery.start(server.serve)
            old_port = server.bound_ports["c2s"]
            early = await trio.open_tcp_stream("127.0.0.1", old_port)
            websocket = ListenerConfig(kind="websocket", port=ws_port, address="127.0.0.1")
            with port_taken() as taken, trio.fail_after(STEP_TIMEOUT):
                blocked = ListenerConfig(kind="tls", port=taken, address="127.0.0.1")
                new = dataclasses.replace(config, listeners=(c2s, websocket, blocked))
                with pytest.raises(ReloadError) as refusal:
                    await apply_config(server, new)
                message = str(refusal.value)
                assert message == (f"{config.path}: cannot listen for tls on 127.0.0.1 port "
                                   f"{taken}: the port is in use")
                # Nothing changed: configuration, ports, the WebSocket port
                # bound first and closed again.
                assert server.config is config
                assert server.bound_ports == {"c2s": old_port}
                assert server.listeners.listing() == [f"c2s 127.0.0.1:{old_port}"]
                assert await _connect_refused(ws_port)
                # An address this host lacks (TEST-NET-1): refused the same way.
                elsewhere = ListenerConfig(kind="c2s", port=ws_port, address="192.0.2.1")
                with pytest.raises(ReloadError) as refusal:
                    await apply_config(server, dataclasses.replace(
                        config, listeners=(c2s, elsewhere)))
                assert str(refusal.value).startswith(
                    f"{config.path}: cannot listen for c2s on 192.0.2.1 port {ws_port}: ")
                assert "\n" not in str(refusal.value) and server.config is config
            with trio.fail_after(STEP_TIMEOUT):
                # The port free again: applied, the WebSocket endpoint built live.
                new = dataclasses.replace(config, listeners=(websocket, c2s))
                done = await apply_config(server, new)
                assert done == [f"listening for websocket on 127.0.0.1 port {ws_port}"]
                assert server.bound_ports == {"c2s": old_port, "websocket": ws_port}
                http = await trio.open_tcp_stream("127.0.0.1", ws_port)
                await http.send_all(HOST_META)
                answer = b""
                while chunk := await http.receive_some(65536):
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 200") and b"xmpp-websocket" in answer
                await http.aclose()
                # The c2s listener becomes direct TLS on another port: the
                # old one closed, the connection it accepted still served.
                tls = ListenerConfig(kind="tls", port=free_ports(1)[0], address="127.0.0.1")
                done = await apply_config(server, dataclasses.replace(
                    config, listeners=(websocket, tls)))
                assert done == [f"stopped listening for c2s on 127.0.0.1 port {old_port}",
                                f"listening for tls on 127.0.0.1 port {tls.port}"]
                assert await _connect_refused(old_port)
                assert b"<starttls" in await _stream_features(early)
                assert server.bound_ports == {"websocket": ws_port, "tls": tls.port}
                await early.aclose()
                # The same configuration again: nothing opened or closed.
                assert await apply_config(server, server.config) == []
                await server.shutdown()
            nursery.cancel_scope.cancel()

    trio.run(main)
