"""The bus frame format between shards, sans-IO (no trio, no sockets).

A frame on the wire is::

    u32 length          bytes that follow (header + payload), big-endian
    u8  version         FRAME_VERSION; a peer speaking another is refused
    u8  type            FrameType
    u16 source          index of the sending shard
    u16 flags           per-type bits (FLAG_MORE)
    ... payload         per-type encoding below

Payloads are simple binary, not a general serialiser: every field is a
fixed-width integer, a JID string with a u16 length (RFC 7622 caps a JID at
3071 bytes), or stanza bytes with a u32 length. Decoding is a handful of
`struct.unpack_from` calls per frame, which matters at a million frames a
second, and a malformed payload fails with `FrameError`, never with an
arbitrary exception from a parser.

The bus transport (Unix sockets today, a message system between machines
later) only moves these bytes; nothing here knows how.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

# Bumped on any incompatible change. All shards of one server run the same
# code, so a mismatch means a stale process or a foreign peer: refuse it.
FRAME_VERSION = 2
# The largest frame (header + payload) a decoder accepts and an encoder
# produces. It bounds the memory one peer can make a shard buffer while a
# frame arrives. It must hold the largest stanza (256 KiB by default, a
# configuration may raise it) plus a fan-out recipient list (a JID is at
# most 3071 bytes, a roster of a few thousand contacts is ~100 KiB):
# 4 MiB covers both with room; a fan-out that would exceed it is split by
# `encode_fanouts` into several frames.
MAX_FRAME_BYTES = 4 * 1024 * 1024
# RFC 7622 §3.1: a JID is at most 3 × 1023 bytes plus two separators; a
# recipient entry carries two (the session's full JID and the stanza's own
# `to`) and a separator.
MAX_JID_BYTES = 2 * 3071 + 1

_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">BBHH")
# Length prefix plus header: the fixed cost of every frame.
HEADER_BYTES = _LENGTH.size + _HEADER.size
MAX_PAYLOAD_BYTES = MAX_FRAME_BYTES - _HEADER.size

# Set on every TABLE_SNAPSHOT chunk but the last one.
FLAG_MORE = 0x0001

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_SESSION = struct.Struct(">QbB")  # session id, priority, flag bits below
# Session flag bits: what other shards need to route as this shard would.
SESSION_AVAILABLE = 0x01  # sent available presence (RFC 6121 §4.2)
SESSION_INTERESTED = 0x02  # requested the roster: gets pushes (§2.1.6)
# Module-declared session fields (`mlink.router.fields`) follow the presence
# as (name, value) pairs: a u8 count, then u8-length names and u16-length
# values. The frame layer does not know what any of them mean.
MAX_SESSION_FIELDS = 255


class FrameError(ValueError):
    """Bytes that are not a valid frame; the connection that sent them is
    closed, since its framing can no longer be trusted."""


class FrameType(enum.IntEnum):
    # First frame on a new connection, both ways: who I am, how many shards.
    HELLO = 1
    # A session was bound / ended on the source shard (global session table).
    SESSION_UP = 2
    SESSION_DOWN = 3
    # A (re)starting shard asks a peer for its sessions; the peer answers
    # with TABLE_SNAPSHOT frames, FLAG_MORE on all but the last.
    TABLE_REQUEST = 4
    TABLE_SNAPSHOT = 5
    # One stanza for one JID (full, or bare for the receiver to resolve).
    STANZA = 6
    # One stanza and the recipients on the destination shard: presence
    # fan-out sends one of these per shard, never one per recipient.
    FANOUT = 7
    # A shard is gone (its sessions must be dropped); for transports where
    # the connection's end does not say so by itself.
    SHARD_DEAD = 8
    # Counters, for a transport that carries stats on the bus.
    STATS = 9
    # End the named session on the receiving shard with a stream error: a
    # bind of the same full JID elsewhere replaced it (RFC 6120 §7.7.2.2).
    KICK = 10
    # A user's durable data changed: drop cached copies (a named cache).
    INVALIDATE = 11
    # Opaque bytes from a module to the same module on the receiving shard
    # (`Module.send_bus`): a channel name and a payload.
    MODULE = 12


# Byte value -> FrameType: a dict lookup is cheaper than FrameType(value).
_TYPES = {t.value: t for t in FrameType}


class Frame(NamedTuple):
    """One decoded frame. A NamedTuple, not a frozen dataclass: the decoder
    builds one per frame, and a tuple is several times cheaper to make."""

    type: FrameType
    payload: bytes = b""
    flags: int = 0
    # Filled in by the decoder; the sender's bus sets it when encoding.
    source: int = 0


def encode_frame(ftype: FrameType, source: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """One frame's wire bytes."""
    length = _HEADER.size + len(payload)
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES} byte limit")
    return _LENGTH.pack(length) + _HEADER.pack(FRAME_VERSION, ftype, source, flags) + payload


