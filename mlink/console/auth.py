"""Console sessions, CSRF tokens and who administers what.

Sessions are held in the supervisor's memory, keyed by a random token the
browser keeps in a `__Host-` cookie (Secure, HttpOnly, SameSite=Strict,
Path=/): logging out or an expiry really ends them, and nothing about the
user is in the cookie. Each session has its own CSRF token, which every
form carries in a hidden field and every POST must return; the login form,
before there is a session, uses a double-submitted random cookie instead.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

# Cookie names: the __Host- prefix makes browsers refuse them unless Secure,
# Path=/ and without Domain, so no other host or path can plant one.
SESSION_COOKIE = "__Host-mlink-console"
LOGIN_COOKIE = "__Host-mlink-login"
# Failed console logins remembered per client address, and the window.
LOGIN_FAILURES_ALLOWED = 10
LOGIN_FAILURE_WINDOW = 600.0
# Most sessions kept at once: a flood of logins cannot grow memory without bound.
MAX_SESSIONS = 10_000


@dataclass(slots=True)
class ConsoleSession:
    token: str
    jid: str
    # Domains this user administers (empty: not an administrator).
    admin_domains: frozenset[str]
    created: float
    seen: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    # The directory said the password must be changed (expired, reset): only
    # the password form is open until it is.
    must_change: bool = False
    notice: str | None = None
    # A message for the next page (post/redirect/get).
    flash: str | None = None

    @property
    def is_admin(self) -> bool:
        return bool(self.admin_domains)

    def manages(self, jid: str) -> bool:
        """Whether this administrator may see and change user `jid`."""
        return jid.rpartition("@")[2] in self.admin_domains


def same_token(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class SessionStore:
    def __init__(self, idle_seconds: float, max_seconds: float) -> None:
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self._sessions: dict[str, ConsoleSession] = {}
        self._failures: dict[str, deque[float]] = {}

    def create(self, jid: str, admin_domains: frozenset[str]) -> ConsoleSession:
        now = time.monotonic()
        self._expire(now)
        if len(self._sessions) >= MAX_SESSIONS:
            oldest = min(self._sessions.values(), key=lambda s: s.seen)
            del self._sessions[oldest.token]
        session = ConsoleSession(secrets.token_urlsafe(32), jid, admin_domains, now, now)
        self._sessions[session.token] = session
        return session

    def get(self, token: str | None) -> ConsoleSession | None:
        """The live session of `token`, its idle clock restarted; None when
        there is none or it expired."""
        if not token:
            return None
        session = self._sessions.get(token)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.seen > self.idle_seconds or now - session.created > self.max_seconds:
            del self._sessions[token]
            return None
        session.seen = now
        return session

    def end(self, token: str | None) -> None:
        if token:
            self._sessions.pop(token, None)

    def end_user(self, jid: str) -> None:
        """End every console session of `jid` (deleted, password reset)."""
        for token in [t for t, s in self._sessions.items() if s.jid == jid]:
            del self._sessions[token]

    def _expire(self, now: float) -> None:
        for token in [t for t, s in self._sessions.items()
                      if now - s.seen > self.idle_seconds
                      or now - s.created > self.max_seconds]:
            del self._sessions[token]

    # -- login throttling -----------------------------------------------------

    def login_blocked(self, address: str) -> bool:
        failures = self._failures.get(address)
        if not failures:
            return False
        now = time.monotonic()
        while failures and now - failures[0] > LOGIN_FAILURE_WINDOW:
            failures.popleft()
        return len(failures) >= LOGIN_FAILURES_ALLOWED

    def login_failed(self, address: str) -> None:
        if len(self._failures) > MAX_SESSIONS:
            self._failures.clear()
        self._failures.setdefault(address, deque(maxlen=LOGIN_FAILURES_ALLOWED)).append(
            time.monotonic())

    def login_succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
