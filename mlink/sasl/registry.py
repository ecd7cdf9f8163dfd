"""Pluggable SASL: mechanisms register, and ask for credentials generically.

Why: the stream machine must not know any mechanism. A `MechanismProvider`
says whether it can be offered on a stream (TLS up, channel binding
available, ...) and makes a fresh mechanism object per `<auth/>`. A
mechanism that needs something from outside (a password check, a SCRAM
secret, a client certificate, a policy decision) returns one generic event,
`NeedCredential(kind, username, authzid, detail)`; the connection finds the
`CredentialSource` registered for that kind, awaits its answer and hands it
back with `provide()`. Adding EXTERNAL, SASL2 or FAST therefore means
registering a provider and a source from a module, and touches no core
file.

Sans-IO like the rest of `mlink.sasl`: sources are declared here as
awaitables, but this file never imports Trio or runs them.
"""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlink.sasl.channel_binding import (
    CB_TYPES_BY_PREFERENCE,
    SASL_CB_NS,
    ChannelBinding,
    channel_binding_element_types,
)
from mlink.sasl.events import (
    Challenge,
    Failure,
    NeedPassword,
    NeedSecret,
    SaslEvent,
    SaslStateError,
    Success,
)
from mlink.sasl.plain import PlainMechanism
from mlink.sasl.scram import ScramMechanism

SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
# Credential kinds the built-in mechanisms ask for.
PASSWORD = "password"  # detail: {"password": str}; answer: bool
SCRAM_SECRET = "scram-secret"  # detail: {"mechanism": base name}; answer: ScramSecret | None
# Strengths of the built-in mechanisms: clients pick the first one they
# support from the advertised list, so the strongest goes first.
STRENGTH_SCRAM_PLUS = 400
STRENGTH_SCRAM = 300
STRENGTH_PLAIN = 100


@dataclass(frozen=True, slots=True)
class NeedCredential:
    """The mechanism needs `kind` for `username` before it can go on; the
    connection answers with `provide(answer)`. `detail` never goes into a
    log line whole (it may hold a password)."""

    kind: str
    username: str
    authzid: str | None
    detail: Mapping[str, Any] = field(default_factory=dict, repr=False)


class CredentialUnavailable:
    """The answer when the source could not decide (the directory is down):
    the stream answers `temporary-auth-failure`."""


UNAVAILABLE = CredentialUnavailable()


@dataclass(frozen=True, slots=True)
class CredentialAnswer:
    """An answer with conditions attached: `value` goes to the mechanism;
    if the exchange then succeeds (the client proved its password),
    `refusal` (an RFC 6120 §6.5 condition and a text) is sent instead of
    success — so only someone who knows the password learns that the
    account is locked or expired — and `notice` is shown to the user after
    login (a password expiry warning)."""

    value: Any
    refusal: tuple[str, str] | None = None
    notice: str | None = None
GenericEvent = Challenge | NeedCredential | Success | Failure


@dataclass(frozen=True, slots=True)
class SaslStreamInfo:
    """What a provider may know of the stream it is offered on."""

    domain: str
    tls_active: bool
    channel_binding: Mapping[str, bytes]
    # Whether any -PLUS mechanism is advertised on this stream (SCRAM's
    # downgrade protection needs to know).
    plus_offered: bool = False
    # Key for the believable salts of unknown SCRAM users: one per server
    # (kept in the data directory), so every shard answers alike.
    mock_salt_key: bytes | None = None
    # PLAIN sends the password: offered on encrypted streams, or when the
    # operator made TLS optional.
    plain_allowed: bool = False
    # The client's certificate (DER), verified by the TLS layer against the
    # configured client CAs; None when it sent none (SASL EXTERNAL).
    peer_certificate: bytes | None = None


class Mechanism(Protocol):
    @property
    def name(self) -> str: ...

    def receive(self, data: bytes | None) -> GenericEvent: ...
    def provide(self, answer: Any) -> GenericEvent: ...


