"""JIDs (RFC 7622): parse, prepare and compare.

Localparts use the PRECIS UsernameCaseMapped profile, resourceparts the
OpaqueString profile and domainparts IDNA-style lowercase, so two spellings
of one address compare equal everywhere in the server.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import precis_i18n

_USERNAME = precis_i18n.get_profile("UsernameCaseMapped")
_OPAQUE = precis_i18n.get_profile("OpaqueString")

# RFC 7622 §3.1: each part is at most 1023 octets once prepared.
MAX_PART_BYTES = 1023
# RFC 7622 §3.3.1: characters a localpart may never contain.
_LOCAL_FORBIDDEN = set("\"&'/:<>@")


class InvalidJID(ValueError):
    """Not a valid JID; stanza error `jid-malformed`."""


def prep_localpart(local: str) -> str:
    try:
        out = _USERNAME.enforce(local)
    except UnicodeError as exc:
        raise InvalidJID(f"bad localpart: {exc}") from None
    if not out or _LOCAL_FORBIDDEN & set(out) or len(out.encode()) > MAX_PART_BYTES:
        raise InvalidJID("bad localpart")
    return out


def prep_resource(resource: str) -> str:
    try:
        out = _OPAQUE.enforce(resource)
    except UnicodeError as exc:
        raise InvalidJID(f"bad resourcepart: {exc}") from None
    if not out or len(out.encode()) > MAX_PART_BYTES:
        raise InvalidJID("bad resourcepart")
    return out


def prep_domain(domain: str) -> str:
    domain = domain.rstrip(".")
    if not domain:
        raise InvalidJID("empty domainpart")
    try:
        out = (
            domain.encode("idna").decode("ascii").lower()
            if not domain.isascii()
            else domain.lower()
        )
    except UnicodeError as exc:
        raise InvalidJID(f"bad domainpart: {exc}") from None
    if len(out) > MAX_PART_BYTES or any(c in out for c in " /@<>'\"&") or ".." in out:
        raise InvalidJID("bad domainpart")
    return out


class JID(NamedTuple):
    local: str
    domain: str
    resource: str

    @property
    def bare(self) -> JID:
        return JID(self.local, self.domain, "")

    def __str__(self) -> str:
        out = f"{self.local}@{self.domain}" if self.local else self.domain
        return f"{out}/{self.resource}" if self.resource else out


@lru_cache(maxsize=65536)
def parse_jid(text: str) -> JID:
    """Parse and prepare `text`; InvalidJID when it cannot be a JID."""
    rest, slash, resource = text.partition("/")
    if slash and not resource:
        raise InvalidJID("empty resourcepart")
    local, at, domain = rest.rpartition("@")
    if at and not local:
        raise InvalidJID("empty localpart")
    return JID(
        prep_localpart(local) if at else "",
        prep_domain(domain),
        prep_resource(resource) if slash else "",
    )
