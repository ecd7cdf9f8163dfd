"""The seed corpus: real client streams in each target's input layout.

    python -m tests.fuzz.seeds      # rewrites tests/fuzz/corpus/<target>/

Why generated: SCRAM proofs depend on the salt, password and server nonce
the harness fixes, so they are computed here rather than pasted; rerun
after changing any of those. The files are committed so a fuzz run needs
nothing but the corpus directory.
"""

from __future__ import annotations

import base64
from pathlib import Path

from tests.fuzz.harness import (
    C2S_BIND_CONFLICT,
    C2S_DEFER_ANSWERS,
    C2S_DIRECT_TLS,
    C2S_RECHUNK,
    C2S_TLS_REQUIRED,
    C2S_UNAVAILABLE,
    C2S_WEBSOCKET,
    C2S_WRONG_CREDENTIAL,
    CHANNEL_BINDING,
    COMP_CLOSE_ERROR,
    COMP_DEFER_ACCEPT,
    COMP_ECHO,
    COMP_MISUSE,
    COMP_OWN_HEADER,
    COMP_RECHUNK,
    COMP_REFUSE,
    COMP_SERVER_CLOSE,
    COMPONENT_DOMAIN,
    COMPONENT_HEADER,
    DOMAIN,
    FRAMING_NS,
    HANDSHAKE_AUTO,
    HANDSHAKE_UPPER,
    ITERATIONS,
    PACKET_SEPARATOR,
    PASSWORD_TEXT,
    REGISTRY_PLAIN_ALLOWED,
    SALT,
    SASL_CB_OFFERED,
    SASL_CB_SHIFT,
    SASL_NO_INITIAL,
    SASL_PLUS,
    SASL_SEPARATOR,
    SASL_SHA256,
    SASL_TLS,
    SASL_WRONG,
    SERVER_NONCE,
    TCP_HEADER,
    USER,
    ScramClientHelper,
)

CORPUS = Path(__file__).parent / "corpus"
CLIENT_NONCE = "fyko+d2lbbFgONRv9qkxdawL"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
ALL_CB = 0b11 << SASL_CB_SHIFT  # every channel-binding type present
WS = " xmlns='jabber:client'"  # WebSocket messages carry their namespace


def scram_messages(mechanism: str, gs2: str, cb: dict[str, bytes]) -> tuple[bytes, bytes]:
    """A client-first and a correct client-final for the harness's user."""
    helper = ScramClientHelper(mechanism, cb)
    first = f"{gs2}n={USER},r={CLIENT_NONCE}".encode()
    helper.fill(first)
    salt = base64.b64encode(SALT).decode()
    helper.saw(f"r={CLIENT_NONCE}{SERVER_NONCE},s={salt},i={ITERATIONS}".encode())
    return first, helper.fill(b"c=AUTO,r=AUTO,p=AUTO")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def auth(mechanism: str, initial: bytes) -> bytes:
    return f"<auth xmlns='{SASL}' mechanism='{mechanism}'>{b64(initial)}</auth>".encode()


def bound_tail(ws: bool) -> list[bytes]:
    """After authentication: restart, bind, a few stanzas, the close."""
    ns = WS if ws else ""
    restart = (f"<open xmlns='{FRAMING_NS}' to='{DOMAIN}' version='1.0'/>".encode() if ws
               else TCP_HEADER)
    close = f"<close xmlns='{FRAMING_NS}'/>".encode() if ws else b"</stream:stream>"
    return [
        restart,
        f"<iq{ns} type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
        "<resource>phone</resource></bind></iq>".encode(),
        f"<iq{ns} type='set' id='s1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/>"
        "</iq>".encode(),
        f"<iq{ns} type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>".encode(),
        f"<presence{ns}><show>chat</show><status>hi &amp; bye</status></presence>".encode(),
        f"<message{ns} to='bob@{DOMAIN}' type='chat' id='m1'><body>Hello <![CDATA[<b>]]>"
        "\u00e9\U0001f600</body></message>".encode(),
        f"<message{ns} to='bob@{DOMAIN}/desk' from='{USER}@{DOMAIN}/phone'>"
        "<body>second</body></message>".encode(),
        b" ",  # whitespace keepalive
        close,
    ]