class MechanismProvider(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def strength(self) -> int:
        """Advertised strongest first."""

    def offered(self, stream: SaslStreamInfo) -> bool: ...
    def create(self, stream: SaslStreamInfo) -> Mechanism: ...


# Answers one request: (the bare JID the stream resolved the user name to,
# the request) -> the answer the mechanism expects, or UNAVAILABLE.
CredentialSource = Callable[[str, NeedCredential], Awaitable[Any]]


class SaslRegistry:
    """The mechanisms and credential sources of one server."""

    def __init__(self) -> None:
        self._providers: dict[str, MechanismProvider] = {}
        self._sources: dict[str, CredentialSource] = {}

    def add_mechanism(self, provider: MechanismProvider) -> None:
        self._providers[provider.name] = provider

    def add_credential_source(self, kind: str, source: CredentialSource) -> None:
        self._sources[kind] = source

    def source(self, kind: str) -> CredentialSource | None:
        return self._sources.get(kind)

    def offered(self, stream: SaslStreamInfo) -> list[MechanismProvider]:
        """Providers to advertise on `stream`, strongest first."""
        found = [p for p in self._providers.values() if p.offered(stream)]
        found.sort(key=lambda p: -p.strength)
        return found

    def features(self, stream: SaslStreamInfo, names: list[str]) -> list[ET.Element]:
        """<mechanisms/> and, with channel binding, XEP-0440's list of the
        binding types we can verify."""
        if not names:
            return []
        mechanisms = ET.Element(f"{{{SASL_NS}}}mechanisms")
        for name in names:
            ET.SubElement(mechanisms, f"{{{SASL_NS}}}mechanism").text = name
        out = [mechanisms]
        if stream.channel_binding:
            binding = ET.Element(f"{{{SASL_CB_NS}}}sasl-channel-binding")
            for cb_type in channel_binding_element_types(set(stream.channel_binding)):
                ET.SubElement(binding, f"{{{SASL_CB_NS}}}channel-binding", {"type": cb_type})
            out.append(binding)
        return out


# -- the built-in mechanisms -----------------------------------------------------------


def _generic(event: SaslEvent) -> GenericEvent:
    """The classic mechanisms' own events in the generic shape."""
    if isinstance(event, NeedPassword):
        return NeedCredential(PASSWORD, event.username, event.authzid,
                              {"password": event.password})
    if isinstance(event, NeedSecret):
        return NeedCredential(SCRAM_SECRET, event.username, event.authzid,
                              {"mechanism": event.mechanism})
    return event


class _Plain:
    def __init__(self) -> None:
        self.name = "PLAIN"
        self._mech = PlainMechanism()

    def receive(self, data: bytes | None) -> GenericEvent:
        return _generic(self._mech.receive(data))

    def provide(self, answer: Any) -> GenericEvent:
        if not isinstance(answer, bool):
            raise SaslStateError(f"PLAIN expects a bool, got {type(answer).__name__}")
        return _generic(self._mech.password_result(answer))


class _Scram:
    def __init__(self, name: str, stream: SaslStreamInfo) -> None:
        self.name = name
        plus = name.endswith("-PLUS")
        binding = ChannelBinding(dict(stream.channel_binding)) if stream.channel_binding else None
        self._mech = ScramMechanism(name.removesuffix("-PLUS"), plus, binding,
                                    stream.plus_offered, mock_salt_key=stream.mock_salt_key)

    def receive(self, data: bytes | None) -> GenericEvent:
        return _generic(self._mech.receive(data))

    def provide(self, answer: Any) -> GenericEvent:
        return _generic(self._mech.provide_secret(answer))


@dataclass(frozen=True, slots=True)
class PlainProvider:
    name: str = "PLAIN"
    strength: int = STRENGTH_PLAIN

    def offered(self, stream: SaslStreamInfo) -> bool:
        return stream.plain_allowed

    def create(self, stream: SaslStreamInfo) -> Mechanism:
        return _Plain()


@dataclass(frozen=True, slots=True)
class ScramProvider:
    name: str
    strength: int

    def offered(self, stream: SaslStreamInfo) -> bool:
        if not self.name.endswith("-PLUS"):
            return True
        return stream.tls_active and any(t in CB_TYPES_BY_PREFERENCE
                                         for t in stream.channel_binding)

    def create(self, stream: SaslStreamInfo) -> Mechanism:
        return _Scram(self.name, stream)


def builtin_providers() -> list[MechanismProvider]:
    """SCRAM-SHA-256(-PLUS), SCRAM-SHA-1(-PLUS), PLAIN. DIGEST-MD5 is never
    offered (RFC 6331 moved it to Historic)."""
    return [
        ScramProvider("SCRAM-SHA-256-PLUS", STRENGTH_SCRAM_PLUS + 1),
        ScramProvider("SCRAM-SHA-1-PLUS", STRENGTH_SCRAM_PLUS),
        ScramProvider("SCRAM-SHA-256", STRENGTH_SCRAM + 1),
        ScramProvider("SCRAM-SHA-1", STRENGTH_SCRAM),
        PlainProvider(),
    ]


def encode_sasl(tag: str, data: bytes | None) -> bytes:
    """`<challenge/>` or `<success/>` with base64 data (RFC 6120 §6.4.2:
    '=' for empty data, no text for none)."""
    if data is None:
        return f"<{tag} xmlns='{SASL_NS}'/>".encode()
    payload = base64.b64encode(data).decode() if data else "="
    return f"<{tag} xmlns='{SASL_NS}'>{payload}</{tag}>".encode()
