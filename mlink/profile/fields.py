"""The profile fields: XEP-0154's names, their vCard elements and LDAP
attributes, and the policy that says who owns each one.

The table is XEP-0154's (see `../shared/design/profile-mapping.md`): every
field maps to an LDAP attribute where XEP-0154 names one, and to a vCard
(XEP-0054) element where one exists. The configuration (`<profiles>`) may
change a field's attribute and policy; fields it does not list take these
defaults:

- mapped fields: `update` on the embedded backend (the standalone server is
  the only place users can edit their entry, so their vCard edits go there)
  and `directory` on LDAP (the directory is centrally managed; an
  administrator opens fields such as `mobile` to users explicitly);
- identity fields (`email` → mail, `system_username` → uid) and any field
  on the attribute that holds the JID: always `directory` by default, and
  `update` is refused for them in the configuration, because changing them
  would rename or break the user's account;
- unmapped fields (`nickname`, `birthday`): `local` (mlink's store).

A field maps to at most one attribute for writing. XEP-0154 gives two for
`postaladdress` and `primary_org_unit`, and `display_name` falls back to
`cn`; reads take the first of them that has values, writes go to the first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mlink.config_model import Config, ProfileFieldConfig

POLICIES = ("directory", "update", "static", "local")
# Policies whose values come from the user's directory entry.
DIRECTORY_POLICIES = frozenset({"directory", "update"})
# The embedded directory names users by `mail=<bare JID>` (mlink.directory.embedded).
EMBEDDED_JID_ATTRIBUTE = "mail"


@dataclass(frozen=True, slots=True)
class FieldDef:
    """One row of the XEP-0154 table."""

    name: str
    vcard: str | None  # vCard element path, e.g. "N/FAMILY"; None: not in vCards
    attributes: tuple[str, ...]  # LDAP attributes (XEP-0154); () = unmapped
    binary: bool = False  # values are bytes (the photo), not text
    # One value only: shown and compared as the first value read. FN is one
    # name, but its fallback `cn` often holds several (mlink adds a digest
    # name for JIDs a DN cannot hold).
    single: bool = False


def _f(name: str, vcard: str | None, *attributes: str, binary: bool = False,
       single: bool = False) -> FieldDef:
    return FieldDef(name, vcard, attributes, binary, single)


# XEP-0154 §2 field → vCard element → LDAP attribute(s). URL, ROLE and DESC
# follow ejabberd's default map; XEP-0054 spells the room element EXTADD.
FIELD_TABLE: tuple[FieldDef, ...] = (
    # FN falls back to cn: most directory entries have no displayName, and cn
    # (required by person) is the name the directory shows for them.
    _f("display_name", "FN", "displayName", "cn", single=True),
    _f("familiar_name", None, "eduPersonNickname"),
    _f("family_name", "N/FAMILY", "sn"),
    _f("given_name", "N/GIVEN", "givenName"),
    _f("nickname", "NICKNAME"),
    _f("birthday", "BDAY"),
    _f("country", "ADR/CTRY", "c"),
    _f("region", "ADR/REGION", "st"),
    _f("locality", "ADR/LOCALITY", "l"),
    _f("street", "ADR/STREET", "street"),
    _f("room", "ADR/EXTADD", "roomNumber"),
    _f("postalbox", "ADR/POBOX", "postOfficeBox"),
    _f("postalcode", "ADR/PCODE", "postalCode"),
    _f("postaladdress", None, "postalAddress", "homePostalAddress"),
    _f("fax", "TEL/FAX", "facsimileTelephoneNumber"),
    _f("landline", "TEL/VOICE", "telephoneNumber"),
    _f("mobile", "TEL/CELL", "mobile"),
    _f("pager", "TEL/PAGER", "pager"),
    _f("email", "EMAIL/USERID", "mail"),
    _f("homepage", "URL", "labeledURI"),
    _f("affiliation", None, "eduPersonAffiliation"),
    _f("primary_affiliation", None, "eduPersonPrimaryAffiliation"),
    _f("assistant", None, "secretary"),
    _f("business_category", None, "businessCategory"),
    _f("department_number", None, "departmentNumber"),
    _f("employee_number", None, "employeeNumber"),
    _f("employee_type", "ROLE", "employeeType"),
    _f("job_title", "TITLE", "title"),
    _f("manager", None, "manager"),
    _f("org_name", "ORG/ORGNAME", "o"),
    _f("org_unit", "ORG/ORGUNIT", "ou"),
    _f("primary_org_unit", None, "ou", "eduPersonPrimaryOrgUnitDN"),
    _f("system_username", None, "uid"),
    _f("description", "DESC", "description"),
    _f("languages_well", None, "preferredLanguage"),
    _f("car_license_number", None, "carLicense"),
    _f("photo_data", "PHOTO/BINVAL", "jpegPhoto", binary=True),
)
FIELDS: dict[str, FieldDef] = {f.name: f for f in FIELD_TABLE}
PHOTO_FIELD = "photo_data"
# Attributes every user entry must keep: inetOrgPerson inherits person's
# MUST cn $ sn (RFC 4519 §3.12), so a directory refuses to remove them and
# a field written to one of them can be changed but never cleared.
REQUIRED_ATTRIBUTES = frozenset({"cn", "sn"})
# Fields naming the account itself: users must never rename themselves.
IDENTITY_FIELDS = frozenset({"email", "system_username"})


class ProfileConfigError(ValueError):
    """The `<profiles>` configuration names an unknown field or policy, or
    combines them in a way that cannot work; the message says which."""


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """A field as this server runs it: the table row plus configuration."""

    name: str
    policy: str
    vcard: str | None
    # Attributes read (first with values wins); the first is written.
    attributes: tuple[str, ...]
    binary: bool
    static_value: str | None = None
    single: bool = False  # only the first value counts (FieldDef.single)

    @property
    def from_directory(self) -> bool:
        return self.policy in DIRECTORY_POLICIES

    @property
    def managed(self) -> bool:
        """Owned by the directory or the configuration: users may not change it."""
        return self.policy in ("directory", "static")

    @property
    def clearable(self) -> bool:
        """Whether a user may remove the field's value: not when it is
        managed, nor when the entry's schema requires its attribute."""
        return not self.managed and not (
            self.from_directory and self.attribute.lower() in REQUIRED_ATTRIBUTES)

    @property
    def attribute(self) -> str:
        """The attribute writes go to (directory policies only)."""
        return self.attributes[0]


