"""Per-shard traffic counters for `/metrics` (docs/console.md).

Plain dicts of ints bumped on the hot path (one dictionary increment per
stanza), read by the supervisor through the `stats` control op. Kinds and
mechanisms are few and fixed (message/presence/iq, the offered SASL
mechanisms), so the dicts stay tiny; anything else counts as "other".
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# Stanza kinds counted by name (RFC 6120 §8); any other element is "other".
STANZA_KINDS = frozenset({"message", "presence", "iq"})
# Mechanism names longer than this are a client's invention: counted as "other"
# so a client cannot grow the counters without bound.
MAX_MECHANISM_CHARS = 32


def stanza_kind(tag: str) -> str:
    """"message", "presence", "iq" or "other" for an element's tag."""
    local = tag.rpartition("}")[2]
    return local if local in STANZA_KINDS else "other"


@dataclass(slots=True)
class ShardCounters:
    stanzas_in: Counter[str] = field(default_factory=Counter)
    stanzas_out: Counter[str] = field(default_factory=Counter)
    logins_ok: Counter[str] = field(default_factory=Counter)
    logins_failed: Counter[str] = field(default_factory=Counter)
    # Directory requests on the login path, by operation: how many, their
    # total seconds (a mean over any interval is sum/count), how many
    # failed because the directory could not be reached.
    directory_requests: Counter[str] = field(default_factory=Counter)
    directory_seconds: dict[str, float] = field(default_factory=dict)
    directory_errors: Counter[str] = field(default_factory=Counter)

    @contextmanager
    def timed(self, operation: str) -> Iterator[None]:
        """Count and time one directory request; an exception named
        DirectoryUnavailable (or a subclass) counts as an error."""
        started = time.monotonic()
        try:
            yield
        except Exception as exc:
            if any(c.__name__ == "DirectoryUnavailable" for c in type(exc).__mro__):
                self.directory_errors[operation] += 1
            raise
        finally:
            self.directory_requests[operation] += 1
            self.directory_seconds[operation] = (self.directory_seconds.get(operation, 0.0)
                                                 + time.monotonic() - started)

    def login(self, mechanism: str | None, ok: bool) -> None:
        name = mechanism or "none"
        if len(name) > MAX_MECHANISM_CHARS or not name.replace("-", "").replace(
                "_", "").isalnum():
            name = "other"
        (self.logins_ok if ok else self.logins_failed)[name] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"stanzas_in": dict(self.stanzas_in), "stanzas_out": dict(self.stanzas_out),
                "logins_ok": dict(self.logins_ok), "logins_failed": dict(self.logins_failed),
                "directory": {op: {"requests": n,
                                   "seconds": round(self.directory_seconds.get(op, 0.0), 6),
                                   "errors": self.directory_errors.get(op, 0)}
                              for op, n in self.directory_requests.items()}}
