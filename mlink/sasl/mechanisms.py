"""The built-in mechanisms as plain sans-IO objects, without the registry.

The stream layer offers and creates mechanisms through the registry
(`mlink.sasl.registry`), whose providers hold the advertising rules. This
module answers the same questions for code that drives `PlainMechanism` and
`ScramMechanism` directly (their own `password_result()` / `provide_secret()`
calls, as the tests do): `available_mechanisms()` is the registry's answer,
so there is one set of rules.

DIGEST-MD5 is never offered (RFC 6331 moved it to Historic). Sans-IO: no trio.
"""

from __future__ import annotations

from collections.abc import Iterable

from mlink.sasl.channel_binding import (
    ChannelBinding,
    channel_binding_element_types,
)
from mlink.sasl.events import (
    FAILURE_CONDITIONS,
    Challenge,
    Failure,
    NeedPassword,
    NeedSecret,
    SaslEvent,
    SaslStateError,
    Success,
)
from mlink.sasl.plain import PlainMechanism, authzid_allowed
from mlink.sasl.registry import SaslRegistry, SaslStreamInfo, builtin_providers
from mlink.sasl.scram import ScramMechanism

__all__ = [
    "FAILURE_CONDITIONS",
    "MECHANISM_NAMES",
    "Challenge",
    "ChannelBinding",
    "Failure",
    "Mechanism",
    "NeedPassword",
    "NeedSecret",
    "PlainMechanism",
    "SaslEvent",
    "SaslStateError",
    "ScramMechanism",
    "Success",
    "authzid_allowed",
    "available_mechanisms",
    "channel_binding_element_types",
    "create_mechanism",
]

# Everything mlink can run, strongest first. Clients generally pick the first
# mechanism they support from the advertised list, so order matters.
_BUILTIN = SaslRegistry()
for _provider in builtin_providers():
    _BUILTIN.add_mechanism(_provider)
MECHANISM_NAMES: tuple[str, ...] = tuple(
    p.name for p in sorted(builtin_providers(), key=lambda p: -p.strength))

Mechanism = PlainMechanism | ScramMechanism


def available_mechanisms(tls: bool, cb_types: Iterable[str], plain_allowed: bool) -> list[str]:
    """The mechanism names to advertise on one connection, strongest first.

    -PLUS variants need TLS and at least one channel-binding type mlink
    understands; PLAIN is listed only when the caller allows it (TLS is up,
    or the operator does not require TLS), because it sends the password.
    """
    stream = SaslStreamInfo(domain="", tls_active=tls,
                            channel_binding={name: b"" for name in cb_types},
                            plain_allowed=plain_allowed)
    return [p.name for p in _BUILTIN.offered(stream)]


def create_mechanism(
    name: str, channel_binding: ChannelBinding | None, cb_offered: bool
) -> Mechanism | None:
    """A fresh mechanism for `<auth mechanism=name/>`, or None if unknown.

    None means the caller answers `invalid-mechanism`; so does a -PLUS name
    when `channel_binding` has no usable type. The caller must still check
    that `name` was among the advertised ones (e.g. PLAIN without TLS).
    `cb_offered` is whether any -PLUS name was advertised on this connection.
    """
    if name == "PLAIN":
        return PlainMechanism()
    if name not in MECHANISM_NAMES:
        return None
    plus = name.endswith("-PLUS")
    base = name.removesuffix("-PLUS")
    if plus and (channel_binding is None or not channel_binding.supported()):
        return None
    return ScramMechanism(base, plus, channel_binding, cb_offered)
