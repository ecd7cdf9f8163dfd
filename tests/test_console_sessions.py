"""Console sessions (mlink/console/auth.py): idle and absolute expiry,
ending a user's sessions, the login throttle, the CSRF comparison."""

from __future__ import annotations

import pytest

from mlink.console import auth
from mlink.console.auth import LOGIN_FAILURES_ALLOWED, SessionStore, same_token


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(auth.time, "monotonic", clock)
    return clock


def test_idle_sessions_expire(clock):
    store = SessionStore(idle_seconds=60, max_seconds=3600)
    session = store.create("a@example.com", frozenset())
    clock.now += 59
    assert store.get(session.token) is session  # a request restarts the idle clock
    clock.now += 59
    assert store.get(session.token) is session
    clock.now += 61
    assert store.get(session.token) is None
    assert store.get(session.token) is None


def test_sessions_end_after_their_lifetime_however_active(clock):
    store = SessionStore(idle_seconds=60, max_seconds=300)
    session = store.create("a@example.com", frozenset({"example.com"}))
    for _ in range(5):
        clock.now += 50
        assert store.get(session.token) is session
    clock.now += 51
    assert store.get(session.token) is None


def test_ending_a_users_sessions_and_logout(clock):
    store = SessionStore(60, 3600)
    one, two = store.create("a@example.com", frozenset()), store.create("a@example.com",
                                                                        frozenset())
    other = store.create("b@example.com", frozenset())
    store.end_user("a@example.com")
    assert store.get(one.token) is None and store.get(two.token) is None
    assert store.get(other.token) is other
    store.end(other.token)
    assert store.get(other.token) is None
    assert store.get(None) is None and store.get("") is None


def test_sessions_have_distinct_tokens_and_csrf_tokens(clock):
    store = SessionStore(60, 3600)
    a, b = store.create("a@example.com", frozenset()), store.create("a@example.com", frozenset())
    assert a.token != b.token and a.csrf != b.csrf and len(a.csrf) >= 40


def test_delegation_by_domain():
    store = SessionStore(60, 3600)
    session = store.create("o@example.org", frozenset({"example.org"}))
    assert session.is_admin and session.manages("u@example.org")
    assert not session.manages("u@example.com")
    assert not session.manages("u@evil.example.org")
    assert not store.create("u@example.org", frozenset()).is_admin


def test_login_throttle(clock):
    store = SessionStore(60, 3600)
    for _ in range(LOGIN_FAILURES_ALLOWED - 1):
        store.login_failed("192.0.2.1")
    assert not store.login_blocked("192.0.2.1")
    store.login_failed("192.0.2.1")
    assert store.login_blocked("192.0.2.1")
    assert not store.login_blocked("192.0.2.2")
    clock.now += auth.LOGIN_FAILURE_WINDOW + 1
    assert not store.login_blocked("192.0.2.1")
    store.login_failed("192.0.2.3")
    store.login_succeeded("192.0.2.3")
    assert not store.login_blocked("192.0.2.3")


def test_csrf_comparison():
    assert same_token("abc", "abc")
    assert not same_token("abd", "abc") and not same_token(None, "abc")
    assert not same_token("", "abc")
