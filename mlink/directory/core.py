"""The directory, written once on the port: accounts, groups, profile
attributes (and through them static rosters) and the change feed.

`PortDirectory` implements `mlink.directory.base.Directory` with nothing but
the operations of `mlink.directory.port.DirectoryPort`, so the LDAP server
and the embedded LDIF file get one behaviour: one way to find a user, one
set of write checks (credentials and identity are never profile data; see
`mlink.directory.schema.check_writable`), one group resolution. What
differs between backends is data, a `Layout` (where users live and which
attribute holds the JID), and what the server itself enforces (slapd's
schema, or the embedded port's imitation of it).

Users: one entry per user under `users_dn` matching `user_filter`, the bare
JID in `jid_attribute`, the RFC 5803 SCRAM secrets in `scram_attribute`. A
password is checked by binding as the user (the server's password policy
applies); it is set as SCRAM secrets (written here) plus `userPassword`
through the RFC 3062 password modify operation (hashed by the server), so no
clear password is ever stored.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import secrets as secrets_module
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import trio

from mlink.config_model import RosterGroupConfig
from mlink.directory.base import (
    DERIVE_THREADS,
    CertificateAuthority,
    Directory,
    DirectoryError,
    DirectoryGroup,
    DirectoryRefused,
    NoSuchUser,
    PasswordStatus,
    ScramLogin,
    UserExists,
)
from mlink.directory.filters import FilterError, parse_filter
from mlink.directory.groups import UserIndex, dedupe, group_attributes, resolve_group
from mlink.directory.ldif import Entry, Value
from mlink.directory.names import (
    CREDENTIAL_ATTRIBUTES,
    GROUPS_RDN,
    MLINK_ATTRIBUTES,
    MLINK_CLASS,
    USER_OBJECT_CLASSES,
    check_bare_jid,
    escape_dn_value,
    escape_filter_value,
    is_under,
    normalize_dn,
    parent_dn,
    rdn_value,
)
from mlink.directory.password_hash import scheme_of
from mlink.directory.policy import (
    POLICY_ATTRIBUTES,
    STATE_ATTRIBUTES,
    PasswordPolicy,
    Verdict,
    binding_state,
    binding_value,
    is_binding,
    judge,
    parse_generalized_time,
)
from mlink.directory.port import (
    DEFAULT_CHANGES_SECONDS,
    Add,
    Change,
    DirectoryPort,
    EntryExists,
    Modification,
    Modify,
    NoSuchEntry,
    Operation,
    PasswordModify,
    Scope,
    SizeLimitExceeded,
)
from mlink.directory.schema import check_writable
from mlink.sasl.secrets import (
    DEFAULT_ITERATIONS,
    HASHES,
    SALT_BYTES,
    ScramSecret,
    derive_all,
)

log = logging.getLogger(__name__)

# Reading every user and every group is many pages, not one request: it
# gets this many per-request timeouts in all (a minute at the default 5 s).
# A 5,000-member group loads in well under a second on a local slapd; the
# bound is only there for a pathologically slow server.
BULK_TIMEOUT_FACTOR = 12
# A user lookup asks for two entries: a second one means the JID is not
# unique, and mlink refuses to choose.
USER_LOOKUP_LIMIT = 2
# The attribute a user's certificates live in (RFC 4523), binary transfer.
USER_CERTIFICATE = "userCertificate;binary"
# RFC 4523 CA entries (pkiCA in OpenLDAP's core schema; the older
# certificationAuthority from RFC 2256), and what SASL EXTERNAL reads of them.
CA_FILTER = "(|(objectClass=pkiCA)(objectClass=certificationAuthority))"
CA_ATTRIBUTES = ("cACertificate;binary", "certificateRevocationList;binary")
# A deployment has a handful of issuing CAs; more is a mistaken base DN.
CA_LOOKUP_LIMIT = 64
# Users one certificate may map to: more is a directory mistake, refused.
CERTIFICATE_LOOKUP_LIMIT = 8
# Object classes of the group shapes `mlink.directory.groups` reads; a
# change to such an entry may change a roster group.
GROUP_CLASSES = frozenset({"groupofnames", "groupofuniquenames", "posixgroup"})


@dataclass(frozen=True, slots=True)
class ImportedAccount:
    """An account moved from another server (XEP-0227): a clear password
    when the old server kept one, else the SCRAM secrets it stored."""

    jid: str
    password: str | None = None
    secrets: tuple[ScramSecret, ...] = ()


@dataclass(slots=True)
class ImportCounts:
    """What `import_accounts` did, for the command's summary line."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0


@dataclass(frozen=True, slots=True)
class Layout:
    """Where users are and how they are named."""

    base_dn: str
    users_dn: str
    user_filter: str
    jid_attribute: str = "mail"
    scram_attribute: str = "authPassword"
    # The ppolicy entry whose rules SCRAM logins follow ("" = each user's
    # pwdPolicySubentry only), and a filter that marks disabled accounts.
    password_policy_dn: str = ""
    disabled_filter: str = ""

    @property
    def groups_dn(self) -> str:
        """Where roster groups live unless a <group base=...> says otherwise."""
        return f"{GROUPS_RDN},{self.base_dn}"