class FrameDecoder:
    """Bytes in, whole frames out (the h11 pattern): feed whatever the
    socket returned, get the frames it completed."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> list[Frame]:
        """Frames completed by `data`; raises FrameError on a frame that is
        oversized, of another version or of an unknown type."""
        buf = self._buffer
        buf += data
        frames: list[Frame] = []
        pos, end = 0, len(buf)
        view = memoryview(buf)
        try:
            while end - pos >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(buf, pos)
                if length > MAX_FRAME_BYTES:
                    raise FrameError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
                if length < _HEADER.size:
                    raise FrameError(f"frame of {length} bytes is shorter than its header")
                if end - pos - _LENGTH.size < length:
                    break
                version, ftype, source, flags = _HEADER.unpack_from(buf, pos + _LENGTH.size)
                if version != FRAME_VERSION:
                    raise FrameError(f"frame version {version}; this shard speaks {FRAME_VERSION}")
                kind = _TYPES.get(ftype)
                if kind is None:
                    raise FrameError(f"unknown frame type {ftype}")
                start = pos + HEADER_BYTES
                pos += _LENGTH.size + length
                frames.append(Frame(kind, bytes(view[start:pos]), flags, source))
        finally:
            view.release()
        if pos:
            del buf[:pos]
        return frames

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)


# -- payload encodings ------------------------------------------------------------


class _Reader:
    """Bounds-checked reads from one payload."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, st: struct.Struct) -> tuple[int, ...]:
        if self.pos + st.size > len(self.data):
            raise FrameError("payload truncated")
        values = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return values

    def u8(self) -> int:
        return self._take(_U8)[0]

    def u16(self) -> int:
        return self._take(_U16)[0]

    def u64(self) -> int:
        return self._take(_U64)[0]

    def blob(self, width: struct.Struct) -> bytes:
        (size,) = self._take(width)
        if self.pos + size > len(self.data):
            raise FrameError("payload truncated")
        value = self.data[self.pos : self.pos + size]
        self.pos += size
        return value

    def jid(self) -> str:
        raw = self.blob(_U16)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("JID is not UTF-8") from None

    def session(self) -> tuple[int, int, int]:
        sid, priority, bits = self._take(_SESSION)
        return sid, priority, bits

    def end(self) -> None:
        if self.pos != len(self.data):
            raise FrameError(f"{len(self.data) - self.pos} stray bytes after the payload")


