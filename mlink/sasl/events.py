"""Events a sans-IO SASL mechanism returns to the stream layer.

Why events: the mechanisms never touch the network or the directory. Each
`receive()` returns one of these values and the caller does the I/O (send a
`<challenge/>`, query LDAP, send `<success/>` or `<failure/>`), in the style
of h11. This keeps `mlink.sasl` free of trio and trivially testable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "FAILURE_CONDITIONS",
    "Challenge",
    "Failure",
    "NeedPassword",
    "NeedSecret",
    "SaslEvent",
    "SaslStateError",
    "Success",
]

# RFC 6120 §6.5: the only conditions an XMPP <failure/> may carry.
FAILURE_CONDITIONS: frozenset[str] = frozenset(
    {
        "aborted",
        "account-disabled",
        "credentials-expired",
        "encryption-required",
        "incorrect-encoding",
        "invalid-authzid",
        "invalid-mechanism",
        "malformed-request",
        "mechanism-too-weak",
        "not-authorized",
        "temporary-auth-failure",
    }
)


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send `<challenge/>` with these bytes (base64-encoded by the caller)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class NeedPassword:
    """PLAIN parsed: check the password, then call `password_result(ok)`.

    The password is kept out of `repr()` so that logging an event never
    writes a credential to disk.
    """

    username: str
    password: str = field(repr=False)
    authzid: str | None


@dataclass(frozen=True, slots=True)
class NeedSecret:
    """SCRAM client-first parsed: look up the user's ScramSecret for the base
    mechanism (`mechanism`, never a -PLUS name), then call `provide_secret`."""

    username: str
    authzid: str | None
    mechanism: str


@dataclass(frozen=True, slots=True)
class Success:
    """Authentication succeeded: send `<success/>` with `additional_data`
    (None → empty element). `username` is the SASLprep-ed authcid; the caller
    still has to validate `authzid` (see `mlink.sasl.plain.authzid_allowed`)."""

    additional_data: bytes | None
    username: str
    authzid: str | None


@dataclass(frozen=True, slots=True)
class Failure:
    """Send `<failure><condition/>[<text/>]</failure>`.

    `text` goes to the client, so it never says whether the user exists.
    """

    condition: str
    text: str | None = None

    def __post_init__(self) -> None:
        if self.condition not in FAILURE_CONDITIONS:
            raise ValueError(f"not an RFC 6120 SASL failure condition: {self.condition!r}")


SaslEvent = Challenge | NeedPassword | NeedSecret | Success | Failure


class SaslStateError(RuntimeError):
    """The caller used a mechanism out of order (e.g. `receive()` while it
    waits for `provide_secret()`). This is a bug in mlink, not a client
    error, so it raises rather than returning a Failure."""
