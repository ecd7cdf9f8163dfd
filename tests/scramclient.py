"""A SCRAM client over a RawClient (RFC 5802), for tests that must see the
exact SASL outcome: the condition and text of a <failure/>, or <success/>."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import uuid

from tests.rawclient import RawClient

SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
HASHES = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}


def scram_auth(client: RawClient, user: str, password: str,
               mechanism: str = "SCRAM-SHA-256") -> str:
    """Run SCRAM (no channel binding) after STARTTLS; returns "success" or
    the failure's "condition: text"."""
    digest = HASHES[mechanism]
    nonce = uuid.uuid4().hex
    bare = f"n={user},r={nonce}"
    client.send(f"<auth xmlns='{SASL_NS}' mechanism='{mechanism}'>"
                f"{base64.b64encode(('n,,' + bare).encode()).decode()}</auth>")
    text = client.read_until(r"</challenge>|</failure>|<failure[^>]*/>")
    if "<failure" in text:
        return failure_of(text)
    first = base64.b64decode(re.search(r"<challenge[^>]*>([^<]*)<", text)[1]).decode()
    fields = dict(part.split("=", 1) for part in first.split(","))
    salted = hashlib.pbkdf2_hmac(digest, password.encode(), base64.b64decode(fields["s"]),
                                 int(fields["i"]))
    client_key = hmac.digest(salted, b"Client Key", digest)
    stored = hashlib.new(digest, client_key).digest()
    final_bare = f"c=biws,r={fields['r']}"
    auth_message = f"{bare},{first},{final_bare}".encode()
    signature = hmac.digest(stored, auth_message, digest)
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    final = f"{final_bare},p={base64.b64encode(proof).decode()}"
    client.send(f"<response xmlns='{SASL_NS}'>{base64.b64encode(final.encode()).decode()}"
                "</response>")
    text = client.read_until(r"<success[^>]*(/>|>[^<]*</success>)|</failure>")
    return "success" if "<success" in text else failure_of(text)


def plain_auth(client: RawClient, user: str, password: str) -> str:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    client.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{token}</auth>")
    text = client.read_until(r"<success[^>]*(/>|>[^<]*</success>)|</failure>")
    return "success" if "<success" in text else failure_of(text)


def failure_of(text: str) -> str:
    """"condition: text" of a SASL <failure/>."""
    m = re.search(r"<failure[^>]*>\s*<([a-z-]+)/>(?:<text[^>]*>([^<]*)</text>)?", text)
    assert m, text
    return f"{m[1]}: {m[2] or ''}".rstrip(": ")
