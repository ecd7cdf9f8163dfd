"""Upload slots without shared state (sans-IO): what a slot request may
name, and the signed token that lets any shard accept the PUT.

A slot is never stored. Its URL names the owner (a keyed hash of the
user's bare JID, so URLs do not reveal who uploaded), a random slot id
(the part nobody can guess) and the file name; the PUT's `Authorization`
header carries the slot's expiry and an HMAC-SHA-256, under the server's
upload key, of everything the slot allows: owner, slot id, file name,
size, content type and expiry. Any shard holding the key checks it, and
a PUT that differs in any of them (a bigger file, another type, a
renamed file, a late start) is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import unicodedata
from dataclasses import dataclass
from urllib.parse import quote, unquote

# The HTTP path prefix of uploads and downloads.
PATH_PREFIX = "/upload/"
# Random bytes of a slot id: 144 bits, unguessable; base64url without
# padding gives 24 characters.
SLOT_ID_BYTES = 18
SLOT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{24}$")
# Hex digits of the owner id: 128 bits of an HMAC, enough that two users
# never share a directory, short enough for a URL.
OWNER_HEX = 32
OWNER_RE = re.compile(r"^[0-9a-f]{32}$")
# How long a slot may wait for its PUT to start. XEP-0363 §7 recommends
# around 60 s (a client asks right before uploading); twice that leaves a
# phone on a slow network time to open a new TLS connection.
SLOT_LIFETIME = 120
# A file name longer than this (UTF-8 bytes) is refused: ext4 and most
# file systems allow 255 bytes per name, and clients keep the name for
# saving the download.
MAX_NAME_BYTES = 255
# Content types are short ("image/jpeg; charset=..."); anything longer is
# not one a client means.
MAX_CONTENT_TYPE = 255
# Sizes are decimal; 19 digits is below 2**63, so the number fits anywhere.
SIZE_RE = re.compile(r"^[0-9]{1,19}$")
_TOKEN = r"[A-Za-z0-9!#$&^_.+-]+"
CONTENT_TYPE_RE = re.compile(
    rf'^{_TOKEN}/{_TOKEN}(?:\s*;\s*{_TOKEN}=(?:{_TOKEN}|"[^"\\\x00-\x1f\x7f]*"))*$')
DEFAULT_CONTENT_TYPE = "application/octet-stream"
# What a slot requested without a content type signs: XEP-0363 §6 asks the
# service to hold the PUT to a type only when one was given, so such a slot
# takes the PUT's Content-Type (or application/octet-stream without one).
ANY_TYPE = ""
# "Bearer <expiry>.<size>.<signature>": the size is in the clear so that a
# PUT of another length gets the right status (413/400) before the HMAC.
_AUTH_RE = re.compile(r"^Bearer ([0-9]{1,12})\.([0-9]{1,19})\.([A-Za-z0-9_-]{43})$")


class SlotRefused(ValueError):
    """A slot request naming a file we refuse (bad-request)."""


def check_filename(name: str) -> str:
    """`name` if it is a plain file name; SlotRefused otherwise. Nothing
    is silently changed: a name with a path, a control character or that
    is too long is refused, so what the client shows is what is served.
    (The file on disk is never named after it.)"""
    if not name or name in (".", ".."):
        raise SlotRefused("the file name is empty")
    if "/" in name or "\\" in name:
        raise SlotRefused("the file name must not contain a path")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") for ch in name):
        raise SlotRefused("the file name contains control characters")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise SlotRefused(f"the file name is longer than {MAX_NAME_BYTES} bytes")
    if name != name.strip():
        raise SlotRefused("the file name starts or ends with white space")
    return name


def check_size(raw: str | None) -> int:
    """The declared size in bytes; SlotRefused unless a positive integer."""
    if raw is None or not SIZE_RE.match(raw.strip()):
        raise SlotRefused("the size must be a number of bytes")
    size = int(raw.strip())
    if size < 1:
        raise SlotRefused("the file is empty")
    return size


def check_content_type(raw: str | None) -> str:
    """The declared media type, ANY_TYPE when absent; SlotRefused for
    anything that is not one (it becomes a header)."""
    if raw is None or not raw.strip():
        return ANY_TYPE
    value = raw.strip()
    if len(value) > MAX_CONTENT_TYPE or not CONTENT_TYPE_RE.match(value):
        raise SlotRefused("the content type is not a media type")
    return value


def owner_id(key: bytes, user: str) -> str:
    """The directory and URL component of `user`'s files."""
    return hmac.new(key, b"owner\0" + user.encode(), hashlib.sha256).hexdigest()[:OWNER_HEX]


def new_slot_id() -> str:
    return secrets.token_urlsafe(SLOT_ID_BYTES)


@dataclass(frozen=True, slots=True)
class Slot:
    owner: str
    slot_id: str
    name: str
    size: int
    content_type: str
    expires: int

    def path(self) -> str:
        """The URL path, name percent-encoded (RFC 3986)."""
        return f"{PATH_PREFIX}{self.owner}/{self.slot_id}/{quote(self.name, safe='')}"

    def signature(self, key: bytes) -> str:
        message = "\0".join((self.owner, self.slot_id, self.name, str(self.size),
                             self.content_type, str(self.expires))).encode()
        digest = hmac.new(key, b"slot\0" + message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def authorization(self, key: bytes) -> str:
        """The PUT's `Authorization` header value."""
        return f"Bearer {self.expires}.{self.size}.{self.signature(key)}"


@dataclass(frozen=True, slots=True)
class FilePath:
    """A parsed upload/download path."""

    owner: str
    slot_id: str
    name: str


def parse_path(path: str) -> FilePath | None:
    """The owner, slot id and file name of a request path, None when it is
    not one of ours (the caller answers 404)."""
    if not path.startswith(PATH_PREFIX):
        return None
    parts = path[len(PATH_PREFIX):].split("/")
    if len(parts) != 3:
        return None
    owner, slot_id, quoted = parts
    if not OWNER_RE.match(owner) or not SLOT_ID_RE.match(slot_id):
        return None
    try:
        name = check_filename(unquote(quoted, errors="strict"))
    except (SlotRefused, UnicodeDecodeError):
        return None
    return FilePath(owner, slot_id, name)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a PUT's Authorization header claims: the slot's expiry and
    size, and the signature that must cover them and the rest."""

    expires: int
    size: int
    signature: str


def parse_authorization(value: str | None) -> Grant | None:
    m = _AUTH_RE.match((value or "").strip())
    if m is None:
        return None
    return Grant(int(m.group(1)), int(m.group(2)), m.group(3))


def verify(key: bytes, where: FilePath, grant: Grant, content_type: str,
           now: float) -> str | None:
    """Why a PUT to `where` under `grant` is refused, None if the grant is
    the server's own for exactly this owner, slot, name, size and type."""
    signed = [Slot(where.owner, where.slot_id, where.name, grant.size, declared,
                   grant.expires).signature(key) for declared in (content_type, ANY_TYPE)]
    # Both are computed whatever the first gives, so the time taken does
    # not tell which one matched.
    if not (hmac.compare_digest(signed[0], grant.signature)
            | hmac.compare_digest(signed[1], grant.signature)):
        return "the slot does not allow this upload (the name, size or type differ)"
    if now > grant.expires:
        return "the slot has expired: ask for a new one"
    return None