def packets(flags: int, items: list[bytes]) -> bytes:
    return bytes([flags]) + PACKET_SEPARATOR.join(items)


def c2s_seeds() -> dict[str, bytes]:
    plain = auth("PLAIN", f"\0{USER}\0{PASSWORD_TEXT}".encode())
    out: dict[str, bytes] = {}
    for ws, prefix, base in ((False, "tcp", C2S_DIRECT_TLS), (True, "ws", C2S_WEBSOCKET)):
        out[f"{prefix}-plain-login"] = packets(base, [plain, *bound_tail(ws)])
        out[f"{prefix}-plain-login-rechunked"] = packets(base | C2S_RECHUNK,
                                                         [plain, *bound_tail(ws)])
        out[f"{prefix}-plain-wrong"] = packets(base | C2S_WRONG_CREDENTIAL, [plain, plain])
        out[f"{prefix}-plain-bind-conflict"] = packets(base | C2S_BIND_CONFLICT,
                                                       [plain, *bound_tail(ws)])
        for mech in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
            first, final = scram_messages(mech, "n,,", {})
            out[f"{prefix}-{mech.lower()}-login"] = packets(base, [
                auth(mech, first),
                f"<response xmlns='{SASL}'>{b64(final)}</response>".encode(),
                *bound_tail(ws),
            ])
        first, final = scram_messages("SCRAM-SHA-256", "p=tls-exporter,,", CHANNEL_BINDING)
        out[f"{prefix}-scram-sha-256-plus-login"] = packets(base | C2S_DIRECT_TLS, [
            auth("SCRAM-SHA-256-PLUS", first),
            f"<response xmlns='{SASL}'>{b64(final)}</response>".encode(),
            *bound_tail(ws),
        ])
        out[f"{prefix}-scram-no-initial"] = packets(base, [
            f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-1'/>".encode(),
            f"<response xmlns='{SASL}'>{b64(scram_messages('SCRAM-SHA-1', 'n,,', {})[0])}"
            "</response>".encode(),
            f"<abort xmlns='{SASL}'/>".encode(),
        ])
    # Pipelined SASL (issue 12, finding 5): <auth/> and more in one packet.
    close = b"</stream:stream>"
    message = b"<message to='bob@example.com'><body>x</body></message>"
    out["tcp-pipelined-auth-close"] = packets(C2S_DIRECT_TLS, [plain + close])
    out["tcp-pipelined-auth-close-deferred"] = packets(C2S_DIRECT_TLS | C2S_DEFER_ANSWERS,
                                                       [plain + close])
    out["tcp-pipelined-auth-stanza-close"] = packets(C2S_DIRECT_TLS, [plain + message + close])
    out["tcp-pipelined-auth-restart-bind"] = packets(
        C2S_DIRECT_TLS, [plain + TCP_HEADER + bound_tail(False)[1] + close])
    out["tcp-pipelined-auth-unavailable"] = packets(C2S_DIRECT_TLS | C2S_UNAVAILABLE,
                                                    [plain + plain + close])
    out["tcp-pipelined-bind-close-deferred"] = packets(
        C2S_DIRECT_TLS | C2S_DEFER_ANSWERS,
        [plain, TCP_HEADER + bound_tail(False)[1] + close])
    out["ws-pipelined-auth-close"] = packets(
        C2S_WEBSOCKET | C2S_DEFER_ANSWERS, [plain, f"<close xmlns='{FRAMING_NS}'/>".encode()])
    # STARTTLS, then a login over the (pretend) TLS layer.
    out["tcp-starttls-plain-login"] = packets(C2S_TLS_REQUIRED, [
        b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>", TCP_HEADER, plain,
        *bound_tail(False)])
    out["tcp-starttls-injection"] = packets(C2S_TLS_REQUIRED, [
        b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>" + plain, TCP_HEADER])
    out["tcp-peer-stream-error"] = packets(C2S_DIRECT_TLS, [
        b"<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
        b"</stream:error></stream:stream>"])
    return out


def component_seeds() -> dict[str, bytes]:
    """XEP-0114 streams: a good handshake then stanzas, and each way to fail."""
    good = b"<handshake>" + HANDSHAKE_AUTO + b"</handshake>"
    d = COMPONENT_DOMAIN
    stanzas = [
        f"<message from='{d}' to='alice@{DOMAIN}' id='m1'><body>push &amp; more</body>"
        "</message>".encode(),
        f"<message from='svc@{d}/r' to='alice@{DOMAIN}/phone'><body>\u00e9</body>"
        "</message>".encode(),
        f"<iq type='get' id='q1' to='{DOMAIN}'><query xmlns='jabber:iq:version'/></iq>".encode(),
        f"<presence to='alice@{DOMAIN}'/>".encode(),
        b"<iq to='example.com'/>",  # refused: no id, no type
        b"<message to='bad@@jid'/>",  # refused: jid-malformed
        b"<message><body>no to</body></message>",  # refused: bad-request
        b" ",
        b"</stream:stream>",
    ]
    out = {
        "good-handshake-stanzas": packets(COMP_ECHO, [good, *stanzas]),
        "good-handshake-stanzas-rechunked": packets(COMP_ECHO | COMP_RECHUNK,
                                                    [good, *stanzas]),
        "good-handshake-upper-case": packets(0, [
            b"<handshake> " + HANDSHAKE_UPPER + b"\n</handshake>", stanzas[0]]),
        "good-handshake-misuse": packets(COMP_MISUSE | COMP_ECHO, [good, *stanzas]),
        "good-handshake-deferred": packets(COMP_DEFER_ACCEPT, [good, b" ", stanzas[0]]),
        "good-handshake-deferred-pipelined": packets(COMP_DEFER_ACCEPT, [good, stanzas[0]]),
        "good-handshake-pipelined": packets(0, [good + stanzas[0]]),
        "good-handshake-conflict": packets(COMP_REFUSE, [good, stanzas[0]]),
        "good-handshake-server-close": packets(COMP_SERVER_CLOSE, [good, stanzas[0]]),
        "good-handshake-shutdown": packets(COMP_SERVER_CLOSE | COMP_CLOSE_ERROR,
                                           [good, stanzas[0]]),
        "foreign-from": packets(0, [good, f"<message from='evil.{DOMAIN}' to='a@{DOMAIN}'/>"
                                    .encode()]),
        "client-namespace-stanza": packets(0, [
            good, f"<message xmlns='jabber:client' to='a@{DOMAIN}'/>".encode()]),
        "unknown-element": packets(0, [good, b"<db:result xmlns:db='jabber:server:dialback'/>"]),
        "bad-proof": packets(0, [b"<handshake>" + b"0" * 40 + b"</handshake>", stanzas[0]]),
        "short-proof": packets(0, [b"<handshake>abc</handshake>"]),
        "empty-handshake": packets(COMP_MISUSE, [b"<handshake/>"]),
        "stanza-before-handshake": packets(0, [stanzas[0], good]),
        "unknown-domain": packets(COMP_OWN_HEADER, [
            COMPONENT_HEADER.replace(d.encode(), b"other.example.com"), good]),
        "client-namespace-header": packets(COMP_OWN_HEADER, [
            COMPONENT_HEADER.replace(b"jabber:component:accept", b"jabber:client")]),
        "no-to": packets(COMP_OWN_HEADER | COMP_MISUSE, [
            COMPONENT_HEADER.replace(f" to='{d}'".encode(), b"")]),
        "own-header-good": packets(COMP_OWN_HEADER | COMP_ECHO, [COMPONENT_HEADER, good,
                                                                stanzas[0]]),
        "second-header": packets(0, [good, COMPONENT_HEADER]),
        "garbage": packets(0, [b"\xfe\xff<<&;]]>", good]),
        "garbage-before-header": packets(COMP_OWN_HEADER, [b"GET / HTTP/1.1\r\n\r\n"]),
        "over-deep": packets(0, [good, b"<message to='a@example.com'>" + b"<x>" * 80 +
                                 b"</x>" * 80 + b"</message>"]),
        "peer-stream-error": packets(0, [
            b"<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
            b"</stream:error></stream:stream>"]),
    }
    return out


def xml_seeds() -> dict[str, bytes]:
    plain = auth("PLAIN", f"\0{USER}\0{PASSWORD_TEXT}".encode())
    stream = TCP_HEADER + plain + b"".join(bound_tail(False)[1:])
    out = {}
    for seed in (0, 1, 7, 200):
        out[f"client-stream-seed{seed}"] = bytes([seed]) + stream
    out["bom-declaration"] = b"\x03\xef\xbb\xbf" + stream
    out["declared-encoding"] = b"\x05" + TCP_HEADER.replace(
        b"version='1.0'?>", b"version='1.0' encoding='UTF-8'?>", 1) + b"<presence/>"
    out["prefixed-stanzas"] = (
        b"\x09<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/"
        b"streams' xmlns:x='urn:x' to='example.com' version='1.0'>"
        b"<x:ext a='1' x:b='2'><x:in/>t&lt;&#x41;&#65;</x:ext>  <iq type='get'/></stream:stream>"
    )
    out["websocket-open"] = b"\x02" + f"<open xmlns='{FRAMING_NS}' to='{DOMAIN}' " \
        "version='1.0'/>".encode()
    return out


def sasl_seeds() -> tuple[dict[str, bytes], dict[str, bytes], dict[str, bytes]]:
    good = f"\0{USER}\0{PASSWORD_TEXT}".encode()
    sep = SASL_SEPARATOR
    plain = {
        "login": b"\x00" + good,
        "login-authzid": b"\x00" + f"{USER}@{DOMAIN}\0{USER}\0{PASSWORD_TEXT}".encode(),
        "no-initial": bytes([SASL_NO_INITIAL]) + good,
        "wrong": bytes([SASL_WRONG]) + good + sep + good,
        "saslprep": b"\x00" + "\0a\u00adlice\0pen\u00a0cil".encode(),
    }
    scram: dict[str, bytes] = {}
    registry: dict[str, bytes] = {}
    for mech, bit in (("SCRAM-SHA-1", 0), ("SCRAM-SHA-256", SASL_SHA256)):
        first, final = scram_messages(mech, "n,,", {})
        auto = b"c=AUTO,r=AUTO,p=AUTO"
        name = mech.lower()
        scram[f"{name}-login"] = bytes([bit]) + first + sep + final + sep + b"n,,n=x,r=y"
        scram[f"{name}-auto"] = bytes([bit | SASL_NO_INITIAL]) + first + sep + auto
        scram[f"{name}-unknown"] = bytes([bit | SASL_WRONG]) + first + sep + auto
        scram[f"{name}-ext"] = bytes([bit]) + first + b",x=ext" + sep + \
            b"c=AUTO,r=AUTO,y=z,p=AUTO"
        plus_first = f"p=tls-exporter,a={USER}@{DOMAIN},n={USER},r={CLIENT_NONCE}".encode()
        scram[f"{name}-plus"] = bytes([bit | SASL_PLUS | ALL_CB]) + plus_first + sep + auto
        scram[f"{name}-downgrade"] = bytes([bit | SASL_CB_OFFERED]) + b"y" + first[1:] + \
            sep + auto
    for pick, mech in enumerate(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS",
                                 "SCRAM-SHA-256", "SCRAM-SHA-1")):
        gs2 = "p=tls-server-end-point,," if mech.endswith("PLUS") else "n,,"
        first = f"{gs2}n={USER},r={CLIENT_NONCE}".encode()
        registry[mech.lower()] = bytes([SASL_TLS | ALL_CB | SASL_CB_OFFERED, pick]) + first + \
            sep + b"c=AUTO,r=AUTO,p=AUTO"
    registry["plain"] = bytes([SASL_TLS | REGISTRY_PLAIN_ALLOWED, 4]) + good
    registry["plain-no-initial"] = bytes(
        [REGISTRY_PLAIN_ALLOWED | SASL_NO_INITIAL, 4]) + good
    return plain, scram, registry


def main() -> None:
    plain, scram, registry = sasl_seeds()
    for target, seeds in (("xml_parser", xml_seeds()), ("c2s", c2s_seeds()),
                          ("component", component_seeds()),
                          ("sasl_plain", plain), ("sasl_scram", scram),
                          ("sasl_registry", registry)):
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        for name, data in seeds.items():
            (folder / name).write_bytes(data)
        print(f"{target}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
