"""SASL EXTERNAL with TLS client certificates (XEP-0178).

Why a module: strong authentication is optional PKI on top of the core's
pluggable SASL. The TLS layer (`mlink.transport.tls`, `<tls><client-ca>`)
asks for a client certificate and verifies its chain against the configured
CAs, but not its dates; this module then decides, at `<auth/>` time, so
that every refusal reaches the user as an RFC 6120 §6.5 failure with a
text ("the client certificate expired on ...") instead of a TLS alert:

1. dates: an expired (or not yet valid) certificate, or an expired issuer,
   is refused (`credentials-expired`);
2. revocation: the issuer's CRL (files given as `<crl>`, each cached until
   its nextUpdate, read again when the file changes) must be current and
   must not list the certificate (`not-authorized`); when no current CRL
   can be had the login is refused (`temporary-auth-failure`) unless
   `<revocation>soft</revocation>` lets it through with a warning;
3. mapping (`<mapping>`, in the configured order): the xmppAddr SANs
   (id-on-xmppAddr, RFC 6120 §13.7.1.4), the rfc822Name SANs, or the users
   whose `userCertificate;binary` holds exactly this certificate;
4. authorisation: with no authzid the certificate must map to exactly one
   JID; an authzid must be one of the JIDs the certificate maps to; and the
   JID must have an entry in the directory (implicit authorisation: a valid
   certificate for an unknown user is refused).

With `<ca-base>`, the CA entries under that DN in the directory (RFC 4523
`pkiCA`/`certificationAuthority`) add their `cACertificate;binary` to the
CAs the TLS handshake accepts and their `certificateRevocationList;binary`
to the CRLs; they are read at start and again every `<ca-refresh>` seconds
or as soon as a CRL read from them passes its nextUpdate. A CA entry
removed from the directory is refused from the next read on (the issuer
check above), even though the TLS handshake still accepts it until a reload.

An account that is disabled or locked by an administrator (the directory's
lasting verdict: `disabled-filter`, a permanent `pwdAccountLockedTime`) is
refused whatever its certificate (`account-disabled`). The password's own
state (expiry, a timed lockout after wrong passwords) does not stop a
certificate login: the password is not what is presented.

Not done here: client certificates on `websocket-tls` listeners.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from mlink.config_schema import DN, Invalid, Kind, ParseEnv, PathKind, PositiveFloat, Str, option
from mlink.directory.base import CertificateAuthority, DirectoryUnavailable
from mlink.jid import InvalidJID, parse_jid
from mlink.module import Module
from mlink.sasl.events import Challenge, Failure, Success
from mlink.sasl.registry import UNAVAILABLE, NeedCredential, SaslStreamInfo

MECHANISM = "EXTERNAL"
# The credential kind the mechanism asks for (answer: a `Verdict`).
CERTIFICATE_KIND = "certificate"
# Offered first: a client that went to the trouble of presenting a
# certificate wants to use it (above SCRAM-*-PLUS, 400-401).
STRENGTH_EXTERNAL = 500
# id-on-xmppAddr (RFC 6120 §13.7.1.4): an otherName SAN holding a JID.
XMPP_ADDR_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.5")
# The ways a certificate names its user, as written in <mapping>.
MAP_XMPP_ADDR = "xmpp-addr"
MAP_EMAIL = "email"
MAP_DIRECTORY = "directory"
MAPPINGS = (MAP_XMPP_ADDR, MAP_EMAIL, MAP_DIRECTORY)
DEFAULT_MAPPING = " ".join(MAPPINGS)
REVOCATION_MODES = ("hard", "soft")
# A CRL without nextUpdate (RFC 5280 requires one, some CAs omit it) is
# trusted for this long after it was read, then read again.
CRL_MAX_AGE = 3600.0
# How often the CA entries of the directory are read again by default: a CA
# added or a certificate revoked there is seen within this many seconds.
DEFAULT_CA_REFRESH = 300.0
# DER tag and long-form length bit, for the UTF8String inside an xmppAddr.
DER_UTF8STRING = 0x0C
DER_LONG_LENGTH = 0x80


class PathList(Kind):
    """Paths separated by whitespace, each relative to the configuration
    file and required to exist (a typo is an error at load, not a refused
    login at 3 a.m.)."""

    doc = "paths, separated by spaces"

    def parse(self, raw: str, env: ParseEnv) -> tuple[Path, ...]:
        one = PathKind(must_exist=True)
        return tuple(one.parse(word, env) for word in raw.split())

    def render(self, value: Any, base: Path) -> str:
        return " ".join(PathKind().render(v, base) for v in value)


class MappingOrder(Str):
    doc = "words: " + ", ".join(MAPPINGS)

    def parse(self, raw: str, env: ParseEnv) -> str:
        words = raw.split()
        unknown = [w for w in words if w not in MAPPINGS]
        if not words or unknown or len(set(words)) != len(words):
            raise Invalid(f"must list some of {', '.join(MAPPINGS)}, each once, not {raw!r}")
        return " ".join(words)


class Revocation(Str):
    doc = " | ".join(REVOCATION_MODES)

    def parse(self, raw: str, env: ParseEnv) -> str:
        value = raw.strip()
        if value not in REVOCATION_MODES:
            raise Invalid(f"must be hard or soft, not {value!r}")
        return value


@dataclass(frozen=True, slots=True)
class Options:
    mapping: str = option(
        DEFAULT_MAPPING, kind=MappingOrder(),
        doc="How a certificate names its user, tried in this order: `xmpp-addr` (its "
            "id-on-xmppAddr SANs), `email` (its rfc822Name SANs, taken as JIDs), "
            "`directory` (the users whose `userCertificate;binary` is this certificate). "
            "The first way that names anyone decides; an authzid may be any JID named by "
            "any of them.")
    crl: tuple[Path, ...] = option(
        (), kind=PathList(), default_doc="none",
        doc="CRL files (PEM or DER), one per issuing CA, separated by spaces. Each is "
            "kept until its nextUpdate, and read again when the file changes.")
    revocation: str = option(
        "hard", kind=Revocation(),
        doc="`hard`: a certificate whose issuer has no current CRL is refused "
            "(temporary-auth-failure). `soft`: it is let in, with a warning in the log.")
    ca_base: str = option(
        "", xml="ca-base", kind=DN(), default_doc="none",
        doc="A DN under which the directory holds CA entries (RFC 4523 `pkiCA` or "
            "`certificationAuthority`): their `cACertificate;binary` are accepted as client "
            "CAs besides `<client-ca>`, and their `certificateRevocationList;binary` used "
            "as CRLs besides `<crl>`.")
    ca_refresh: float = option(
        DEFAULT_CA_REFRESH, xml="ca-refresh", kind=PositiveFloat(),
        doc="Seconds between two reads of the CA entries under `<ca-base>` (sooner when "
            "a CRL read from them passes its nextUpdate).")

    def __post_init__(self) -> None:
        if not self.crl and not self.ca_base and self.revocation == "hard":
            raise ValueError("no <crl> or <ca-base> and <revocation> is hard: every "
                             "certificate would be refused; give <crl> files or a "
                             "<ca-base>, or <revocation>soft</revocation>")


OPTIONS = Options


@dataclass(frozen=True, slots=True)
class Verdict:
    """The certificate source's answer: the JID to log in (`jid`), or the
    SASL failure `condition` with a `text` for the user."""

    jid: str | None
    condition: str = "not-authorized"
    text: str = ""


# -- the mechanism (sans-IO) -----------------------------------------------------------


class ExternalMechanism:
    """XEP-0178 §6: the initial response is empty ("=": no authzid, the
    certificate must name exactly one user) or the authzid (a bare JID the
    certificate must be valid for). Without an initial response the server
    sends an empty challenge and the client answers the same way."""

    name = MECHANISM

    def __init__(self, stream: SaslStreamInfo) -> None:
        self._certificate = stream.peer_certificate
        self._domain = stream.domain
        self._challenged = False
        self._authzid: str | None = None

    def receive(self, data: bytes | None) -> Any:
        if data is None:
            if self._challenged:
                return Failure("malformed-request", "send the authzid or '='")
            self._challenged = True
            return Challenge(b"")
        if self._certificate is None:
            return Failure("not-authorized", "no client certificate was presented")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return Failure("malformed-request", "the authzid is not UTF-8")
        authzid: str | None = None
        if text:
            try:
                jid = parse_jid(text)
            except InvalidJID:
                return Failure("invalid-authzid", "the authzid is not a JID")
            if jid.resource or not jid.local or jid.domain != self._domain:
                return Failure("invalid-authzid",
                               f"the authzid must be a bare JID of {self._domain}")
            authzid = str(jid)
        self._authzid = authzid
        return NeedCredential(CERTIFICATE_KIND, "", authzid,
                              {"certificate": self._certificate, "domain": self._domain})

    def provide(self, answer: Any) -> Any:
        if not isinstance(answer, Verdict):
            return Failure("temporary-auth-failure")
        if answer.jid is None:
            return Failure(answer.condition, answer.text or None)
        return Success(None, answer.jid, self._authzid)


@dataclass(frozen=True, slots=True)
class ExternalProvider:
    name: str = MECHANISM
    strength: int = STRENGTH_EXTERNAL

    def offered(self, stream: SaslStreamInfo) -> bool:
        """Only where the TLS layer verified a client certificate."""
        return stream.tls_active and stream.peer_certificate is not None

    def create(self, stream: SaslStreamInfo) -> ExternalMechanism:
        return ExternalMechanism(stream)


# -- what a certificate says -----------------------------------------------------------


def _der_utf8string(value: bytes) -> str | None:
    """The text of a DER UTF8String (an xmppAddr's value), or None."""
    if len(value) < 2 or value[0] != DER_UTF8STRING:
        return None
    length, start = value[1], 2
    if length & DER_LONG_LENGTH:
        octets = length & ~DER_LONG_LENGTH
        length = int.from_bytes(value[2 : 2 + octets], "big")
        start = 2 + octets
    body = value[start : start + length]
    if len(body) != length:
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def _bare_on(text: str, domain: str) -> str | None:
    """`text` as a prepared bare JID of `domain`, or None."""
    try:
        jid = parse_jid(text)
    except InvalidJID:
        return None
    if jid.resource or not jid.local or jid.domain != domain:
        return None
    return str(jid)


def xmpp_addrs(cert: x509.Certificate, domain: str) -> list[str]:
    """The id-on-xmppAddr SANs naming users of `domain`."""
    san = _san(cert)
    if san is None:
        return []
    out = []
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id == XMPP_ADDR_OID:
            text = _der_utf8string(other.value)
            jid = _bare_on(text, domain) if text is not None else None
            if jid is not None:
                out.append(jid)
    return sorted(set(out))


def email_addrs(cert: x509.Certificate, domain: str) -> list[str]:
    """The rfc822Name SANs naming users of `domain`, taken as JIDs."""
    san = _san(cert)
    if san is None:
        return []
    found = (_bare_on(mail, domain) for mail in san.get_values_for_type(x509.RFC822Name))
    return sorted({jid for jid in found if jid is not None})


# -- revocation ------------------------------------------------------------------------


@dataclass(slots=True)
class _Loaded:
    signature: tuple[int, int]  # (mtime_ns, size) of the file when read
    read_at: float  # time.time() when read
    crls: list[x509.CertificateRevocationList] = field(default_factory=list)
    certs: list[x509.Certificate] = field(default_factory=list)


def _signature(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def _load_crl(data: bytes) -> x509.CertificateRevocationList:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


class Trust:
    """The issuing CAs (the `<client-ca>` files) and their CRLs, read from
    files in a worker thread and kept until they change or go stale. One
    per shard process; the lock covers worker threads of concurrent logins."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[Path, _Loaded] = {}

    def _get(self, path: Path, now: dt.datetime, crl: bool) -> _Loaded:
        """The file's contents, read again when it changed on disk or, for a
        CRL, when it went past its nextUpdate (or CRL_MAX_AGE without one)."""
        signature = _signature(path)
        loaded = self._files.get(path)
        if loaded is not None and loaded.signature == signature and not (
                crl and _stale(loaded, now)):
            return loaded
        data = path.read_bytes()
        if crl:
            loaded = _Loaded(signature, now.timestamp(), crls=[_load_crl(data)])
        else:
            loaded = _Loaded(signature, now.timestamp(),
                             certs=x509.load_pem_x509_certificates(data))
        self._files[path] = loaded
        return loaded

    def issuer_of(self, cert: x509.Certificate, ca_files: tuple[Path, ...],
                  now: dt.datetime, more: Sequence[x509.Certificate] = ()
                  ) -> x509.Certificate | None:
        """The CA certificate (from the files, or `more` from the
        directory) that signed `cert`, or None."""
        with self._lock:
            cas = [ca for path in ca_files for ca in self._get(path, now, crl=False).certs]
        for ca in [*cas, *more]:
            if ca.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return ca
        return None

    def revocation(self, cert: x509.Certificate, issuer: x509.Certificate,
                   crl_files: tuple[Path, ...], now: dt.datetime,
                   more: Sequence[x509.CertificateRevocationList] = ()) -> tuple[str, str]:
        """("good" | "revoked" | "unknown", why) for `cert` from the CRLs of
        its issuer (the files', then `more` from the directory) that are
        signed by it and current."""
        who = cert.issuer.rfc4514_string()
        stale_since: dt.datetime | None = None
        with self._lock:
            crls: list[x509.CertificateRevocationList] = []
            for path in crl_files:
                try:
                    crls += self._get(path, now, crl=True).crls
                except (OSError, ValueError):
                    continue  # unreadable: as if absent, hard or soft decides
        for crl in [*crls, *more]:
            if crl.issuer != cert.issuer or not _signed_by(crl, issuer):
                continue
            next_update = crl.next_update_utc
            if next_update is not None and now >= next_update:
                stale_since = next_update
                continue
            if crl.last_update_utc > now:
                continue
            entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            if entry is not None:
                return "revoked", (f"revoked on {entry.revocation_date_utc:%Y-%m-%d}")
            return "good", ""
        if stale_since is not None:
            return "unknown", f"the CRL of {who} is out of date since {stale_since:%Y-%m-%d %H:%M}"
        return "unknown", f"no CRL of {who}"


def _stale(loaded: _Loaded, now: dt.datetime) -> bool:
    for crl in loaded.crls:
        next_update = crl.next_update_utc
        if next_update is None:
            return now.timestamp() - loaded.read_at > CRL_MAX_AGE
        if now >= next_update:
            return True
    return False


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


class DirectoryCAs:
    """The CA certificates and CRLs read from the directory's CA entries,
    kept until `due` says to read them again. Bad values are left out with
    a log line naming the entry."""

    def __init__(self) -> None:
        self.read_at: float | None = None  # trio.current_time() of the last read
        self.certificates: list[x509.Certificate] = []
        self.crls: list[x509.CertificateRevocationList] = []

    def due(self, now: float, refresh: float, wall: dt.datetime) -> bool:
        if self.read_at is None or now - self.read_at >= refresh:
            return True
        return any(crl.next_update_utc is not None and wall >= crl.next_update_utc
                   for crl in self.crls)

    def replace(self, found: Sequence[CertificateAuthority], now: float,
                log: logging.Logger) -> None:
        certificates, crls = [], []
        for ca in found:
            for der in ca.certificates:
                try:
                    certificates.append(x509.load_der_x509_certificate(der))
                except ValueError:
                    log.warning("CA entry %s: a cACertificate value is not a DER "
                                "certificate; left out", ca.dn)
            for der in ca.crls:
                try:
                    crls.append(_load_crl(der))
                except ValueError:
                    log.warning("CA entry %s: a certificateRevocationList value is not a "
                                "CRL; left out", ca.dn)
        self.certificates, self.crls, self.read_at = certificates, crls, now


# -- the credential source -------------------------------------------------------------


def setup(module: Module) -> None:
    trust = Trust()
    directory_cas = DirectoryCAs()
    reading = trio.Lock()

    async def read_directory_cas(force: bool = False) -> None:
        """Read the CA entries when due (or `force`d), and hand their
        certificates to the TLS listeners. A directory that does not
        answer leaves the previous ones in place (the CRLs among them
        then go stale, and `revocation` decides)."""
        options: Options = module.options
        if not options.ca_base:
            return
        async with reading:
            now, wall = trio.current_time(), dt.datetime.now(dt.UTC)
            if not force and not directory_cas.due(now, options.ca_refresh, wall):
                return
            try:
                found = await module.directory.certificate_authorities(options.ca_base)
            except DirectoryUnavailable as exc:
                module.log.warning("CA entries under %s not read: %s", options.ca_base, exc)
                directory_cas.read_at = now  # not again at every login
                return
            directory_cas.replace(found, now, module.log)
            module.trust_client_cas([c.public_bytes(serialization.Encoding.DER)
                                     for c in directory_cas.certificates])

    async def keep_directory_cas() -> None:
        while True:
            await read_directory_cas(force=True)
            await trio.sleep(module.options.ca_refresh)

    def refuse(subject: str, condition: str, text: str) -> Verdict:
        module.log.info("EXTERNAL refused for certificate %s: %s", subject, text)
        return Verdict(None, condition, text)

    async def mapped(cert: x509.Certificate, der: bytes, how: str, domain: str) -> list[str]:
        if how == MAP_XMPP_ADDR:
            return xmpp_addrs(cert, domain)
        if how == MAP_EMAIL:
            return email_addrs(cert, domain)
        found = await module.directory.users_with_certificate(der)
        return [jid for jid in found if _bare_on(jid, domain) == jid]

    async def judge(_jid: str, request: NeedCredential) -> Verdict | object:
        """Dates, revocation, mapping, authorisation: see the module docstring."""
        options: Options = module.options
        der: bytes = request.detail["certificate"]
        domain: str = request.detail["domain"]
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return refuse("?", "not-authorized", "the client certificate cannot be read")
        subject = cert.subject.rfc4514_string() or f"serial {cert.serial_number}"
        now = dt.datetime.now(dt.UTC)
        if now > cert.not_valid_after_utc:
            return refuse(subject, "credentials-expired",
                          f"the client certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        if now < cert.not_valid_before_utc:
            return refuse(subject, "not-authorized", "the client certificate is not valid "
                          f"before {cert.not_valid_before_utc:%Y-%m-%d}")
        ca_files = module.config.tls.client_cas
        await read_directory_cas()
        issuer = await trio.to_thread.run_sync(trust.issuer_of, cert, ca_files, now,
                                               directory_cas.certificates)
        if issuer is None:
            # The handshake accepted it, so its CA was trusted once: taken
            # out of the directory (or an intermediate CA, not supported).
            return refuse(subject, "not-authorized",
                          f"the issuer {cert.issuer.rfc4514_string()} of the client "
                          "certificate is not a trusted CA")
        if not (issuer.not_valid_before_utc <= now <= issuer.not_valid_after_utc):
            return refuse(subject, "credentials-expired",
                          "the certificate of the issuing CA is out of its validity period")
        status, why = await trio.to_thread.run_sync(
            trust.revocation, cert, issuer, options.crl, now, directory_cas.crls)
        if status == "revoked":
            return refuse(subject, "not-authorized", f"the client certificate has been {why}")
        if status == "unknown":
            if options.revocation == "hard":
                return refuse(subject, "temporary-auth-failure",
                              f"the revocation status of the client certificate is unknown: {why}")
            module.log.warning("EXTERNAL: revocation of %s not checked (soft-fail): %s",
                               subject, why)
        try:
            named: dict[str, list[str]] = {}
            for how in options.mapping.split():
                named[how] = await mapped(cert, der, how, domain)
                if named[how] and request.authzid is None:
                    break  # the first way that names anyone decides
            if request.authzid is not None:
                every = {jid for jids in named.values() for jid in jids}
                if request.authzid not in every:
                    return refuse(subject, "invalid-authzid",
                                  f"the client certificate is not valid for {request.authzid}")
                target = request.authzid
            else:
                chosen = next((jids for jids in named.values() if jids), [])
                if not chosen:
                    return refuse(subject, "not-authorized",
                                  f"the client certificate names no user of {domain}")
                if len(chosen) > 1:
                    return refuse(subject, "invalid-authzid",
                                  "the client certificate is valid for several accounts ("
                                  + ", ".join(chosen) + "): name one as the authzid")
                target = chosen[0]
            verdict = await module.directory.account_verdict(target)
            if verdict is None:
                return refuse(subject, "not-authorized", f"there is no account {target}")
            if verdict.refused and verdict.lasting:
                # Disabled or locked by an administrator: no way in. (A timed
                # lockout after wrong passwords is about the password.)
                return refuse(subject, verdict.condition or "account-disabled",
                              verdict.text or f"the account {target} is disabled")
        except DirectoryUnavailable:
            return UNAVAILABLE
        module.log.info("EXTERNAL: certificate %s accepted for %s", subject, target)
        return Verdict(target)

    module.add_sasl_mechanism(ExternalProvider())
    module.add_credential_source(CERTIFICATE_KIND, judge)
    if module.options.ca_base:
        module.spawn(keep_directory_cas)
