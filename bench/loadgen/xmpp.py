"""A minimal, cheap XMPP client side for load generation (asyncio, any loop).

Not a general client: it speaks exactly what the scenarios need (stream
header, STARTTLS, SASL PLAIN / SCRAM-SHA-256 / SCRAM-SHA-1, bind, initial
presence) and finds what it waits for with byte regexes on the receive
buffer, never an XML parser. Once a session is up, `Conn.on_data` takes
the raw bytes so a scenario can count deliveries with one regex scan per
read.

TLS: the server's certificate is NOT verified (loopback benchmarks against
self-signed certificates; the generator refuses non-loopback targets).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import ssl
import time
from collections.abc import Callable

STREAM_NS = "http://etherx.jabber.org/streams"

FEATURES_RE = re.compile(
    rb"<(?:[\w.-]+:)?features(?:\s[^>]*)?/>|<(?:[\w.-]+:)?features[\s>].*?</(?:[\w.-]+:)?features>",
    re.S,
)
# What ends a negotiation step badly: a stream error or end, a SASL failure,
# an iq error (bind). Checked only while a step waits.
FAIL_RE = re.compile(
    rb"<(?:[\w.-]+:)?error[\s>].*?</(?:[\w.-]+:)?error>|</(?:[\w.-]+:)?stream>"
    rb"|<failure[\s>].*?</failure>|<failure[^>]*/>|<iq[^>]*type=['\"]error['\"].*?</iq>",
    re.S,
)
PROCEED_RE = re.compile(rb"<proceed[^>]*>")
CHALLENGE_RE = re.compile(rb"<challenge[^>]*>([^<]*)</challenge>")
SUCCESS_RE = re.compile(rb"<success[^>]*/>|<success[^>]*>([^<]*)</success>")
JID_RE = re.compile(rb"<jid>([^<]+)</jid>")
# XEP-0198: what the client counts (every stanza, whole or self-closing) and
# the server's ack requests it must answer, in stream order.
SM_RE = re.compile(rb"<r\s[^>]*/>|</(?:message|presence|iq)>|<(?:message|presence|iq)\b[^>]*/>")
ENABLED_RE = re.compile(rb"<enabled\b[^>]*>")
SM_NS = b"urn:xmpp:sm:3"
# Bytes of an unfinished read kept for the next one (a stanza's tag split
# across reads); longer than any opening tag the scenarios receive.
SM_KEEP = 512
SESSION_REQUIRED_RE = re.compile(rb"xmpp-session['\"]\s*>(?!\s*<optional)|xmpp-session['\"]\s*/>")


class XMPPError(Exception):
    """A negotiation step failed (with what the server said, shortened)."""


def client_ssl_context() -> ssl.SSLContext:
    """No certificate verification: loopback benchmarks only. Library
    defaults otherwise (TLS 1.2+, OpenSSL's cipher defaults), so the
    negotiated version/cipher is whatever both ends prefer (TLS 1.3)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ScramCache:
    """SaltedPassword by (hash, password, salt, iterations): PBKDF2 costs
    the client ~1 ms per login at 4096 iterations, which would make the
    generator, not the server, the bottleneck of a SCRAM login storm."""

    def __init__(self, entries: dict[str, str] | None = None) -> None:
        self.entries: dict[str, str] = dict(entries or {})
        self.new: dict[str, str] = {}

    def salted(self, hash_name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        key = f"{hash_name}:{password.hex()}:{salt.hex()}:{iterations}"
        hit = self.entries.get(key)
        if hit is not None:
            return bytes.fromhex(hit)
        value = hashlib.pbkdf2_hmac(hash_name, password, salt, iterations)
        self.entries[key] = self.new[key] = value.hex()
        return value


class Conn(asyncio.Protocol):
    """One client connection. Negotiation awaits regexes on `buf`; after
    `hot()` every read goes to `on_data` instead."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self._rx: re.Pattern[bytes] | None = None
        self._fut: asyncio.Future[re.Match[bytes]] | None = None
        self._fail = True
        self.on_data: Callable[[bytes], None] | None = None
        self.closed = False
        self.jid = ""
        self.tls_info = ""
        # Stream management (XEP-0198), once enabled: stanzas received (h),
        # stanzas sent (for the client's own ack requests).
        self.sm = False
        self.h = 0
        self.sent_stanzas = 0
        self._sm_keep = b""

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.sm:
            self._sm_count(data)
        if self.on_data is not None:
            self.on_data(data)
            return
        self.buf += data
        if self._fut is not None:
            self._check()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._fut is not None and not self._fut.done():
            self._fut.set_exception(XMPPError(f"connection lost: {exc or 'closed by server'}"))

    def _sm_count(self, data: bytes) -> None:
        """Count stanzas and answer the server's <r/> with the count so far."""
        buf = self._sm_keep + data
        last = 0
        for m in SM_RE.finditer(buf):
            if m.group(0).startswith(b"<r"):
                self.send(b"<a xmlns='" + SM_NS + b"' h='" + str(self.h).encode() + b"'/>")
            else:
                self.h = (self.h + 1) % 2 ** 32
            last = m.end()
        self._sm_keep = buf[max(last, len(buf) - SM_KEEP):]

    # -- negotiation helpers --
    def _check(self) -> None:
        assert self._rx is not None and self._fut is not None
        m = self._rx.search(self.buf)
        if m is not None:
            self.buf = self.buf[m.end():]
            fut, self._fut, self._rx = self._fut, None, None
            if not fut.done():
                fut.set_result(m)
            return
        bad = FAIL_RE.search(self.buf) if self._fail else None
        if bad is not None:
            fut, self._fut, self._rx = self._fut, None, None
            if not fut.done():
                fut.set_exception(XMPPError(bad.group(0)[:200].decode("utf-8", "replace")))

    async def expect(self, rx: re.Pattern[bytes], timeout: float,
                     fail: bool = True) -> re.Match[bytes]:
        """Wait for `rx`; with `fail`, a stream/SASL/stanza error first is an error."""
        if self.closed:
            raise XMPPError("connection closed")
        self._fail = fail
        self._rx = rx
        self._fut = self.loop.create_future()
        self._check()
        try:
            return await asyncio.wait_for(self._fut, timeout)
        except TimeoutError:
            raise XMPPError(f"timeout waiting for {rx.pattern[:40]!r}") from None
        finally:
            self._fut = None
            self._rx = None

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def hot(self, on_data: Callable[[bytes], None]) -> None:
        """From now on all received bytes go to `on_data` (leftovers first)."""
        self.on_data = on_data
        if self.buf:
            left, self.buf = self.buf, b""
            on_data(left)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            try:
                self.transport.write(b"</stream:stream>")
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            self.transport.close()
        self.closed = True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closed = True


def _header(domain: str) -> bytes:
    return (
        f"<?xml version='1.0'?><stream:stream to='{domain}' version='1.0' "
        f"xmlns='jabber:client' xmlns:stream='{STREAM_NS}'>"
    ).encode()


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


async def login(
    host: str,
    port: int,
    domain: str,
    user: str,
    password: str,
    *,
    tls: bool,
    mechanism: str,
    resource: str,
    presence: bool = True,
    sm: bool = False,
    ssl_ctx: ssl.SSLContext | None = None,
    scram_cache: ScramCache | None = None,
    timeout: float = 30.0,
) -> Conn:
    """Connect and negotiate up to a bound session (and initial presence)."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(0.05, deadline - time.monotonic())

    _, conn = await asyncio.wait_for(loop.create_connection(Conn, host, port), left())
    try:
        conn.send(_header(domain))
        feats = (await conn.expect(FEATURES_RE, left())).group(0)
        if tls:
            if b"starttls" not in feats:
                raise XMPPError("server does not offer STARTTLS")
            conn.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            await conn.expect(PROCEED_RE, left())
            conn.buf = b""
            assert conn.transport is not None
            new = await asyncio.wait_for(
                loop.start_tls(conn.transport, conn, ssl_ctx or client_ssl_context(),
                               server_hostname=domain),
                left(),
            )
            conn.transport = new  # type: ignore[assignment]
            sslobj = new.get_extra_info("ssl_object")
            if sslobj is not None:
                conn.tls_info = f"{sslobj.version()} {sslobj.cipher()[0]}"
            conn.send(_header(domain))
            feats = (await conn.expect(FEATURES_RE, left())).group(0)
        if mechanism.encode() not in feats:
            raise XMPPError(f"server does not offer {mechanism}: {feats[:300]!r}")
        await _sasl(conn, user, password, mechanism, scram_cache, left)
        conn.send(_header(domain))
        feats = (await conn.expect(FEATURES_RE, left())).group(0)
        conn.send(
            b"<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            b"<resource>" + resource.encode() + b"</resource></bind></iq>"
        )
        conn.jid = (await conn.expect(JID_RE, left())).group(1).decode()
        if SESSION_REQUIRED_RE.search(feats):
            conn.send(b"<iq type='set' id='sess1'><session "
                      b"xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
            await conn.expect(re.compile(rb"<iq[^>]*id=['\"]sess1['\"][^>]*>"), left())
        if sm:
            # Before presence: nothing is sent to the session yet, so both
            # sides count from the same stanza.
            conn.send(b"<enable xmlns='" + SM_NS + b"'/>")
            await conn.expect(ENABLED_RE, left())
            conn.sm = True
            if conn.buf:
                conn._sm_count(conn.buf)
        if presence:
            conn.send(b"<presence/>")
        return conn
    except BaseException:
        conn.abort()
        raise


async def _sasl(conn: Conn, user: str, password: str, mechanism: str,
                cache: ScramCache | None, left: Callable[[], float]) -> None:
    ns = b"urn:ietf:params:xml:ns:xmpp-sasl"
    if mechanism == "PLAIN":
        token = _b64(b"\0" + user.encode() + b"\0" + password.encode())
        conn.send(b"<auth xmlns='" + ns + b"' mechanism='PLAIN'>" + token + b"</auth>")
        await conn.expect(SUCCESS_RE, left())
        return
    if mechanism not in ("SCRAM-SHA-256", "SCRAM-SHA-1"):
        raise XMPPError(f"mechanism {mechanism} not supported by the generator")
    hash_name = "sha256" if mechanism == "SCRAM-SHA-256" else "sha1"
    nonce = base64.b64encode(os.urandom(18)).decode()
    name = user.replace("=", "=3D").replace(",", "=2C")
    first_bare = f"n={name},r={nonce}"
    conn.send(b"<auth xmlns='" + ns + b"' mechanism='" + mechanism.encode() + b"'>"
              + _b64(b"n,," + first_bare.encode()) + b"</auth>")
    server_first = base64.b64decode((await conn.expect(CHALLENGE_RE, left())).group(1)).decode()
    attrs = dict(part.split("=", 1) for part in server_first.split(","))
    if not attrs.get("r", "").startswith(nonce):
        raise XMPPError("SCRAM: server nonce does not extend ours")
    salt = base64.b64decode(attrs["s"])
    iterations = int(attrs["i"])
    pw = password.encode()
    salted = (cache.salted(hash_name, pw, salt, iterations) if cache is not None
              else hashlib.pbkdf2_hmac(hash_name, pw, salt, iterations))
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    stored_key = hashlib.new(hash_name, client_key).digest()
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{first_bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(stored_key, auth_message, hash_name)
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    final = f"{without_proof},p={base64.b64encode(proof).decode()}".encode()
    conn.send(b"<response xmlns='" + ns + b"'>" + _b64(final) + b"</response>")
    m = await conn.expect(SUCCESS_RE, left())
    data = m.group(1)
    if not data:
        # RFC 6120 allows the server's final message in a last challenge.
        raise XMPPError("SCRAM: no server signature in <success/>")
    server_final = base64.b64decode(data).decode()
    server_key = hmac.digest(salted, b"Server Key", hash_name)
    expected = base64.b64encode(hmac.digest(server_key, auth_message, hash_name)).decode()
    if server_final != f"v={expected}":
        raise XMPPError("SCRAM: bad server signature")