# What an unknown user's password is checked against: a secret no password
# derives (random keys), with the salt size and iteration count mlink writes,
# so the check costs what an existing user's does.
_UNKNOWN_USER_SECRET = ScramSecret("SCRAM-SHA-256", DEFAULT_ITERATIONS, os.urandom(SALT_BYTES),
                                   os.urandom(32), os.urandom(32))


class PortDirectory(Directory):
    """`Directory` on a `DirectoryPort`; see the module docstring."""

    def __init__(self, port: DirectoryPort, layout: Layout,
                 changes_seconds: float = DEFAULT_CHANGES_SECONDS) -> None:
        self.port = port
        self.layout = layout
        self.base_dn = layout.base_dn
        self.changes_seconds = changes_seconds
        # PBKDF2 runs in worker threads, a few at a time.
        self._derive_threads = trio.CapacityLimiter(DERIVE_THREADS)
        # Password policy entries by DN: (when read, the policy or None).
        self._policies: dict[str, tuple[float, PasswordPolicy | None]] = {}
        self._users_key = normalize_dn(layout.users_dn)
        # See `read_at_login`.
        self._login_attributes: tuple[str, ...] = ()
        self._login_seen: Callable[[str, dict[str, list[bytes]]], None] | None = None

    def read_at_login(self, attributes: Sequence[str],
                      seen: Callable[[str, dict[str, list[bytes]]], None]) -> None:
        self._login_attributes = tuple(a for a in attributes
                                       if a.lower() not in CREDENTIAL_ATTRIBUTES)
        self._login_seen = seen if self._login_attributes else None

    def _found_at_login(self, jid: str, entry: Entry) -> None:
        """Hand a login's entry to whoever asked (`read_at_login`)."""
        seen = self._login_seen
        if seen is None:
            return
        out: dict[str, list[bytes]] = {}
        for name in self._login_attributes:
            values = entry.get(name)
            if values:
                out[name] = [_as_bytes(v) for v in values]
        seen(jid, out)

    # --- finding users ------------------------------------------------------

    def _user_filter(self, jid: str) -> str:
        return (f"(&{self.layout.user_filter}"
                f"({self.layout.jid_attribute}={escape_filter_value(jid)}))")

    async def _find(self, jid: str, attributes: Sequence[str]) -> Entry | None:
        """The user's entry, or None when there is none (or several: a JID
        must name one user, and guessing would let one log in as another)."""
        try:
            found = await self.port.search(
                self.layout.users_dn, Scope.SUBTREE, self._user_filter(jid),
                list(attributes) or ["1.1"], size_limit=USER_LOOKUP_LIMIT,
            )
        except SizeLimitExceeded:
            found = [Entry(""), Entry("")]
        except NoSuchEntry:
            log.error("directory: the users DN %r does not exist", self.layout.users_dn)
            return None
        if len(found) > 1:
            log.error("directory: several entries have %s=%s; refusing to choose",
                      self.layout.jid_attribute, jid)
            return None
        return found[0] if found else None

    def _check_new_jid(self, jid: str) -> None:
        check_bare_jid(jid)
        if self.layout.jid_attribute.lower() == "mail" and not jid.isascii():
            # inetOrgPerson's mail is an IA5String: the server would refuse it.
            raise DirectoryError(
                f"{jid!r}: the JID attribute 'mail' only holds ASCII (IA5String); "
                "non-ASCII JIDs need another JID attribute (jid-attribute on <ldap>)"
            )

    # --- authentication -----------------------------------------------------

    async def password_login(self, jid: str, password: str) -> tuple[bool, Verdict]:
        if not password:
            return False, Verdict()
        entry = await self._find(jid, self._login_attributes or ["1.1"])
        if entry is None:
            return False, Verdict()
        ok, verdict = await self.port.bind_outcome(entry.dn, password)
        if ok and not verdict.refused and self.layout.disabled_filter \
                and await self._is_disabled(entry):
            return ok, Verdict("account-disabled", "this account is disabled", lasting=True)
        if ok and not verdict.refused:
            self._found_at_login(jid, entry)
        return ok, verdict

    async def check_password(self, jid: str, password: str) -> bool:
        if not password:
            return False
        entry = await self._find(jid, ["1.1"])
        if entry is None:
            # As much work as checking an existing user's password (the
            # PBKDF2 mlink stores), so the answer's timing does not tell
            # who has an account. Only unknown users pay it.
            await trio.to_thread.run_sync(_UNKNOWN_USER_SECRET.matches_password, password,
                                          limiter=self._derive_threads)
            return False
        return await self.port.bind(entry.dn, password)

    async def scram_secret(self, jid: str, mechanism: str) -> ScramSecret | None:
        login = await self.scram_login(jid, mechanism)
        return None if login.verdict.refused else login.secret

    async def scram_login(self, jid: str, mechanism: str) -> ScramLogin:
        """The secret, and the directory's verdict on the account, from one
        search (see mlink.directory.policy): locked, disabled, expired or
        must-change accounts are refused, secrets derived from a password
        changed since are refused, an expiry warning becomes a notice."""
        if mechanism not in HASHES:
            return ScramLogin(None)
        attr = self.layout.scram_attribute
        entry = await self._find(jid, [attr, "userPassword", *STATE_ATTRIBUTES,
                                       *self._login_attributes])
        if entry is None:
            return ScramLogin(None)
        values = entry.get(attr)
        secret = _pick_secret(values, mechanism)
        if secret is None:
            log.info("%s (%s) has no %s value for %s; provisioned by another tool? PLAIN "
                     "still works over TLS and renews it", jid, entry.dn, attr, mechanism)
            return ScramLogin(None)
        binding = binding_state(values, entry.get("userPassword"))
        if binding == "stale":
            log.warning("SCRAM refused for %s: its secrets predate a password change made "
                        "outside mlink; the next PLAIN login renews them", jid)
            return ScramLogin(None, Verdict("not-authorized"))
        state = {name.lower(): entry.get(name) for name in STATE_ATTRIBUTES}
        verdict = judge(state, await self._policy_for(state), _now(),
                        await self._is_disabled(entry))
        if verdict.refused:
            log.info("SCRAM refused for %s: %s", jid, verdict.text)
        else:
            # Before the client's proof is checked: the profile of an
            # existing account is cached a little early, which tells a
            # client nothing and costs nothing if the proof fails.
            self._found_at_login(jid, entry)
        return ScramLogin(secret, verdict)

    async def _policy_for(self, state: dict[str, list[Value]]) -> PasswordPolicy | None:
        """The user's ppolicy entry (pwdPolicySubentry, else the configured
        default), cached for POLICY_CACHE_SECONDS: it changes rarely, and a
        login storm must not read it once per login."""
        subentry = state.get("pwdpolicysubentry") or []
        dn = _text(subentry[0]) if subentry else self.layout.password_policy_dn
        if not dn:
            return None
        now = trio.current_time()
        cached = self._policies.get(dn)
        if cached is not None and now - cached[0] < POLICY_CACHE_SECONDS:
            return cached[1]
        try:
            found = await self.port.search(dn, Scope.BASE, "(objectClass=*)",
                                           list(POLICY_ATTRIBUTES))
        except NoSuchEntry:
            log.warning("password policy entry %s not found", dn)
            found = []
        policy = PasswordPolicy.from_entry(
            {name.lower(): found[0].get(name) for name in POLICY_ATTRIBUTES}) if found else None
        self._policies[dn] = (now, policy)
        return policy

    async def _is_disabled(self, entry: Entry) -> bool:
        flt = self.layout.disabled_filter
        if not flt:
            return False
        try:
            hits = await self.port.search(entry.dn, Scope.BASE, flt, ["1.1"])
        except NoSuchEntry:
            return True
        return bool(hits)

    async def account_verdict(self, jid: str) -> Verdict | None:
        """The directory's verdict on the account now; None when there is
        no such user (deleted)."""
        entry = await self._find(jid, list(STATE_ATTRIBUTES))
        if entry is None:
            return None
        state = {name.lower(): entry.get(name) for name in STATE_ATTRIBUTES}
        return judge(state, await self._policy_for(state), _now(),
                     await self._is_disabled(entry))

    async def password_status(self, jid: str) -> PasswordStatus | None:
        """Expiry (pwdChangedTime + pwdMaxAge), grace logins left
        (pwdGraceAuthNLimit minus the pwdGraceUseTime values), pwdReset, and
        the quality rules of the user's policy entry, read fresh."""
        entry = await self._find(jid, [*STATE_ATTRIBUTES, "pwdGraceUseTime"])
        if entry is None:
            return None
        state = {name.lower(): entry.get(name) for name in STATE_ATTRIBUTES}
        subentry = state.get("pwdpolicysubentry") or []
        dn = _text(subentry[0]) if subentry else self.layout.password_policy_dn
        rules: dict[str, int] = {}
        if dn:
            try:
                found = await self.port.search(dn, Scope.BASE, "(objectClass=*)", list(
                    POLICY_RULE_ATTRIBUTES))
            except NoSuchEntry:
                found = []
            for name in POLICY_RULE_ATTRIBUTES if found else ():
                values = found[0].get(name)
                try:
                    rules[name.lower()] = int(_text(values[0])) if values else 0
                except ValueError:
                    rules[name.lower()] = 0
        max_age = rules.get("pwdmaxage", 0)
        changed = parse_generalized_time(
            _text(state["pwdchangedtime"][0]) if state.get("pwdchangedtime") else None)
        expires = (changed + datetime.timedelta(seconds=max_age)
                   if changed is not None and max_age else None)
        grace_limit = rules.get("pwdgraceauthnlimit", 0)
        grace_left = (max(0, grace_limit - len(entry.get("pwdGraceUseTime")))
                      if rules else None)
        return PasswordStatus(
            expires=expires, grace_left=grace_left,
            must_change=bool(state.get("pwdreset"))
            and _text(state["pwdreset"][0]).upper() == "TRUE",
            min_length=rules.get("pwdminlength") if rules else None,
            history=rules.get("pwdinhistory") if rules else None,
            max_age_days=max_age // 86400 if max_age else None)

    async def record_failure(self, jid: str) -> None:
        """A failed SCRAM proof counts in the directory as a failed bind
        would: bind as the user with a password nobody has, so the
        directory's own lockout (ppolicy pwdMaxFailure) sees every guess."""
        entry = await self._find(jid, ["1.1"])
        if entry is not None:
            await self.port.bind(entry.dn, FAILURE_PASSWORD_PREFIX + secrets_token())

    async def refresh_credentials(self, jid: str, password: str) -> bool:
        """After a successful PLAIN login (a bind: the password is the
        directory's current one): rehash an outdated userPassword where the
        port hashes passwords itself (the embedded file; an LDAP server
        keeps its own hashes, see docs/ldap.md), then derive and store fresh
        SCRAM secrets when the stored ones are missing, stale or unbound
        (a rehash makes them unbound). True if anything was written."""
        attr = self.layout.scram_attribute
        wanted = [attr, "userPassword", "objectClass"]
        entry = await self._find(jid, wanted)
        if entry is None:
            return False
        rehashed = await self.port.upgrade_password_hash(entry.dn, password)
        if rehashed:
            entry = await self._find(jid, wanted)
            if entry is None:
                return True
        values = entry.get(attr)
        if binding_state(values, entry.get("userPassword")) == "bound" and all(
                _pick_secret(values, m) is not None for m in HASHES):
            return rehashed
        secrets = await self._secrets(password)
        binding = binding_value(entry.get("userPassword"))
        await self.port.write([self._password_update(
            entry, secrets + ([binding] if binding else []))])
        log.info("SCRAM secrets of %s renewed after a password login", jid)
        return True

    async def _bind_secrets(self, jids_and_secrets: Sequence[tuple[str, list[str]]]) -> None:
        """After mlink set passwords: store each user's secrets with the
        binding to the userPassword value the directory now holds. Entries
        are found by JID (the directory's own DN form, whatever escaping
        it normalised), one by one for a few users, in one paged search of
        all users for a batch; then one write."""
        if not jids_and_secrets:
            return
        wanted = {jid.lower(): secrets for jid, secrets in jids_and_secrets}
        attr = self.layout.jid_attribute
        found: list[Entry] = []
        if len(wanted) <= BIND_SECRETS_ONE_BY_ONE:
            for jid, _ in jids_and_secrets:
                entry = await self._find(jid, [attr, "userPassword"])
                if entry is not None:
                    found.append(entry)
        else:
            found = await self._all_users([attr, "userPassword"])
        operations: list[Operation] = []
        for entry in found:
            values = entry.get(attr)
            secrets = wanted.get(_text(values[0]).lower()) if values else None
            binding = binding_value(entry.get("userPassword"))
            if secrets is not None and binding is not None:
                operations.append(Modify(entry.dn, (Modification(
                    "replace", self.layout.scram_attribute, (*secrets, binding)),)))
        if operations:
            await self.port.write(operations)

    async def user_exists(self, jid: str) -> bool:
        return await self._find(jid, ["1.1"]) is not None

    async def users_with_certificate(self, certificate: bytes) -> list[str]:
        """One search, two assertions: the DER value itself (what the
        embedded port compares) or RFC 4523's certificateExactMatch by
        serial number and issuer (what slapd's equality rule for
        userCertificate takes; a DER assertion is undefined there). Matches
        are then compared byte for byte, so a serial/issuer collision never
        maps a certificate to the wrong user."""
        # Imported here: only SASL EXTERNAL asks, and `cryptography` costs
        # every shard ~9 MiB that would otherwise never be used.
        from cryptography import x509

        try:
            cert = x509.load_der_x509_certificate(certificate)
        except ValueError:
            return []
        der = "".join(f"\\{b:02x}" for b in certificate)
        issuer = cert.issuer.rfc4514_string().replace('"', '""')
        exact = escape_filter_value(
            f'{{ serialNumber {cert.serial_number}, issuer rdnSequence:"{issuer}" }}')
        filt = (f"(&{self.layout.user_filter}"
                f"(|({USER_CERTIFICATE}={der})(userCertificate={exact})))")
        jid_attr = self.layout.jid_attribute
        try:
            found = await self.port.search(
                self.layout.users_dn, Scope.SUBTREE, filt, [jid_attr, USER_CERTIFICATE],
                size_limit=CERTIFICATE_LOOKUP_LIMIT)
        except (NoSuchEntry, SizeLimitExceeded) as exc:
            log.error("directory: certificate lookup failed: %s", type(exc).__name__)
            return []
        users = []
        for entry in found:
            values = [_as_bytes(v) for v in entry.get(USER_CERTIFICATE)]
            jid = entry.first(jid_attr)
            if certificate in values and jid is not None:
                users.append(_text(jid).lower())
        return sorted(set(users))

    async def certificate_authorities(self, base: str) -> list[CertificateAuthority]:
        """CA entries under `base`, read with the `;binary` transfer option
        RFC 4523 requires for certificates and CRLs (values stored without
        it, as some tools do, are taken too)."""
        try:
            found = await self.port.search(base, Scope.SUBTREE, CA_FILTER,
                                           list(CA_ATTRIBUTES), size_limit=CA_LOOKUP_LIMIT)
        except NoSuchEntry:
            log.error("directory: the CA entries' DN %r does not exist", base)
            return []
        except SizeLimitExceeded:
            log.error("directory: more than %d CA entries under %r; none used",
                      CA_LOOKUP_LIMIT, base)
            return []
        return [CertificateAuthority(
            entry.dn,
            tuple(_as_bytes(v) for name in ("cACertificate;binary", "cACertificate")
                  for v in entry.get(name)),
            tuple(_as_bytes(v) for name in ("certificateRevocationList;binary",
                                            "certificateRevocationList")
                  for v in entry.get(name)),
        ) for entry in found]

    async def list_users(self) -> list[str]:
        entries = await self._all_users([self.layout.jid_attribute])
        return sorted(_text(e.get(self.layout.jid_attribute)[0]) for e in entries)

    async def password_schemes(self) -> Counter[str]:
        """How many users' userPassword values use each hash scheme ('' for
        clear text), for `mlink check`: fast ones ({SSHA}) fall quickly to
        an offline guess if the entries leak."""
        counts: Counter[str] = Counter()
        for entry in await self._all_users(["userPassword"]):
            for value in entry.get("userPassword"):
                text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                counts[scheme_of(text)] += 1
        return counts

    async def _all_users(self, attributes: list[str]) -> list[Entry]:
        """Every user entry that has a JID, read in pages."""
        filt = f"(&{self.layout.user_filter}({self.layout.jid_attribute}=*))"
        try:
            return await self.port.search(self.layout.users_dn, Scope.SUBTREE, filt, attributes,
                                          paged=True, timeout_factor=BULK_TIMEOUT_FACTOR)
        except NoSuchEntry:
            log.error("directory: the users DN %r does not exist", self.layout.users_dn)
            return []

    # --- entries of features (rooms) ----------------------------------------------

    async def entries(self, base: str, filter: str = "(objectClass=*)",
                      attributes: Sequence[str] = ()) -> list[Entry]:
        try:
            return await self.port.search(base, Scope.ONELEVEL, filter, list(attributes),
                                          paged=True, timeout_factor=BULK_TIMEOUT_FACTOR)
        except NoSuchEntry:
            return []

    async def entry(self, dn: str, attributes: Sequence[str] = ()) -> Entry | None:
        try:
            found = await self.port.search(dn, Scope.BASE, "(objectClass=*)", list(attributes))
        except NoSuchEntry:
            return None
        return found[0] if found else None

    async def put_entry(self, entry: Entry, managed: Sequence[str]) -> None:
        try:
            await self.port.add(entry)
            return
        except EntryExists:
            pass
        except NoSuchEntry:
            await self._add_container(parent_dn(entry.dn))
            await self.port.add(entry)
            return
        changes = [Modification("replace", name, tuple(entry.get(name))) for name in managed]
        await self.port.modify(entry.dn, changes)

    async def _add_container(self, dn: str) -> None:
        """An organizationalUnit for `dn` (`ou=Rooms,<base>`), directly
        under the base DN; anything deeper is the administrator's to make."""
        rdn_attr, _, rest = dn.partition("=")
        value = rest.split(",", 1)[0]
        if rdn_attr.strip().lower() != "ou" or normalize_dn(parent_dn(dn)) != normalize_dn(
                self.layout.base_dn):
            raise NoSuchEntry(f"{dn} does not exist")
        container = Entry(dn)
        container.set("objectClass", ["top", "organizationalUnit"])
        container.set("ou", [value])
        try:
            await self.port.add(container)
        except EntryExists:
            pass

    async def delete_entry(self, dn: str) -> bool:
        try:
            await self.port.delete(dn)
        except NoSuchEntry:
            return False
        return True

    async def group_members(self, dn: str) -> frozenset[str] | None:
        if await self.entry(dn, ["1.1"]) is None:
            return None  # asked, not configured: no warning for a missing group
        groups = await self.roster_groups([RosterGroupConfig(dn=dn)])
        return groups[0].members if groups else None

    async def ping(self) -> None:
        await self.port.ping()

    async def aclose(self) -> None:
        await self.port.aclose()

    # --- administration -----------------------------------------------------

    def _new_entry(self, jid: str, secrets: list[str]) -> Entry:
        local = jid.split("@", 1)[0]
        names: list[Value] = [local]
        if any(ch in jid for ch in DN_UNSAFE_CHARACTERS):
            # libldap (under bonsai) cannot parse a DN whose value holds a
            # bare '#', and slapd hands DNs back with it unescaped (RFC 4514
            # escapes it only first): name such entries by a digest instead.
            rdn = "jid-" + hashlib.sha256(jid.encode()).hexdigest()[:DN_DIGEST_CHARS]
            names.append(rdn)
            dn = f"cn={rdn},{self.layout.users_dn}"
        else:
            dn = f"{self.layout.jid_attribute}={escape_dn_value(jid)},{self.layout.users_dn}"
        attrs: dict[str, list[Value]] = {
            "objectClass": list(USER_OBJECT_CLASSES),
            "cn": names,
            "sn": [local],
            "uid": [local],
            self.layout.jid_attribute: [jid],
            self.layout.scram_attribute: list(secrets),
        }
        return Entry(dn, attrs)

    def _password_update(self, entry: Entry, secrets: list[str]) -> Modify:
        """New SCRAM secrets for an existing entry, adding mlinkUser when
        another tool created the entry without it."""
        mods: list[Modification] = []
        classes = {str(c).lower() for c in entry.get("objectClass")}
        if MLINK_CLASS.lower() not in classes:
            mods.append(Modification("add", "objectClass", (MLINK_CLASS,)))
        mods.append(Modification("replace", self.layout.scram_attribute, tuple(secrets)))
        return Modify(entry.dn, tuple(mods))

    async def _secrets(self, password: str) -> list[str]:
        if not password:
            raise DirectoryError("empty password")
        secrets = await trio.to_thread.run_sync(
            derive_all, password, limiter=self._derive_threads
        )
        return [s.to_auth_password() for s in secrets]

    async def add_user(self, jid: str, password: str) -> None:
        self._check_new_jid(jid)
        if await self.user_exists(jid):
            raise UserExists(jid)
        secrets = await self._secrets(password)
        entry = self._new_entry(jid, secrets)
        try:
            await self.port.add(entry)
        except EntryExists as exc:
            raise UserExists(jid) from exc
        try:
            await self.port.password_modify(entry.dn, password)
        except BaseException:
            with trio.CancelScope(shield=True):
                try:  # do not leave a user without a userPassword behind
                    await self.port.delete(entry.dn)
                except DirectoryError:
                    log.exception("directory: could not remove half-created %s", entry.dn)
            raise
        await self._bind_secrets([(jid, secrets)])

    async def set_password(self, jid: str, password: str) -> None:
        secrets = await self._secrets(password)
        entry = await self._find(jid, ["objectClass"])
        if entry is None:
            raise NoSuchUser(jid)
        try:
            # The password first: when the directory refuses it (quality,
            # history), the secrets of the current password stay.
            await self.port.write([PasswordModify(entry.dn, password),
                                   self._password_update(entry, secrets)])
        except NoSuchEntry as exc:
            raise NoSuchUser(jid) from exc
        await self._bind_secrets([(jid, secrets)])

    async def change_own_password(self, jid: str, password: str) -> None:
        """The user changes their own password (XEP-0077): set as by the
        administrator (the directory's quality and history rules apply),
        then cleared of the "must change" mark a change by someone else
        would leave (ppolicy pwdReset), since the user chose it."""
        await self.set_password(jid, password)
        entry = await self._find(jid, ["pwdReset"])
        if entry is not None and entry.get("pwdReset"):
            try:
                await self.port.modify(entry.dn, [Modification("delete", "pwdReset")])
            except DirectoryRefused as exc:
                log.warning("could not clear pwdReset of %s: %s", jid, exc)

    async def delete_user(self, jid: str) -> None:
        entry = await self._find(jid, ["1.1"])
        if entry is None:
            raise NoSuchUser(jid)
        try:
            await self.port.delete(entry.dn)
        except NoSuchEntry as exc:
            raise NoSuchUser(jid) from exc

    async def import_users(self, pairs: Iterable[tuple[str, str]]) -> int:
        """Derive every secret first (a few threads; PBKDF2 releases the
        GIL), read the existing users once, then hand the port one batch
        (the embedded file is written once; LDAP spreads it over the pool)."""
        pairs = list(pairs)
        for jid, password in pairs:
            self._check_new_jid(jid)
            if not password:
                raise DirectoryError(f"{jid}: empty password")

        def derive() -> list[list[str]]:
            def one(password: str) -> list[str]:
                return [s.to_auth_password() for s in derive_all(password)]

            with ThreadPoolExecutor(DERIVE_THREADS) as pool:
                return list(pool.map(one, (pw for _, pw in pairs), chunksize=64))

        derived = await trio.to_thread.run_sync(derive)
        written: list[tuple[str, list[str]]] = []
        existing = {_text(e.get(self.layout.jid_attribute)[0]).lower(): e
                    for e in await self._all_users([self.layout.jid_attribute, "objectClass"])}
        operations: list[Operation] = []
        for (jid, password), secrets in zip(pairs, derived, strict=True):
            entry = existing.get(jid.lower())
            if entry is None:
                entry = self._new_entry(jid, secrets)
                existing[jid.lower()] = entry
                operations.append(Add(entry))
            else:
                operations.append(self._password_update(entry, secrets))
            operations.append(PasswordModify(entry.dn, password))
            written.append((jid, secrets))
        await self.port.write(operations)
        await self._bind_secrets(written)
        return len(pairs)

    # --- migration (XEP-0227) -----------------------------------------------

    async def scram_credentials(self) -> dict[str, list[ScramSecret]]:
        """Every user's stored SCRAM secrets by bare JID, from one paged
        search (an export reads them all; binding values are left out).
        A user with none (provisioned by another tool), or whose secrets
        predate a password change made outside mlink (stale: they would
        let the old password in), maps to []."""
        attr = self.layout.scram_attribute
        out: dict[str, list[ScramSecret]] = {}
        for entry in await self._all_users([self.layout.jid_attribute, attr, "userPassword"]):
            jid = _text(entry.get(self.layout.jid_attribute)[0])
            values = entry.get(attr)
            if binding_state(values, entry.get("userPassword")) == "stale":
                out[jid] = []
                continue
            found = (ScramSecret.from_auth_password(_text(v)) for v in values)
            out[jid] = [secret for secret in found if secret is not None]
        return out

    async def import_accounts(self, accounts: Sequence[ImportedAccount]) -> ImportCounts:
        """Create or update accounts moved from another server, in one
        write (the embedded file: all or nothing).

        An account given a clear password is set as `user import` sets
        one (derived secrets, userPassword through the password modify
        operation); one given SCRAM secrets (what Prosody and ejabberd
        store) gets exactly those as its RFC 5803 values and no
        userPassword, since no password is known: its old password then
        works with SCRAM of those hashes and, on the embedded directory,
        with PLAIN (checked against the secret), which renews the secrets
        for every mechanism. An account whose stored credentials already
        are what the import gives is left alone, so importing the same
        file again writes nothing."""
        accounts = list(accounts)
        for account in accounts:
            self._check_new_jid(account.jid)
            if account.password is None and not account.secrets:
                raise DirectoryError(f"{account.jid}: neither a password nor SCRAM secrets")
            if account.password == "":
                raise DirectoryError(f"{account.jid}: empty password")
        attr = self.layout.scram_attribute
        existing = {_text(e.get(self.layout.jid_attribute)[0]).lower(): e
                    for e in await self._all_users([self.layout.jid_attribute, "objectClass",
                                                    attr])}

        def derive() -> list[list[str] | None]:
            """Secrets for each clear password that the stored SCRAM-SHA-256
            secret does not already match (None: unchanged or no password)."""
            def one(account: ImportedAccount) -> list[str] | None:
                if account.password is None:
                    return None
                entry = existing.get(account.jid.lower())
                current = None if entry is None else _pick_secret(entry.get(attr),
                                                                  "SCRAM-SHA-256")
                if current is not None and current.matches_password(account.password):
                    return None
                return [s.to_auth_password() for s in derive_all(account.password)]

            with ThreadPoolExecutor(DERIVE_THREADS) as pool:
                return list(pool.map(one, accounts, chunksize=16))

        derived = await trio.to_thread.run_sync(derive)
        counts = ImportCounts()
        operations: list[Operation] = []
        bind: list[tuple[str, list[str]]] = []
        for account, secrets in zip(accounts, derived, strict=True):
            entry = existing.get(account.jid.lower())
            if account.password is not None:
                if secrets is None:
                    counts.unchanged += 1
                    continue
                wanted = secrets
            else:
                wanted = sorted(s.to_auth_password() for s in account.secrets)
                stored = sorted(_text(v) for v in (entry.get(attr) if entry else [])
                                if not is_binding(v))
                if entry is not None and stored == wanted:
                    counts.unchanged += 1
                    continue
            if entry is None:
                entry = self._new_entry(account.jid, wanted)
                existing[account.jid.lower()] = entry
                operations.append(Add(entry))
                counts.added += 1
            else:
                update = self._password_update(entry, wanted)
                if account.password is None:
                    # The old userPassword is not this password: drop it, or
                    # PLAIN would go on checking the password being replaced.
                    update = Modify(update.dn, (*update.changes,
                                                Modification("replace", "userPassword", ())))
                operations.append(update)
                counts.updated += 1
            if account.password is not None:
                operations.append(PasswordModify(entry.dn, account.password))
                bind.append((account.jid, wanted))
        if operations:
            await self.port.write(operations)
        await self._bind_secrets(bind)
        return counts

    # --- profile attributes ---------------------------------------------------

    async def user_attributes(
        self, jid: str, attributes: Sequence[str]
    ) -> dict[str, list[bytes]] | None:
        wanted = [a for a in attributes if a.lower() not in CREDENTIAL_ATTRIBUTES]
        # "1.1" asks for no attributes (RFC 4511 §4.5.1.8): just the entry.
        entry = await self._find(jid, wanted or ["1.1"])
        if entry is None:
            return None
        out: dict[str, list[bytes]] = {}
        for name in wanted:
            values = entry.get(name)
            if values:
                out[name] = [_as_bytes(v) for v in values]
        return out

    async def modify_user(self, jid: str, changes: Mapping[str, Sequence[bytes]]) -> None:
        """One modify with a replace per attribute (RFC 4511 §4.6: a
        replace without values deletes the attribute, and is no error when
        it is absent). The server (or the embedded port, as slapd would)
        applies it atomically, so a refused value leaves every other one
        unchanged."""
        seen: set[str] = set()
        for name, values in changes.items():
            if name.lower() in seen:
                raise DirectoryError(f"attribute {name!r} given twice in one change")
            seen.add(name.lower())
            check_writable(name.lower(), self.layout.jid_attribute, name)
            if name.lower() == self.layout.scram_attribute.lower():
                check_writable("authpassword", self.layout.jid_attribute, name)
            for value in values:
                if not isinstance(value, bytes | bytearray):
                    raise DirectoryError(f"{name}: values must be bytes, not {type(value)}")
        if not changes:
            return
        entry = await self._find(jid, ["objectClass"])
        if entry is None:
            raise NoSuchUser(jid)
        mods: list[Modification] = []
        classes = {str(c).lower() for c in entry.get("objectClass")}
        adds_mlink = any(n.lower() in MLINK_ATTRIBUTES and v for n, v in changes.items())
        if adds_mlink and MLINK_CLASS.lower() not in classes:
            mods.append(Modification("add", "objectClass", (MLINK_CLASS,)))
        for name, values in changes.items():
            mods.append(Modification("replace", name, tuple(bytes(v) for v in values)))
        try:
            await self.port.modify(entry.dn, mods)
        except NoSuchEntry as exc:
            raise NoSuchUser(jid) from exc
        except DirectoryRefused as exc:
            log.info("directory refused a change of %s (%s): %s", jid, entry.dn, exc)
            raise

    # --- groups ---------------------------------------------------------------

    async def _user_index(self) -> UserIndex:
        """Every user once: one paged search giving DN, JID and uids."""
        index = UserIndex()
        for entry in await self._all_users([self.layout.jid_attribute, "uid"]):
            jids = entry.get(self.layout.jid_attribute)
            if jids:
                index.add(entry.dn, _text(jids[0]), [_text(u) for u in entry.get("uid")])
        return index

    async def _group_entries(self, spec: RosterGroupConfig) -> list[Entry]:
        attrs = group_attributes(spec)
        if spec.dn:
            try:
                return await self.port.search(spec.dn, Scope.BASE, "(objectClass=*)", attrs,
                                              timeout_factor=BULK_TIMEOUT_FACTOR)
            except NoSuchEntry:
                log.warning("roster group %s: no such entry", spec.dn)
                return []
        try:
            parse_filter(spec.filter or "")
        except FilterError as exc:
            raise DirectoryError(f"roster group filter {spec.filter!r}: {exc}") from exc
        base = spec.base or self.layout.groups_dn
        try:
            return await self.port.search(base, Scope.SUBTREE, spec.filter or "", attrs,
                                          paged=True, timeout_factor=BULK_TIMEOUT_FACTOR)
        except NoSuchEntry:
            log.warning("roster groups: search base %s does not exist", base)
            return []

    async def roster_groups(self, specs: Sequence[RosterGroupConfig]) -> list[DirectoryGroup]:
        """One paged search of users, then one read or paged search per
        spec; members map to JIDs by lookups in memory (mlink.directory.groups)."""
        if not specs:
            return []
        users = await self._user_index()
        found: list[DirectoryGroup] = []
        for spec in specs:
            for entry in await self._group_entries(spec):
                found.append(resolve_group(entry.dn, entry.get, spec, users))
        return dedupe(found)

    # --- the change feed ------------------------------------------------------

    async def changes(self, interval: float | None = None) -> AsyncIterator[list[Change]]:
        """The port's feed under the base DN, each change marked with the
        user's bare JID when it is a user entry (see Directory.changes)."""
        seconds = self.changes_seconds if interval is None else interval
        jid_attr = self.layout.jid_attribute
        async for batch in self.port.changes(self.layout.base_dn, seconds):
            marked = []
            for change in batch:
                user = None
                if is_under(change.key, self._users_key) and change.key != self._users_key:
                    jids = change.entry.get(jid_attr) if change.entry is not None else []
                    if jids:
                        user = _text(jids[0])
                    elif change.kind == "delete":
                        user = _jid_from_dn(change.dn, jid_attr)
                marked.append(Change(change.kind, change.dn, change.entry, user, change.key))
            yield marked

    def touches_groups(self, change: Change, specs: Sequence[RosterGroupConfig]) -> bool:
        """Whether `change` may change the resolution of `specs`: an entry
        a spec names or searches under, an entry shaped like a group, or a
        user that appeared or went (a member value may name them)."""
        if change.kind != "modify" and change.user is not None:
            return True
        if change.entry is not None:
            classes = {str(c).lower() for c in change.entry.get("objectClass")}
            if classes & GROUP_CLASSES:
                return True
        for spec in specs:
            if spec.dn and normalize_dn(spec.dn) == change.key:
                return True
            if spec.filter and is_under(change.key, normalize_dn(spec.base or
                                                                 self.layout.groups_dn)):
                return True
        return False


def _jid_from_dn(dn: str, jid_attribute: str) -> str | None:
    """The JID in a user DN named by its JID attribute (`mail=a@b,...`)."""
    first = dn.split(",", 1)[0]
    if first.partition("=")[0].strip().lower() != jid_attribute.lower():
        return None
    return rdn_value(dn) or None


def _as_bytes(value: object) -> bytes:
    """Values are str when they decode as UTF-8, bytes otherwise."""
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


# Characters of a JID that cannot appear in an LDAP DN handed to bonsai
# (see _new_entry), and how much of a SHA-256 names such an entry instead:
# 80 bits, no collision among any realistic number of users.
DN_UNSAFE_CHARACTERS = "#"
DN_DIGEST_CHARS = 20
# Up to this many users (a CLI add or passwd), their entries are read one
# by one after a password change; more (an import) are read in one paged
# search of all users.
BIND_SECRETS_ONE_BY_ONE = 8
# A login storm must not read the password policy entry once per login; a
# policy edited in the directory applies within this many seconds.
POLICY_CACHE_SECONDS = 60.0
# What the self-service page shows of a password policy entry.
POLICY_RULE_ATTRIBUTES = ("pwdMaxAge", "pwdGraceAuthNLimit", "pwdMinLength", "pwdInHistory")

# Failed SCRAM proofs are recorded by a bind with a password that starts
# with this and ends with random bytes: nobody's password, and recognisable
# in a directory's access log.
FAILURE_PASSWORD_PREFIX = "mlink-scram-failure-"


def secrets_token() -> str:
    return secrets_module.token_urlsafe(16)


def _pick_secret(values: Sequence[Value], mechanism: str) -> ScramSecret | None:
    for value in values:
        secret = ScramSecret.from_auth_password(_text(value))
        if secret is not None and secret.mechanism == mechanism:
            return secret
    return None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
