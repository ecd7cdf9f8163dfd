"""The directory's password policy, applied to logins that are not binds.

PLAIN is checked by binding as the user, so the directory applies its own
policy (draft-behera ppolicy: lockout, expiry, grace logins). SCRAM never
sends the password, so mlink must apply the same rules itself before a
SCRAM login may succeed, from the user entry's operational attributes and
the policy entry:

- locked: `pwdAccountLockedTime` present (and, for a timed lockout, not yet
  past `pwdLockoutDuration`), or the entry matches the configured
  "disabled" filter (Active Directory's `userAccountControl` bit 2);
- must change: `pwdReset: TRUE`;
- expired: `pwdChangedTime` + `pwdMaxAge` in the past (grace logins need a
  bind with the password, which SCRAM cannot do: the user is told to use
  PLAIN or change the password);
- about to expire: within `pwdExpireWarning`, a notice for the user.

It also binds SCRAM secrets to the password they were derived from: a
value `MLINK-BINDING$1$<base64 SHA-256 of the userPassword value>` stored
beside the RFC 5803 secrets. When `userPassword` is changed by anyone but
mlink (ldappasswd, another application, the user with ldapmodify), the
fingerprint no longer matches and the old secrets — derived from the old
password — are refused; the next PLAIN login, checked by a bind, derives
fresh ones.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

Value = str | bytes

# Operational attributes read with the SCRAM secrets (one search per login).
STATE_ATTRIBUTES = ("pwdAccountLockedTime", "pwdChangedTime", "pwdReset", "pwdPolicySubentry")
POLICY_ATTRIBUTES = ("pwdMaxAge", "pwdExpireWarning", "pwdLockoutDuration",
                     "pwdGraceAuthNLimit")
# ppolicy's value for "locked by an administrator, until unlocked".
PERMANENT_LOCK = "000001010000Z"
BINDING_SCHEME = "MLINK-BINDING"
BINDING_VERSION = "1"
# Warnings closer together than this would nag: one per login is the most,
# and a user who logs in many times a day sees it each time (as with slapd).
SECONDS_PER_DAY = 86400


@dataclass(frozen=True, slots=True)
class PasswordPolicy:
    max_age: int = 0  # seconds; 0: passwords never expire
    expire_warning: int = 0  # seconds before expiry to warn; 0: never
    lockout_duration: int = 0  # seconds; 0: locked until an administrator unlocks
    grace_logins: int = 0

    @classmethod
    def from_entry(cls, attrs: dict[str, list[Value]]) -> PasswordPolicy:
        def number(name: str) -> int:
            values = attrs.get(name.lower()) or []
            try:
                return int(_text(values[0])) if values else 0
            except ValueError:
                return 0

        return cls(number("pwdMaxAge"), number("pwdExpireWarning"),
                   number("pwdLockoutDuration"), number("pwdGraceAuthNLimit"))


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the policy says about a login: a refusal (an RFC 6120 SASL
    condition and a text for the user), or a notice to show after login."""

    condition: str | None = None
    text: str = ""
    notice: str | None = None
    # A refusal that lasts until an administrator acts (disabled, locked
    # by hand), as opposed to a timed lockout after failed logins: the
    # former also ends the account's sessions.
    lasting: bool = False

    @property
    def refused(self) -> bool:
        return self.condition is not None


def judge(attrs: dict[str, list[Value]], policy: PasswordPolicy | None,
          now: datetime.datetime, disabled: bool = False) -> Verdict:
    """The verdict for an entry's state attributes (lower-case names)."""
    if disabled:
        return Verdict("account-disabled", "this account is disabled", lasting=True)
    locked = _first(attrs, "pwdAccountLockedTime")
    if locked is not None:
        if locked == PERMANENT_LOCK:
            return Verdict("account-disabled", "this account is locked", lasting=True)
        if policy is None or not policy.lockout_duration:
            return Verdict("account-disabled", "this account is locked")
        since = parse_generalized_time(locked)
        if since is None or now < since + datetime.timedelta(seconds=policy.lockout_duration):
            return Verdict("account-disabled",
                           "this account is locked after too many failed logins")
    if (_first(attrs, "pwdReset") or "").upper() == "TRUE":
        return Verdict("credentials-expired",
                       "the password was reset: change it before logging in")
    changed = parse_generalized_time(_first(attrs, "pwdChangedTime"))
    if policy is None or not policy.max_age or changed is None:
        return Verdict()
    expires = changed + datetime.timedelta(seconds=policy.max_age)
    if now >= expires:
        return Verdict("credentials-expired", "the password has expired: change it")
    left = (expires - now).total_seconds()
    if policy.expire_warning and left <= policy.expire_warning:
        return Verdict(notice=expiry_notice(left))
    return Verdict()


def expiry_notice(seconds_left: float) -> str:
    days = int(seconds_left // SECONDS_PER_DAY)
    if days >= 2:
        when = f"in {days} days"
    elif days == 1:
        when = "tomorrow"
    else:
        when = f"in {max(1, int(seconds_left // 3600))} hour(s)"
    return f"Your password expires {when}; please change it."


def parse_generalized_time(value: str | None) -> datetime.datetime | None:
    """RFC 4517 GeneralizedTime as slapd writes it (YYYYmmddHHMMSS[.f]Z)."""
    if not value:
        return None
    text = value.strip().rstrip("Z").split(".")[0]
    try:
        return datetime.datetime.strptime(text, "%Y%m%d%H%M%S").replace(
            tzinfo=datetime.UTC)
    except ValueError:
        return None


# -- binding SCRAM secrets to the password --------------------------------------------


def binding_value(user_password: Sequence[Value]) -> str | None:
    """The binding for the entry's current `userPassword` values (None
    when the service account cannot see any: nothing to bind to)."""
    if not user_password:
        return None
    digest = hashlib.sha256()
    for value in sorted(v if isinstance(v, bytes) else v.encode() for v in user_password):
        digest.update(len(value).to_bytes(4, "big") + value)
    fingerprint = base64.b64encode(digest.digest()).decode("ascii")
    return f"{BINDING_SCHEME}${BINDING_VERSION}${fingerprint}"


def is_binding(value: Value) -> bool:
    text = _text(value)
    return text.startswith(BINDING_SCHEME + "$")


def binding_state(secrets_values: Sequence[Value], user_password: Sequence[Value]) -> str:
    """"bound" (the secrets belong to the current password), "stale" (the
    password changed since they were derived), "unbound" (secrets written
    before bindings existed, or no password visible to compare with)."""
    current = binding_value(user_password)
    stored = [_text(v) for v in secrets_values if is_binding(v)]
    if current is None or not stored:
        return "unbound"
    return "bound" if any(hmac.compare_digest(s, current) for s in stored) else "stale"


def _first(attrs: dict[str, list[Value]], name: str) -> str | None:
    values = attrs.get(name.lower())
    return _text(values[0]) if values else None


def _text(value: Value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
