"""Live reload of the configuration (`mlink reload`, SIGHUP) on a real
server: a new certificate for new connections, a bad file refused with the
server unharmed, a changed limit applied to new connections (listeners:
tests/test_listen_reload.py).

Synchronisation is on what the server reports (its log line once every
shard has applied the file, or `mlink reload`'s answer, which comes after
that), never on sleeps."""

from __future__ import annotations

import re
import signal
import socket
import ssl
from pathlib import Path

import trustme

from tests.rawclient import RawClient, expect_stream_error
from tests.serverproc import ALICE, ALICE_PW, BOB, DOMAIN, MlinkProcess, mlink, start_mlink

# A stanza over the lowered limit below and well under the default one.
BIG_BODY = 20_000
LOWERED_LIMIT = 10_000
RELOADED = r"configuration reloaded by (\d+) of \1 shard"


def peer_certificate(port: int, cafile: Path) -> bytes:
    """The DER certificate a direct-TLS client trusting only `cafile` gets."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def new_certificate(tmp_path: Path) -> tuple[trustme.CA, Path, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    d = tmp_path / "newcert"
    d.mkdir()
    cert_path, key_path, ca_path = d / "cert.pem", d / "key.pem", d / "ca.pem"
    cert.private_key_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    ca.cert_pem.write_to_path(str(ca_path))
    return ca, cert_path, key_path, ca_path


def edit(server: MlinkProcess, old: str, new: str) -> None:
    text = server.config.read_text()
    assert re.search(old, text), old
    server.config.write_text(re.sub(old, new, text, count=1))


def test_sighup_swaps_the_certificate(tmp_path: Path, cert_files: tuple[Path, Path],
                                      ca_file: Path) -> None:
    with start_mlink(tmp_path / "setup", DOMAIN, cert_files) as server:
        before = peer_certificate(server.tls_port, ca_file)
        _, cert, key, new_ca = new_certificate(tmp_path)
        edit(server, r'<tls\s+certificate="[^"]*"\s+key="[^"]*"',
             f'<tls certificate="{cert}" key="{key}"')
        mark = server.log.mark()
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log(RELOADED, since=mark)
        after = peer_certificate(server.tls_port, new_ca)
        assert after != before
        assert after == ssl.PEM_cert_to_DER_cert(cert.read_text())
        assert server.proc.poll() is None


def test_bad_file_is_refused_and_the_server_keeps_running(
        tmp_path: Path, cert_files: tuple[Path, Path], ca_file: Path) -> None:
    with start_mlink(tmp_path / "setup", DOMAIN, cert_files) as server:
        good = server.config.read_text()
        # The <limits> element (one line or several) with a bad value.
        bad = re.sub(r"<limits\b[^>]*/>", '<limits stanza-bytes="12"/>', good, count=1)
        at = bad[:bad.index("<limits")].count("\n")
        server.config.write_text(bad)
        mark = server.log.mark()
        done = mlink("reload", "--config", str(server.config), check=False)
        assert done.returncode == 1
        expected = f"{server.config}:{at + 1}: 'stanza-bytes' on <limits> must be at least"
        assert expected in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        server.wait_for_log(r"configuration reload refused: " + re.escape(expected), since=mark)
        # SIGHUP: the same refusal, logged.
        mark = server.log.mark()
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log(r"configuration reload refused: " + re.escape(expected), since=mark)
        # Still serving, with the old configuration (certificate and limits).
        assert server.proc.poll() is None
        peer_certificate(server.tls_port, ca_file)
        # A broken XML file too.
        server.config.write_text(good.replace("</mlink>", "<mlink>"))
        done = mlink("reload", "--config", str(server.config), check=False)
        assert done.returncode == 1 and "XML syntax error" in done.stderr
        server.config.write_text(good)
        done = mlink("reload", "--config", str(server.config))
        assert "configuration reloaded" in done.stdout


def test_changed_limit_applies_to_new_connections(
        tmp_path: Path, cert_files: tuple[Path, Path], ca_file: Path) -> None:
    with start_mlink(tmp_path / "setup", DOMAIN, cert_files, users={ALICE: ALICE_PW}) as server:
        established = RawClient(server.c2s_port, ca_file)
        established.login(DOMAIN, ALICE, ALICE_PW, resource="before")
        edit(server, r'stanza-bytes="\d+"', f'stanza-bytes="{LOWERED_LIMIT}"')
        # A domain added is reported as needing a restart, not applied
        # (listeners apply live: tests/test_listen_reload.py).
        edit(server, r"(<domain>[^<]*</domain>)", r"\1\n  <domain>other.example</domain>")
        done = mlink("reload", "--config", str(server.config))
        assert "configuration reloaded" in done.stdout
        assert "domains (<domain>) changed: needs a restart" in done.stdout
        server.wait_for_log(r"domains \(<domain>\) changed in .*needs a restart")

        client = RawClient(server.c2s_port, ca_file)
        try:
            client.login(DOMAIN, ALICE, ALICE_PW, resource="after")
            client.send(f"<message to='{BOB}'><body>{'x' * BIG_BODY}</body></message>")
            expect_stream_error(client, "policy-violation")
        finally:
            client.close()
            established.close()


class _FakeServer:
    """What apply_config touches of a Server."""

    def __init__(self, config: object) -> None:
        from mlink.hooks import Hooks

        self.config = config
        self.tls = None
        self.hooks = Hooks()
        self.shared_services: dict[str, object] = {}
        self.module_client_cas: list[bytes] = []

    async def prepare_listeners(self, config: object, tls: object) -> object:
        """No listeners here: nothing to bind."""
        return None

    def commit_listeners(self, change: object) -> list[str]:
        return []

    def apply_limits(self) -> None:
        """The real server re-reads its limits here; nothing to do."""


def test_apply_config_swaps_and_notifies_or_changes_nothing(
        tmp_path: Path, cert_files: tuple[Path, Path]) -> None:
    import dataclasses

    import trio

    from mlink.config_model import Config, LimitsConfig, TLSConfig
    from mlink.reload import ReloadError, apply_config

    old = Config(path=tmp_path / "mlink.xml", domains=["example.com"], listeners=[],
                 tls=TLSConfig(required=False))
    server = _FakeServer(old)
    seen: list[object] = []

    async def on_reload(config: object) -> None:
        seen.append(config)

    server.hooks.on("config/reloaded", on_reload)
    cert, key = cert_files
    new = dataclasses.replace(old, limits=LimitsConfig(max_stanza_bytes=LOWERED_LIMIT),
                              tls=TLSConfig(cert, key))
    trio.run(apply_config, server, new)
    assert server.config is new and server.tls is not None and seen == [new]
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate")
    bad = dataclasses.replace(old, tls=TLSConfig(broken, key))
    try:
        trio.run(apply_config, server, bad)
    except ReloadError as exc:
        assert "cannot load certificate" in str(exc) and "\n" not in str(exc)
    else:
        raise AssertionError("a broken certificate was applied")
    assert server.config is new and seen == [new]
