"""Raise the file-descriptor soft limit to the hard limit at start.

Why: every client is a socket, and systemd (like most shells) starts
services with a soft RLIMIT_NOFILE of 1,024 while allowing far more (the
hard limit, often 524,288). At the soft limit `accept()` fails with EMFILE
and every new login waits; a process may raise its own soft limit up to the
hard one without privileges, so `mlink serve` does, and logs the figure.
Shards are started by the supervisor and inherit its limits.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Where the hard limit is "unlimited" (macOS), the kernel still refuses a
# soft limit above its per-process maximum; this is the figure tried then
# (macOS's OPEN_MAX), still far above what the default 1,024 allows.
FALLBACK_NOFILE = 10240


def raise_nofile_limit() -> int | None:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit and log the
    result; the soft limit now in force (None where there is no such limit)."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else FALLBACK_NOFILE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("file descriptors: could not raise the soft limit from %d to %d: %s",
                        soft, wanted, exc)
        else:
            log.info("file descriptors: soft limit raised from %d to %d (the hard limit)",
                     soft, wanted)
            return wanted
    log.info("file descriptors: soft limit %s (hard limit %s)", _fmt(soft), _fmt(hard))
    return soft


def _fmt(value: int) -> str:
    import resource

    return "unlimited" if value == resource.RLIM_INFINITY else str(value)