def _jid(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_JID_BYTES:
        raise FrameError(f"JID of {len(raw)} bytes exceeds {MAX_JID_BYTES}")
    return _U16.pack(len(raw)) + raw


def _stanza(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


@dataclass(frozen=True, slots=True)
class SessionEntry:
    """One row of the global session table, as SESSION_UP announces it.

    `session_id` is unique on its shard (a counter), so a late SESSION_DOWN
    for an old session cannot remove a newer one with the same full JID.
    `presence` is the session's last broadcast presence stanza (may be
    empty), so a shard can answer probes without asking."""

    jid: str
    session_id: int
    priority: int = 0
    available: bool = False
    presence: bytes = b""
    interested: bool = False
    # Module-declared replicated fields: (name, encoded value) pairs.
    fields: tuple[tuple[str, bytes], ...] = ()


def _session_bytes(entry: SessionEntry) -> bytes:
    if not -128 <= entry.priority <= 127:
        raise FrameError(f"priority {entry.priority} is outside -128..127 (RFC 6121 §4.7.2.3)")
    return (
        _jid(entry.jid)
        + _SESSION.pack(
            entry.session_id,
            entry.priority,
            (SESSION_AVAILABLE if entry.available else 0)
            | (SESSION_INTERESTED if entry.interested else 0),
        )
        + _stanza(entry.presence)
        + _fields(entry.fields)
    )


def _fields(fields: Sequence[tuple[str, bytes]]) -> bytes:
    if len(fields) > MAX_SESSION_FIELDS:
        raise FrameError(f"{len(fields)} session fields exceed {MAX_SESSION_FIELDS}")
    parts = [_U8.pack(len(fields))]
    for name, value in fields:
        raw = name.encode("utf-8")
        if len(raw) > 0xFF or len(value) > 0xFFFF:
            raise FrameError(f"session field {name!r} is too large")
        parts.append(_U8.pack(len(raw)) + raw + _U16.pack(len(value)) + value)
    return b"".join(parts)


def _read_session(r: _Reader) -> SessionEntry:
    jid = r.jid()
    sid, priority, bits = r.session()
    presence = r.blob(_U32)
    fields = []
    for _ in range(r.u8()):
        try:
            name = r.blob(_U8).decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("session field name is not UTF-8") from None
        fields.append((name, r.blob(_U16)))
    return SessionEntry(jid, sid, priority, bool(bits & SESSION_AVAILABLE), presence,
                        bool(bits & SESSION_INTERESTED), tuple(fields))


def encode_hello(shards: int) -> bytes:
    return _U16.pack(shards)


def decode_hello(payload: bytes) -> int:
    r = _Reader(payload)
    shards = r.u16()
    r.end()
    return shards


def encode_session_up(entry: SessionEntry) -> bytes:
    return _session_bytes(entry)


def decode_session_up(payload: bytes) -> SessionEntry:
    r = _Reader(payload)
    entry = _read_session(r)
    r.end()
    return entry


def encode_session_down(jid: str, session_id: int) -> bytes:
    return _jid(jid) + _U64.pack(session_id)


def decode_session_down(payload: bytes) -> tuple[str, int]:
    r = _Reader(payload)
    jid, sid = r.jid(), r.u64()
    r.end()
    return jid, sid


def encode_table_snapshots(entries: Iterable[SessionEntry]) -> list[tuple[bytes, int]]:
    """(payload, flags) for each TABLE_SNAPSHOT frame of a whole table:
    chunks under the frame limit, FLAG_MORE on all but the last; an empty
    table is one empty chunk, so the requester always gets an answer."""
    chunks: list[tuple[bytes, int]] = []
    parts: list[bytes] = []
    size = 0
    for entry in entries:
        row = _session_bytes(entry)
        if parts and size + len(row) > MAX_PAYLOAD_BYTES:
            chunks.append((b"".join(parts), FLAG_MORE))
            parts, size = [], 0
        parts.append(row)
        size += len(row)
    chunks.append((b"".join(parts), 0))
    return chunks


def decode_table_snapshot(payload: bytes) -> list[SessionEntry]:
    r = _Reader(payload)
    entries = []
    while r.pos < len(payload):
        entries.append(_read_session(r))
    return entries


def encode_stanza(to: str, stanza: bytes) -> bytes:
    return _jid(to) + _stanza(stanza)


def decode_stanza(payload: bytes) -> tuple[str, bytes]:
    r = _Reader(payload)
    to, stanza = r.jid(), r.blob(_U32)
    r.end()
    return to, stanza


def encode_fanout(stanza: bytes, recipients: Sequence[str]) -> bytes:
    if len(recipients) > 0xFFFFFFFF:
        raise FrameError("too many recipients")
    return _stanza(stanza) + _U32.pack(len(recipients)) + b"".join(_jid(j) for j in recipients)


def encode_fanouts(stanza: bytes, recipients: Sequence[str]) -> list[bytes]:
    """FANOUT payloads for one destination shard: one, unless the list is
    so long that it must be split to stay under MAX_FRAME_BYTES."""
    fixed = _U32.size + len(stanza) + _U32.size
    if fixed > MAX_PAYLOAD_BYTES:
        raise FrameError(f"stanza of {len(stanza)} bytes does not fit in a frame")
    payloads: list[bytes] = []
    batch: list[str] = []
    size = fixed
    for jid in recipients:
        cost = _U16.size + len(jid.encode("utf-8"))
        if batch and size + cost > MAX_PAYLOAD_BYTES:
            payloads.append(encode_fanout(stanza, batch))
            batch, size = [], fixed
        batch.append(jid)
        size += cost
    payloads.append(encode_fanout(stanza, batch))
    return payloads


def decode_fanout(payload: bytes) -> tuple[bytes, list[str]]:
    r = _Reader(payload)
    stanza = r.blob(_U32)
    (count,) = r._take(_U32)
    recipients = [r.jid() for _ in range(count)]
    r.end()
    return stanza, recipients


def encode_shard_dead(shard: int) -> bytes:
    return _U16.pack(shard)


def decode_shard_dead(payload: bytes) -> int:
    r = _Reader(payload)
    shard = r.u16()
    r.end()
    return shard


def encode_stats(counters: dict[str, int]) -> bytes:
    """Named non-negative counters (u64 each)."""
    parts = [_U16.pack(len(counters))]
    for name, value in counters.items():
        parts.append(_jid(name))
        parts.append(_U64.pack(value))
    return b"".join(parts)


def decode_stats(payload: bytes) -> dict[str, int]:
    r = _Reader(payload)
    counters = {}
    for _ in range(r.u16()):
        name = r.jid()
        counters[name] = r.u64()
    r.end()
    return counters


def encode_kick(jid: str, session_id: int, condition: str) -> bytes:
    return _jid(jid) + _U64.pack(session_id) + _jid(condition)


def decode_kick(payload: bytes) -> tuple[str, int, str]:
    r = _Reader(payload)
    jid, sid, condition = r.jid(), r.u64(), r.jid()
    r.end()
    return jid, sid, condition


def encode_invalidate(user: str, what: str) -> bytes:
    """`what` names the cache (as registered with the cluster)."""
    return _jid(user) + _jid(what)


def decode_invalidate(payload: bytes) -> tuple[str, str]:
    r = _Reader(payload)
    user, what = r.jid(), r.jid()
    r.end()
    return user, what


def encode_module(channel: str, data: bytes) -> bytes:
    """A module's message: its channel ("<module>/<name>") and payload."""
    return _jid(channel) + _stanza(data)


def decode_module(payload: bytes) -> tuple[str, bytes]:
    r = _Reader(payload)
    channel, data = r.jid(), r.blob(_U32)
    r.end()
    return channel, data
