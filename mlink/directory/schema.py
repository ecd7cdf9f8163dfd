"""The user-entry schema the embedded port enforces on a modify.

The embedded file must stay loadable by `slapadd` and behave like slapd, so
a change slapd would refuse is refused here too, with a message in slapd's
words (`DirectoryRefused`): an attribute the entry's classes do not allow,
several values for a single-valued attribute, a text value that is not
UTF-8, removing a required attribute. The classes are those of a user entry
(person, organizationalPerson, inetOrgPerson: RFC 4519 and RFC 2798;
mlinkUser: conf/mlink-schema.ldif).

Credentials and identity are refused by `check_writable`, on both backends
(`mlink.directory.core` calls it before any profile write; see
`mlink.directory.names.CREDENTIAL_ATTRIBUTES`): they are not profile data.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from mlink.directory.base import DirectoryRefused
from mlink.directory.names import CREDENTIAL_ATTRIBUTES

# Canonical spelling of every attribute a user entry may hold.
_PERSON = ("cn", "sn", "userPassword", "telephoneNumber", "seeAlso", "description")
_ORGANIZATIONAL_PERSON = (
    "title", "x121Address", "registeredAddress", "destinationIndicator",
    "preferredDeliveryMethod", "telexNumber", "teletexTerminalIdentifier",
    "internationaliSDNNumber", "facsimileTelephoneNumber", "street", "postOfficeBox",
    "postalCode", "postalAddress", "physicalDeliveryOfficeName", "ou", "st", "l",
)
_INET_ORG_PERSON = (
    "audio", "businessCategory", "carLicense", "departmentNumber", "displayName",
    "employeeNumber", "employeeType", "givenName", "homePhone", "homePostalAddress",
    "initials", "jpegPhoto", "labeledURI", "mail", "manager", "mobile", "o", "pager",
    "photo", "roomNumber", "secretary", "uid", "userCertificate", "x500uniqueIdentifier",
    "preferredLanguage", "userSMIMECertificate", "userPKCS12",
)
_MLINK_USER = ("authPassword", "mlinkRosterItem")

USER_ATTRIBUTES: dict[str, str] = {
    name.lower(): name
    for name in (*_PERSON, *_ORGANIZATIONAL_PERSON, *_INET_ORG_PERSON, *_MLINK_USER)
}
# Other names of the same attribute types (RFC 4519), so that a mapping
# written with either name reads and writes the one attribute.
ALIASES: dict[str, str] = {
    "commonname": "cn", "surname": "sn", "localityname": "l",
    "stateorprovincename": "st", "streetaddress": "street", "organizationname": "o",
    "organizationalunitname": "ou", "userid": "uid", "rfc822mailbox": "mail",
    "gn": "givenName", "fax": "facsimileTelephoneNumber",
    "mobiletelephonenumber": "mobile", "pagertelephonenumber": "pager",
    "hometelephonenumber": "homePhone",
}
# Attributes whose values are octets, not text: stored as given.
BINARY_ATTRIBUTES = frozenset({
    "audio", "jpegphoto", "photo", "usercertificate", "usersmimecertificate", "userpkcs12",
})
# SINGLE-VALUE in RFC 2798.
SINGLE_VALUED = frozenset({"displayname", "employeenumber", "preferredlanguage"})
# MUST of person; the RDN attribute (mail) and objectClass are not changed
# through modify_user either.
REQUIRED = frozenset({"cn", "sn"})
NOT_MODIFIABLE = frozenset({"objectclass", "mail"})
# IA5String attributes (RFC 4519/2798): slapd refuses non-ASCII in them.
IA5_ATTRIBUTES = frozenset({"mail", "authpassword"})



@functools.lru_cache(maxsize=1024)
def canonical(name: str) -> str | None:
    """The canonical spelling of a user attribute, or None if it is not one.
    (Cached: a login asks it dozens of times of the same few names.)"""
    low = name.strip().lower()
    low = ALIASES.get(low, low).lower()
    return USER_ATTRIBUTES.get(low)


def decode_values(name: str, values: Sequence[str | bytes]) -> list[str | bytes]:
    """`values` of attribute `name` (canonical) as the embedded file keeps
    them: octets for binary attributes, text otherwise; DirectoryRefused in
    slapd's words for a value that breaks the syntax or comes twice."""
    low = name.lower()
    decoded: list[str | bytes] = []
    for value in values:
        if low in BINARY_ATTRIBUTES:
            decoded.append(value if isinstance(value, bytes) else value.encode("utf-8"))
            continue
        invalid = f"{name}: value #{len(decoded)} invalid per syntax"
        if isinstance(value, bytes | bytearray):
            try:
                text = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise DirectoryRefused(invalid) from None
        else:
            text = value
        if not text or (low in IA5_ATTRIBUTES and not text.isascii()):
            raise DirectoryRefused(invalid)
        decoded.append(text)
    keys: set[str | bytes] = set()
    for index, value in enumerate(decoded):
        # Without case, as bonsai's value list compares them (even for
        # caseExactMatch attributes): both backends refuse the same.
        key = value.lower() if isinstance(value, str) else value
        if key in keys:
            raise DirectoryRefused(f"{name}: value #{index} provided more than once")
        keys.add(key)
    return decoded


def check_user_attribute(raw_name: str, values_after: Sequence[str | bytes]) -> str:
    """The canonical name of `raw_name`, after checking that a user entry
    may hold `values_after` in it (allowed by its classes, single-valued
    attributes, the MUST attributes of person); DirectoryRefused otherwise."""
    name = canonical(raw_name)
    if name is None:
        raise DirectoryRefused(f"attribute '{raw_name}' not allowed")
    low = name.lower()
    if low in REQUIRED and not values_after:
        raise DirectoryRefused(f"object class 'person' requires attribute '{name}'")
    if low in SINGLE_VALUED and len(values_after) > 1:
        raise DirectoryRefused(f"attribute '{name}' cannot have multiple values")
    return name


def check_writable(low: str, jid_attribute: str, shown: str) -> None:
    """Refuse credentials, the JID attribute and the entry's classes, on
    either backend: changing them through a profile would change a password
    or the user's identity."""
    if low in CREDENTIAL_ATTRIBUTES:
        raise DirectoryRefused(f"'{shown}' holds credentials: change it with set_password")
    if low == jid_attribute.lower() or low in NOT_MODIFIABLE:
        raise DirectoryRefused(f"'{shown}' identifies the user and cannot be changed here")
