"""SASL PLAIN (RFC 4616), server side, sans-IO.

Why PLAIN at all: the directory may hold only a password hash that SCRAM
cannot use, and some clients know nothing else. mlink offers it only over
TLS (or when the operator disabled the TLS requirement).
"""

from __future__ import annotations

from enum import Enum, auto

from mlink.sasl.events import (
    Challenge,
    Failure,
    NeedPassword,
    SaslEvent,
    SaslStateError,
    Success,
)
from mlink.sasl.saslprep import SASLprepError, saslprep

__all__ = ["MAX_PLAIN_MESSAGE", "PlainMechanism", "authzid_allowed"]

# RFC 4616 §2 requires servers to accept at least 255 octets for each of
# authzid, authcid and passwd. 4 KiB leaves room for long generated passwords
# while bounding the SASLprep work a hostile client can make us do.
MAX_PLAIN_MESSAGE = 4096


class _State(Enum):
    START = auto()
    WAIT_RESPONSE = auto()
    WAIT_PASSWORD_CHECK = auto()
    DONE = auto()


class PlainMechanism:
    """One PLAIN attempt. Create a new instance per `<auth/>`."""

    name = "PLAIN"

    def __init__(self) -> None:
        self._state = _State.START
        self._username = ""
        self._authzid: str | None = None

    def receive(self, data: bytes | None) -> SaslEvent:
        """Feed the initial response (None when absent) or a `<response/>`."""
        if self._state is _State.WAIT_PASSWORD_CHECK:
            raise SaslStateError("PLAIN is waiting for password_result()")
        if self._state is _State.DONE:
            return self._fail("malformed-request", "authentication already finished")
        if self._state is _State.START and not data:
            # RFC 6120 §6.4.2: no (or an empty) initial response; ask for it
            # with an empty challenge, exactly once.
            self._state = _State.WAIT_RESPONSE
            return Challenge(b"")
        return self._parse(data or b"")

    def password_result(self, ok: bool) -> Success | Failure:
        """Report the directory's verdict on the password from NeedPassword."""
        if self._state is not _State.WAIT_PASSWORD_CHECK:
            raise SaslStateError("password_result() without a pending NeedPassword")
        self._state = _State.DONE
        if not ok:
            return Failure("not-authorized")
        return Success(None, self._username, self._authzid)

    def _parse(self, data: bytes) -> SaslEvent:
        """Split `[authzid] NUL authcid NUL passwd` and SASLprep the parts."""
        if len(data) > MAX_PLAIN_MESSAGE:
            return self._fail("malformed-request", "message too long")
        parts = data.split(b"\x00")
        if len(parts) != 3:
            return self._fail("malformed-request", "expected authzid NUL authcid NUL passwd")
        try:
            authzid, authcid, passwd = (part.decode("utf-8") for part in parts)
        except UnicodeDecodeError:
            return self._fail("malformed-request", "not UTF-8")
        try:
            # RFC 4616 §2: authcid and passwd are prepared as query strings.
            username = saslprep(authcid, allow_unassigned=True)
            password = saslprep(passwd, allow_unassigned=True)
        except SASLprepError:
            return self._fail("malformed-request", "invalid characters in credentials")
        if not username or not password:
            # RFC 4616 grammar: authcid and passwd are 1*SAFE.
            return self._fail("malformed-request", "empty user name or password")
        self._username = username
        self._authzid = authzid or None
        self._state = _State.WAIT_PASSWORD_CHECK
        return NeedPassword(username, password, self._authzid)

    def _fail(self, condition: str, text: str | None = None) -> Failure:
        self._state = _State.DONE
        return Failure(condition, text)


def authzid_allowed(authzid: str | None, username: str, domain: str) -> bool:
    """True when `authzid` names the authenticated user itself.

    mlink has no proxy authorisation: a client may only ask to act as its own
    bare JID (RFC 6120 §6.3.8), so anything else gets `invalid-authzid`. An
    absent or empty authzid means "derive it from the authcid" and is fine.
    The comparison case-folds both parts as a conservative stand-in for
    nodeprep/nameprep; resources are refused (an authzid is a bare JID).
    """
    if not authzid:
        return True
    local, sep, host = authzid.partition("@")
    if not sep or "/" in host or "@" in host:
        return False
    return local.casefold() == username.casefold() and (
        host.rstrip(".").casefold() == domain.rstrip(".").casefold()
    )
