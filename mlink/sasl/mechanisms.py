"""Which SASL mechanisms mlink offers, and the factory the stream layer uses.

Why a single entry point: the stream layer should not know mechanism
classes. It asks `available_mechanisms()` what to advertise, and for each
`<auth mechanism='X'/>` calls `create_mechanism()` and then drives the
returned object with `receive()` (plus `password_result()` for PLAIN or
`provide_secret()` for SCRAM), acting on the events from `mlink.sasl.events`.

DIGEST-MD5 is never offered (RFC 6331 moved it to Historic). Sans-IO: no trio.
"""

from __future__ import annotations

from collections.abc import Iterable

from mlink.sasl.channel_binding import (
    CB_TYPES_BY_PREFERENCE,
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
MECHANISM_NAMES: tuple[str, ...] = (
    "SCRAM-SHA-256-PLUS",
    "SCRAM-SHA-1-PLUS",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1",
    "PLAIN",
)

Mechanism = PlainMechanism | ScramMechanism


def available_mechanisms(tls: bool, cb_types: Iterable[str], plain_allowed: bool) -> list[str]:
    """The mechanism names to advertise on one connection, strongest first.

    -PLUS variants need TLS and at least one channel-binding type mlink
    understands; PLAIN is listed only when the caller allows it (TLS is up,
    or the operator does not require TLS), because it sends the password.
    """
    has_cb = tls and any(name in CB_TYPES_BY_PREFERENCE for name in cb_types)
    names: list[str] = []
    for name in MECHANISM_NAMES:
        if name.endswith("-PLUS") and not has_cb:
            continue
        if name == "PLAIN" and not plain_allowed:
            continue
        names.append(name)
    return names


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
