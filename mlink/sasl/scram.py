"""SCRAM-SHA-1/-256 and their -PLUS variants (RFC 5802, RFC 7677), server side.

Why SCRAM: the password never crosses the wire, the directory only stores
derived keys (`mlink.sasl.secrets`), and the client can verify that the server
knows the keys too (the `v=` signature). With -PLUS the exchange is also bound
to the TLS channel, which defeats TLS-terminating men in the middle.

Sans-IO: `receive()` and `provide_secret()` return events; nothing here does
I/O or imports trio.

Unknown users: `provide_secret(None)` does NOT fail at once. It answers with a
plausible server-first message (a salt derived from the user name with a
key the server keeps in its data directory, so it is the same on every
shard and after a restart; the default iteration count) and fails with `not-authorized`
only after the client-final message, exactly like a wrong password. A
client therefore cannot probe which accounts exist; mlink logs the true
reason on its side, since the caller knows it passed None.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Callable
from enum import Enum, auto

from mlink.sasl.channel_binding import ChannelBinding
from mlink.sasl.events import Challenge, Failure, NeedSecret, SaslEvent, SaslStateError, Success
from mlink.sasl.saslprep import SASLprepError, saslprep
from mlink.sasl.secrets import DEFAULT_ITERATIONS, HASHES, SALT_BYTES, ScramSecret

__all__ = ["MAX_SCRAM_MESSAGE", "NONCE_BYTES", "ScramMechanism", "default_nonce"]

# RFC 5802 §5.1 wants a nonce that is hard to predict; 18 random bytes
# (144 bits) is what the brief and common servers use, and base64-encode to
# exactly 24 characters without '=' padding.
NONCE_BYTES = 18
# Longest client message we parse. A real client-first or client-final is a
# few hundred bytes (the largest part is a 64-byte SHA-512 end-point binding
# in base64); 4 KiB tolerates long user names and extensions while bounding
# the parsing and SASLprep work per attempt.
MAX_SCRAM_MESSAGE = 4096

# Fallback key for the fake salts of unknown users when the caller passes
# none (unit tests, tools): stable for the life of the process. A server
# passes the persistent key of its data directory instead.
_MOCK_SALT_KEY = os.urandom(32)

# RFC 5802 §7 grammar pieces.
_CB_NAME = re.compile(r"[A-Za-z0-9.-]+")
_PRINTABLE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # any ASCII printable but ','
_ATTR_VAL = re.compile(r"[A-Za-z]=[^,\x00]+")


class _State(Enum):
    START = auto()
    WAIT_CLIENT_FIRST = auto()
    WAIT_SECRET = auto()
    WAIT_CLIENT_FINAL = auto()
    DONE = auto()


class _Malformed(Exception):
    """Internal: a grammar violation; becomes Failure('malformed-request')."""


def default_nonce() -> str:
    """Server nonce part: NONCE_BYTES random bytes, base64 (printable, no ',')."""
    return base64.b64encode(os.urandom(NONCE_BYTES)).decode("ascii")


def _decode_saslname(value: str) -> str:
    """RFC 5802 saslname: '=2C' is ',' and '=3D' is '='; any other '=' is an error."""
    if not value:
        raise _Malformed("empty name")
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "=":
            escape = value[i + 1 : i + 3]
            if escape == "2C":
                out.append(",")
            elif escape == "3D":
                out.append("=")
            else:
                raise _Malformed("bad '=' escape in name")
            i += 3
            continue
        if ch == "\x00":
            raise _Malformed("NUL in name")
        out.append(ch)
        i += 1
    return "".join(out)


def _b64decode(value: str) -> bytes:
    """Strict base64: only the canonical encoding of some bytes is accepted,
    so `c=` really is byte-for-byte base64(gs2-header + cb-data)."""
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _Malformed("bad base64") from exc
    if base64.b64encode(decoded).decode("ascii") != value:
        raise _Malformed("non-canonical base64")
    return decoded


class ScramMechanism:
    """One SCRAM attempt. Create a new instance per `<auth/>`.

    `hash_name` is the base mechanism, "SCRAM-SHA-1" or "SCRAM-SHA-256";
    `plus` selects the -PLUS variant, which needs `channel_binding` with at
    least one usable type. `cb_offered` says whether any -PLUS mechanism was
    advertised on this connection: a client that sends "y" (it supports
    binding but believes the server does not) then reveals a downgrade
    (RFC 5802 §6). `nonce_source` exists so tests can replay RFC vectors.
    """

    def __init__(
        self,
        hash_name: str,
        plus: bool = False,
        channel_binding: ChannelBinding | None = None,
        cb_offered: bool = False,
        *,
        nonce_source: Callable[[], str] = default_nonce,
        mock_salt_key: bytes | None = None,
    ) -> None:
        if hash_name not in HASHES:
            raise ValueError(f"unknown SCRAM mechanism: {hash_name!r}")
        self.base_mechanism = hash_name
        self.plus = plus
        self.name = hash_name + ("-PLUS" if plus else "")
        self._digest = HASHES[hash_name]
        self._cb = channel_binding or ChannelBinding()
        if plus and not self._cb.supported():
            raise ValueError(f"{self.name} needs channel-binding data")
        self._cb_offered = cb_offered or plus
        self._nonce_source = nonce_source
        # A server passes its persistent key (see `load_mock_salt_key`), so
        # every shard and every restart shows an unknown user the same salt.
        self._mock_salt_key = mock_salt_key or _MOCK_SALT_KEY
        self._state = _State.START
        # Filled in while the exchange proceeds.
        self._gs2_header = ""
        self._cb_data = b""
        self._client_first_bare = ""
        self._client_nonce = ""
        self._username = ""
        self._authzid: str | None = None
        self._server_first = ""
        self._nonce = ""
        self._secret: ScramSecret | None = None
        self._unknown_user = False

    # -- public API ------------------------------------------------------

    def receive(self, data: bytes | None) -> SaslEvent:
        """Feed the initial response (None when absent) or a `<response/>`."""
        if self._state is _State.WAIT_SECRET:
            raise SaslStateError("SCRAM is waiting for provide_secret()")
        if self._state is _State.DONE:
            return self._fail("malformed-request", "authentication already finished")
        if self._state is _State.START and not data:
            # RFC 6120 §6.4.2: no (or an empty) initial response; ask for the
            # client-first message with an empty challenge, exactly once.
            self._state = _State.WAIT_CLIENT_FIRST
            return Challenge(b"")
        data = data or b""
        if len(data) > MAX_SCRAM_MESSAGE:
            return self._fail("malformed-request", "message too long")
        try:
            text = data.decode("utf-8")
            if self._state is _State.WAIT_CLIENT_FINAL:
                return self._client_final(text)
            return self._client_first(text)
        except UnicodeDecodeError:
            return self._fail("malformed-request", "not UTF-8")
        except _Malformed as exc:
            return self._fail("malformed-request", str(exc))

    def provide_secret(self, secret: ScramSecret | None) -> Challenge | Failure:
        """Answer NeedSecret with the user's secret, or None for no such user."""
        if self._state is not _State.WAIT_SECRET:
            raise SaslStateError("provide_secret() without a pending NeedSecret")
        if secret is None:
            self._unknown_user = True
            secret = self._mock_secret()
        elif secret.mechanism != self.base_mechanism:
            raise ValueError(f"got a {secret.mechanism} secret for {self.name}")
        self._secret = secret
        server_nonce = self._nonce_source()
        if not _PRINTABLE.fullmatch(server_nonce):
            raise ValueError("server nonce must be printable ASCII without ','")
        self._nonce = self._client_nonce + server_nonce
        salt = base64.b64encode(secret.salt).decode("ascii")
        self._server_first = f"r={self._nonce},s={salt},i={secret.iterations}"
        self._state = _State.WAIT_CLIENT_FINAL
        return Challenge(self._server_first.encode("ascii"))

    # -- steps -----------------------------------------------------------

    def _client_first(self, text: str) -> SaslEvent:
        """Parse gs2-header and client-first-message-bare (RFC 5802 §7)."""
        flag, sep, rest = text.partition(",")
        authz_field, sep2, bare = rest.partition(",")
        if not (sep and sep2):
            raise _Malformed("missing GS2 header")
        self._gs2_header = text[: len(text) - len(bare)]

        failure = self._check_binding_flag(flag)
        if failure is not None:
            return failure

        if authz_field:
            if not authz_field.startswith("a="):
                raise _Malformed("bad authzid field")
            self._authzid = _decode_saslname(authz_field[2:])

        attrs = bare.split(",")
        if attrs[0].startswith("m="):
            raise _Malformed("mandatory extension not supported")
        if len(attrs) < 2 or not attrs[0].startswith("n=") or not attrs[1].startswith("r="):
            raise _Malformed("expected n=<user>,r=<nonce>")
        self._check_extensions(attrs[2:])
        if not _PRINTABLE.fullmatch(attrs[1][2:]):
            raise _Malformed("bad client nonce")
        try:
            # RFC 5802 §5.1: the user name is prepared as a query string.
            username = saslprep(_decode_saslname(attrs[0][2:]), allow_unassigned=True)
        except SASLprepError as exc:
            raise _Malformed("invalid characters in user name") from exc
        if not username:
            raise _Malformed("empty user name")

        self._username = username
        self._client_nonce = attrs[1][2:]
        self._client_first_bare = bare
        self._state = _State.WAIT_SECRET
        return NeedSecret(username, self._authzid, self.base_mechanism)

    def _check_binding_flag(self, flag: str) -> Failure | None:
        """Apply RFC 5802 §6 channel-binding rules to the gs2-cbind-flag."""
        if flag.startswith("p="):
            cb_name = flag[2:]
            if not _CB_NAME.fullmatch(cb_name):
                raise _Malformed("bad channel-binding type name")
            if not self.plus:
                return self._fail("malformed-request", "channel binding needs a -PLUS mechanism")
            if cb_name not in self._cb.supported():
                return self._fail("not-authorized", f"channel binding {cb_name} not available")
            self._cb_data = self._cb.types[cb_name]
            return None
        if flag not in ("n", "y"):
            raise _Malformed("bad GS2 channel-binding flag")
        if self.plus:
            return self._fail("malformed-request", "-PLUS mechanism without channel binding")
        if flag == "y" and self._cb_offered:
            # The client can bind and we offered binding, so someone stripped
            # the -PLUS mechanisms from our features: a downgrade attack.
            return self._fail("not-authorized", "channel binding downgrade detected")
        return None

    def _client_final(self, text: str) -> SaslEvent:
        """Check c=, r= and p= of the client-final message and answer v=."""
        assert self._secret is not None
        attrs = text.split(",")
        if (
            len(attrs) < 3
            or not attrs[0].startswith("c=")
            or not attrs[1].startswith("r=")
            or not attrs[-1].startswith("p=")
        ):
            raise _Malformed("expected c=<binding>,r=<nonce>,...,p=<proof>")
        self._check_extensions(attrs[2:-1])
        cb_input = _b64decode(attrs[0][2:])
        proof = _b64decode(attrs[-1][2:])
        without_proof = ",".join(attrs[:-1])

        expected_cb = self._gs2_header.encode("utf-8") + self._cb_data
        if not hmac.compare_digest(cb_input, expected_cb):
            return self._fail("not-authorized", "channel binding mismatch")
        if attrs[1][2:] != self._nonce:
            return self._fail("not-authorized", "nonce mismatch")

        secret = self._secret
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof))
        auth_bytes = auth_message.encode("utf-8")
        client_signature = hmac.digest(secret.stored_key, auth_bytes, self._digest)
        if len(proof) != len(client_signature):
            raise _Malformed("client proof has the wrong length")
        client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
        stored_key = hashlib.new(self._digest, client_key).digest()
        # Compare even for unknown users so both paths cost the same.
        proof_ok = hmac.compare_digest(stored_key, secret.stored_key)
        if self._unknown_user or not proof_ok:
            return self._fail("not-authorized")
        server_signature = hmac.digest(secret.server_key, auth_bytes, self._digest)
        self._state = _State.DONE
        return Success(b"v=" + base64.b64encode(server_signature), self._username, self._authzid)

    # -- helpers ---------------------------------------------------------

    @staticmethod
    def _check_extensions(attrs: list[str]) -> None:
        """Optional trailing extensions must at least be `ALPHA=value`; they
        are ignored (RFC 5802 §7 grammar). A reserved `m=` is never allowed."""
        for attr in attrs:
            if not _ATTR_VAL.fullmatch(attr) or attr.startswith("m="):
                raise _Malformed("bad attribute")

    def _mock_secret(self) -> ScramSecret:
        """A stand-in secret for a user that does not exist (see module doc).

        The keys are random, so no proof can match; the salt is stable per
        user name so the server-first message looks like a real account's.
        """
        key = f"{self.base_mechanism}\x00{self._username}".encode()
        salt = hmac.digest(self._mock_salt_key, key, "sha256")[:SALT_BYTES]
        size = hashlib.new(self._digest).digest_size
        return ScramSecret(
            self.base_mechanism, DEFAULT_ITERATIONS, salt, os.urandom(size), os.urandom(size)
        )

    def _fail(self, condition: str, text: str | None = None) -> Failure:
        self._state = _State.DONE
        return Failure(condition, text)
