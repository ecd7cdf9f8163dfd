"""HTTP Range requests for downloads (RFC 9110 §14), sans-IO: one byte
range per request, which is what players seeking in a video ask for
(Safari plays no video from a server without them). Several ranges at
once would need a multipart body; such a request gets the whole file,
as §14.2 allows a server to ignore Range."""

from __future__ import annotations

import re

# "bytes=first-last", "bytes=first-" or "bytes=-suffix"; digits bounded so
# the numbers stay small (19 digits < 2**63).
_RANGE_RE = re.compile(r"^bytes\s*=\s*(\d{0,19})\s*-\s*(\d{0,19})\s*$", re.IGNORECASE)


class Unsatisfiable(ValueError):
    """A range wholly outside the file (416)."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for a Range header on a file of `size`
    bytes; None to send the whole file (no header, a form we do not
    serve, several ranges); Unsatisfiable for 416."""
    if header is None:
        return None
    m = _RANGE_RE.match(header.strip())
    if m is None:
        return None
    first_s, last_s = m.groups()
    if not first_s and not last_s:
        return None
    if not first_s:  # the last N bytes
        suffix = int(last_s)
        if suffix == 0 or size == 0:
            raise Unsatisfiable(header)
        return max(0, size - suffix), size - 1
    first = int(first_s)
    if last_s and int(last_s) < first:
        return None  # invalid: ignored (§14.1.1)
    if first >= size:
        raise Unsatisfiable(header)
    last = min(int(last_s), size - 1) if last_s else size - 1
    return first, last
