"""The mechanics of the abuse limits in `<limits>` (docs/security.md).

Why one module: the connection code should only ask cheap questions ("may
this address connect?", "how long must this credential check wait?", "may
this session send one more stanza?"); the counting lives here, free of Trio
(times are passed in), so it can be tested without sockets.

Everything is kept in memory per shard: shards share nothing, and asking
the others on every accept or SASL attempt would put a bus round trip on
the hot path. The limits are therefore per shard; docs/security.md says so.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Entries each penalty table keeps: an attacker cycling through addresses
# or account names evicts the oldest entries rather than growing memory
# (about 100 bytes each, so a few MiB per shard at most).
MAX_PENALTY_ENTRIES = 20_000
# The first delay after the free failures; each further failure doubles it
# up to the configured maximum (0.5, 1, 2, 4, 8, 10 s with the defaults).
AUTH_DELAY_BASE = 0.5
# IPv6 hosts get a /64 each (RFC 6177): one host can use any address in it,
# so the prefix, not the address, is what a limit must count.
IPV6_PREFIX = 64
# At most one log line per this many seconds about refused connections.
REFUSAL_LOG_INTERVAL = 10.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def address_key(address: str | IPAddress | None) -> str | None:
    """What the per-address limits count `address` as: the IPv4 address
    (IPv4-mapped IPv6 addresses included), or the IPv6 /64; None when
    there is no address (a test's in-memory stream)."""
    if address is None:
        return None
    try:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


def is_exempt(address: str | IPAddress | None, loopback: bool,
              trusted: Iterable[IPNetwork] = ()) -> bool:
    """Whether `address` is exempt from the per-address limits: loopback
    (when `loopback`) and the WebSocket trusted proxies, which carry many
    clients each."""
    if address is None:
        return True
    try:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if loopback and ip.is_loopback:
        return True
    return any(ip in net for net in trusted)


# -- stanza rate ---------------------------------------------------------------------


class TokenBucket:
    """A session's stanza allowance: `burst` at once, `rate` per second on
    average. The hot path is `take()` (one subtraction and a comparison);
    the clock is read only once the bucket runs dry."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self) -> bool:
        """Spend one token; False when the bucket was dry (call `wait`)."""
        self.tokens -= 1.0
        return self.tokens >= 0.0

    def wait(self, now: float) -> float:
        """Refill for the time since the last refill; the seconds to wait
        before the stanza just taken may be handled (0 when it may now)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return 0.0 if self.tokens >= 0.0 else -self.tokens / self.rate


# -- authentication failures -------------------------------------------------------------


class PenaltyTable:
    """Failure scores by key (an address or an account), each forgotten at
    one per `forget` seconds; at most `max_entries`, the least recently
    touched evicted first (dicts keep insertion order)."""

    __slots__ = ("forget", "max_entries", "_scores")

    def __init__(self, forget: float, max_entries: int = MAX_PENALTY_ENTRIES) -> None:
        self.forget = forget
        self.max_entries = max_entries
        self._scores: dict[str, tuple[float, float]] = {}

    def score(self, key: str, now: float) -> float:
        entry = self._scores.get(key)
        if entry is None:
            return 0.0
        value, stamp = entry
        return max(0.0, value - (now - stamp) / self.forget)

    def add(self, key: str, now: float) -> float:
        """Record one failure; the new score."""
        value = self.score(key, now) + 1.0
        self._scores.pop(key, None)  # re-inserted last: most recently touched
        self._scores[key] = (value, now)
        while len(self._scores) > self.max_entries:
            del self._scores[next(iter(self._scores))]
        return value

    def clear(self, key: str) -> None:
        self._scores.pop(key, None)

    def __len__(self) -> int:
        return len(self._scores)


@dataclass
class AuthThrottle:
    """Increasing delays for addresses and accounts that keep failing to
    authenticate (per shard, bounded in size).

    The delay is put before the credential check, whatever its outcome: a
    delay on failures only would let a guesser give up on any attempt not
    answered at once. A success clears the account's score (only its owner
    can succeed) but not the address's (one valid account must not wash an
    address clean)."""

    free_failures: int
    max_delay: float
    forget: float
    addresses: PenaltyTable = field(init=False)
    accounts: PenaltyTable = field(init=False)

    def __post_init__(self) -> None:
        self.addresses = PenaltyTable(self.forget)
        self.accounts = PenaltyTable(self.forget)

    def delay(self, address: str | None, account: str | None, now: float) -> float:
        """Seconds to wait before checking a credential for `account` from
        `address` (None: not counted)."""
        if self.max_delay <= 0:
            return 0.0
        score = 0.0
        if address is not None:
            score = self.addresses.score(address, now)
        if account is not None:
            score = max(score, self.accounts.score(account, now))
        # Rounded up: a failure being forgotten still counts until it is.
        over = math.ceil(score) - self.free_failures
        if over < 0:
            return 0.0
        return min(self.max_delay, AUTH_DELAY_BASE * 2.0 ** min(over, 32))

    def failed(self, address: str | None, account: str | None, now: float) -> None:
        if address is not None:
            self.addresses.add(address, now)
        if account is not None:
            self.accounts.add(account, now)

    def succeeded(self, account: str) -> None:
        self.accounts.clear(account)


# -- connections per address --------------------------------------------------------------


class ConnectionSlot:
    """One admitted connection's place in the per-address counts; released
    exactly once when the connection ends."""

    __slots__ = ("limiter", "key", "exempt", "address", "_authenticated", "_released")

    def __init__(self, limiter: ConnectionLimiter | None, key: str | None, exempt: bool,
                 address: str | None) -> None:
        self.limiter = limiter
        self.key = key  # what the counts and the auth throttle use
        self.exempt = exempt
        self.address = address
        self._authenticated = False
        self._released = False

    def authenticated(self) -> None:
        """The connection authenticated: it no longer counts as unauthenticated."""
        if self._authenticated or self._released:
            return
        self._authenticated = True
        if self.limiter is not None and self.key is not None:
            self.limiter._drop(self.limiter.unauthenticated, self.key)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self.limiter is not None and self.key is not None:
            self.limiter._drop(self.limiter.connections, self.key)
            if not self._authenticated:
                self.limiter._drop(self.limiter.unauthenticated, self.key)


class ConnectionLimiter:
    """Connections and unauthenticated connections per address (per shard)."""

    def __init__(self, per_address: int, unauthenticated: int, loopback_exempt: bool,
                 trusted: Iterable[IPNetwork] = ()) -> None:
        self.per_address = per_address  # 0: no limit
        self.unauthenticated_limit = unauthenticated  # 0: no limit
        self.loopback_exempt = loopback_exempt
        self.trusted = tuple(trusted)
        self.connections: dict[str, int] = {}
        self.unauthenticated: dict[str, int] = {}
        self.refused = 0  # for logs and status
        self._unlogged = 0
        self._last_log = float("-inf")

    def admit(self, address: str | None) -> ConnectionSlot | str:
        """A slot for a new connection from `address`, or why it is refused."""
        exempt = is_exempt(address, self.loopback_exempt, self.trusted)
        key = address_key(address)
        if exempt or key is None:
            return ConnectionSlot(None, key, True, address)
        if self.per_address and self.connections.get(key, 0) >= self.per_address:
            return f"{self.per_address} connections from {key}"
        if (self.unauthenticated_limit
                and self.unauthenticated.get(key, 0) >= self.unauthenticated_limit):
            return f"{self.unauthenticated_limit} unauthenticated connections from {key}"
        self.connections[key] = self.connections.get(key, 0) + 1
        self.unauthenticated[key] = self.unauthenticated.get(key, 0) + 1
        return ConnectionSlot(self, key, False, address)

    def note_refused(self, reason: str, now: float) -> None:
        """Count a refusal; log at most once per REFUSAL_LOG_INTERVAL, so a
        flood of connections cannot flood the log."""
        self.refused += 1
        self._unlogged += 1
        if now - self._last_log >= REFUSAL_LOG_INTERVAL:
            log.warning("refused %d connection(s) in the last %.0f s (limit reached: %s)",
                        self._unlogged, REFUSAL_LOG_INTERVAL, reason)
            self._last_log = now
            self._unlogged = 0

    @staticmethod
    def _drop(counts: dict[str, int], key: str) -> None:
        left = counts.get(key, 0) - 1
        if left > 0:
            counts[key] = left
        else:
            counts.pop(key, None)