def jid_attribute(config: Config) -> str:
    """The attribute holding a user's JID in the configured directory."""
    if config.directory.backend.lower() == "ldap":
        return config.directory.ldap.jid_attribute
    return EMBEDDED_JID_ATTRIBUTE


def _default(row: FieldDef, backend: str, jid_attr: str) -> FieldSpec:
    if not row.attributes:
        policy = "local"
    elif row.name in IDENTITY_FIELDS or jid_attr.lower() in (a.lower() for a in row.attributes):
        policy = "directory"
    else:
        policy = "update" if backend == "embedded" else "directory"
    return FieldSpec(row.name, policy, row.vcard, row.attributes, row.binary,
                     single=row.single)


def _configured(row: FieldDef, cfg: ProfileFieldConfig, jid_attr: str) -> FieldSpec:
    policy = cfg.policy.strip().lower()
    where = f"profile field {row.name!r}"
    if policy not in POLICIES:
        raise ProfileConfigError(
            f"{where}: unknown policy {cfg.policy!r} (one of {', '.join(POLICIES)})")
    attributes = (cfg.attribute.strip(),) if cfg.attribute else row.attributes
    if policy in DIRECTORY_POLICIES and not attributes:
        raise ProfileConfigError(
            f"{where}: policy {policy!r} needs an LDAP attribute (XEP-0154 maps none)")
    if policy == "update" and (
        row.name in IDENTITY_FIELDS or attributes[0].lower() == jid_attr.lower()
    ):
        raise ProfileConfigError(
            f"{where}: policy 'update' would let users rename their own account "
            f"(attribute {attributes[0]!r}); use 'directory'")
    if policy == "static":
        if cfg.value is None:
            raise ProfileConfigError(f"{where}: policy 'static' needs a value")
        if row.binary:
            raise ProfileConfigError(f"{where}: a binary field cannot be static")
    return FieldSpec(row.name, policy, row.vcard, attributes, row.binary,
                     cfg.value if policy == "static" else None, single=row.single)


def resolve_fields(config: Config) -> dict[str, FieldSpec]:
    """Every field with its effective policy and attributes, in table order.

    Raises ProfileConfigError for an unknown field name, an unknown policy,
    a field configured twice, a static field without a value, a directory
    policy without an attribute, or `update` on an identity attribute."""
    backend = config.directory.backend.lower()
    jid_attr = jid_attribute(config)
    configured: dict[str, ProfileFieldConfig] = {}
    for cfg in config.profiles.fields:
        name = cfg.name.strip()
        if name not in FIELDS:
            raise ProfileConfigError(
                f"unknown profile field {cfg.name!r}; known fields: {', '.join(FIELDS)}")
        if name in configured:
            raise ProfileConfigError(f"profile field {name!r} is configured twice")
        configured[name] = cfg
    specs: dict[str, FieldSpec] = {}
    for row in FIELD_TABLE:
        found = configured.get(row.name)
        specs[row.name] = (_default(row, backend, jid_attr) if found is None
                           else _configured(row, found, jid_attr))
    if config.profiles.cache_seconds < 0:
        raise ProfileConfigError("profiles cache-seconds must not be negative")
    if config.profiles.max_photo_bytes <= 0:
        raise ProfileConfigError("profiles max-photo-bytes must be positive")
    return specs


def check_profiles(config: Config) -> list[str]:
    """Problems with the profile configuration, for `mlink check` (empty
    when it is usable). The server refuses to start on the same problems."""
    try:
        resolve_fields(config)
    except ProfileConfigError as exc:
        return [str(exc)]
    return []


def directory_attributes(specs: Iterable[FieldSpec]) -> list[str]:
    """The attributes to read from a user's entry, each once."""
    seen: dict[str, None] = {}
    for spec in specs:
        if spec.from_directory:
            for attr in spec.attributes:
                seen.setdefault(attr, None)
    return list(seen)
