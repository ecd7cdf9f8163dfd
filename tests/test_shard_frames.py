"""The bus frame format: round trips, and malformed input refused."""

from __future__ import annotations

import struct

import pytest

from mlink.shard import frames as f
from mlink.shard.frames import (
    FLAG_MORE,
    FRAME_VERSION,
    MAX_FRAME_BYTES,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    SessionEntry,
    encode_frame,
)

STANZA = b"<message to='bob@localhost/phone' type='chat'><body>h\xc3\xa9</body></message>"


def test_frame_round_trip_byte_by_byte_and_in_one_piece():
    wire = b"".join([
        encode_frame(FrameType.STANZA, 3, b"abc"),
        encode_frame(FrameType.TABLE_REQUEST, 65535),
        encode_frame(FrameType.TABLE_SNAPSHOT, 0, b"x" * 1000, FLAG_MORE),
    ])
    expected = [
        Frame(FrameType.STANZA, b"abc", 0, 3),
        Frame(FrameType.TABLE_REQUEST, b"", 0, 65535),
        Frame(FrameType.TABLE_SNAPSHOT, b"x" * 1000, FLAG_MORE, 0),
    ]
    assert FrameDecoder().receive_data(wire) == expected
    decoder = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(wire)):
        got += decoder.receive_data(wire[i : i + 1])
    assert got == expected and decoder.buffered == 0


def test_header_layout_is_length_version_type_source_flags():
    wire = encode_frame(FrameType.FANOUT, 7, b"pay", 0x0102)
    assert wire == struct.pack(">IBBHH", 6 + 3, FRAME_VERSION, 7, 7, 0x0102) + b"pay"


def test_oversized_frames_are_refused_before_they_are_buffered():
    decoder = FrameDecoder()
    with pytest.raises(FrameError, match="exceeds"):
        decoder.receive_data(struct.pack(">I", MAX_FRAME_BYTES + 1))
    with pytest.raises(FrameError, match="exceeds"):
        encode_frame(FrameType.STANZA, 0, b"x" * MAX_FRAME_BYTES)
    # The largest allowed frame passes.
    big = encode_frame(FrameType.STANZA, 0, b"x" * (MAX_FRAME_BYTES - 6))
    assert FrameDecoder().receive_data(big)[0].payload == b"x" * (MAX_FRAME_BYTES - 6)


@pytest.mark.parametrize(("wire", "message"), [
    (struct.pack(">IBBHH", 6, FRAME_VERSION + 1, 6, 0, 0), "version"),
    (struct.pack(">IBBHH", 6, FRAME_VERSION, 200, 0, 0), "unknown frame type"),
    (struct.pack(">I", 3) + b"abc", "shorter than its header"),
])
def test_malformed_headers_raise(wire, message):
    with pytest.raises(FrameError, match=message):
        FrameDecoder().receive_data(wire)


def test_session_payloads_round_trip():
    entry = SessionEntry("alice@localhost/laptöp", 2**63 + 5, -1, True, STANZA)
    assert f.decode_session_up(f.encode_session_up(entry)) == entry
    assert f.decode_session_down(f.encode_session_down("a@b/c", 42)) == ("a@b/c", 42)
    with pytest.raises(FrameError, match="priority"):
        f.encode_session_up(SessionEntry("a@b/c", 1, 128))


def test_table_snapshot_chunks_under_the_frame_limit():
    presence = b"p" * 100_000
    entries = [SessionEntry(f"user{i}@localhost/r", i, 0, True, presence) for i in range(100)]
    chunks = f.encode_table_snapshots(entries)
    assert len(chunks) > 1
    assert [flags for _, flags in chunks] == [FLAG_MORE] * (len(chunks) - 1) + [0]
    decoded = [e for payload, _ in chunks for e in f.decode_table_snapshot(payload)]
    assert decoded == entries
    for payload, flags in chunks:
        encode_frame(FrameType.TABLE_SNAPSHOT, 1, payload, flags)  # fits
    assert f.encode_table_snapshots([]) == [(b"", 0)]


def test_stanza_and_fanout_round_trip():
    assert f.decode_stanza(f.encode_stanza("bob@localhost", STANZA)) == ("bob@localhost", STANZA)
    recipients = [f"user{i}@localhost/res{i}" for i in range(500)]
    payloads = f.encode_fanouts(STANZA, recipients)
    assert len(payloads) == 1
    assert f.decode_fanout(payloads[0]) == (STANZA, recipients)


def test_a_huge_fanout_is_split_into_frames_that_fit():
    recipients = [f"{'u' * 1000}{i}@localhost/r" for i in range(10_000)]
    payloads = f.encode_fanouts(b"<presence/>", recipients)
    assert len(payloads) > 1
    got = []
    for payload in payloads:
        encode_frame(FrameType.FANOUT, 0, payload)
        stanza, part = f.decode_fanout(payload)
        assert stanza == b"<presence/>"
        got += part
    assert got == recipients


def test_other_payloads_round_trip():
    assert f.decode_hello(f.encode_hello(12)) == 12
    assert f.decode_shard_dead(f.encode_shard_dead(3)) == 3
    counters = {"sessions": 10, "frames_out": 2**40}
    assert f.decode_stats(f.encode_stats(counters)) == counters


@pytest.mark.parametrize("decode, payload", [
    (f.decode_stanza, f.encode_stanza("a@b", STANZA)[:-1]),
    (f.decode_stanza, f.encode_stanza("a@b", STANZA) + b"\0"),
    (f.decode_stanza, b"\x00\x02\xff\xfe\x00\x00\x00\x00"),
    (f.decode_fanout, f.encode_fanout(STANZA, ["a@b"])[:-2]),
    # An empty stanza claiming four billion recipients and carrying none.
    (f.decode_fanout, b"\x00\x00\x00\x00\xff\xff\xff\xff"),
    (f.decode_session_up, b"\x00"),
    (f.decode_session_down, f.encode_session_down("a@b/c", 1)[:-1]),
    (f.decode_table_snapshot, f.encode_session_up(SessionEntry("a@b/c", 1))[:-1]),
    (f.decode_hello, b""),
    (f.decode_stats, b"\x00\x01\x00\x01a"),
])
def test_malformed_payloads_raise_frame_error(decode, payload):
    with pytest.raises(FrameError):
        decode(payload)


def test_overlong_jid_is_refused():
    with pytest.raises(FrameError, match="JID"):
        f.encode_stanza("a" * (f.MAX_JID_BYTES + 1), b"")
