"""Findings of the fuzz targets (tests/fuzz, issue 12), one test each.

Why here and fast: `tools/fuzz` runs for minutes; these replay what it found
in milliseconds on every test run. Each named test states the finding as a
protocol scenario, written so that it failed before the fix; the replay
tests below feed every seed and every saved crash input through its target.
"""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mlink.stream import c2s, component
from tests.fuzz.harness import TARGETS, TCP_HEADER, drive_component

FUZZ_DIR = Path(__file__).parent / "fuzz"
STREAMS_NS = "urn:ietf:params:xml:ns:xmpp-streams"


def _inputs(kind: str) -> list[tuple[str, Path]]:
    """(target, file) for every input saved under tests/fuzz/<kind>/."""
    return [(d.name, f) for d in sorted((FUZZ_DIR / kind).iterdir()) if d.is_dir()
            for f in sorted(d.iterdir())]


def _stream() -> c2s.C2SStream:
    stream = c2s.C2SStream(c2s.StreamSettings(
        domains=frozenset({"example.com"}), tls_available=True, tls_required=True,
        tls_active=True))
    assert stream.receive_data(TCP_HEADER) == []
    stream.data_to_send()
    return stream


@pytest.mark.parametrize("target, path", _inputs("corpus"), ids=lambda v: getattr(v, "name", v))
def test_seed_corpus_passes_its_target(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("target, path", _inputs("crashes"), ids=lambda v: getattr(v, "name", v))
def test_saved_crash_passes_its_target(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


def test_peer_stream_error_is_answered_with_our_closing_tag() -> None:
    """c2s finding: a client that reports a stream error and closes its
    stream got no closing tag back (RFC 6120 §4.4: the receiver of a
    closing tag sends its own), so the connection ended half-closed."""
    stream = _stream()
    events = stream.receive_data(
        f"<stream:error><conflict xmlns='{STREAMS_NS}'/></stream:error>"
        "</stream:stream>".encode())
    assert events == [c2s.StreamEnded(None, peer_closed=True)]
    assert stream.data_to_send() == b"</stream:stream>"


def test_pipelined_auth_and_close_then_a_late_answer() -> None:
    """Issue 12 finding 5, kept by the c2s target's seeds: <auth/> and the
    stream close in one packet. The machine closes at once with its closing
    tag; the credential answer that arrives afterwards is dropped, not an
    error, and sends nothing (no <success/> after the closing tag)."""
    stream = _stream()
    events = stream.receive_data(
        b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
        b"AGFsaWNlAHBlbmNpbA==</auth></stream:stream>")
    assert [type(ev) for ev in events] == [c2s.CredentialRequested, c2s.StreamEnded]
    assert events[1] == c2s.StreamEnded(None, peer_closed=True)
    assert stream.data_to_send() == b"</stream:stream>"
    assert stream.credential_provided(True) == []
    assert stream.data_to_send() == b""


@pytest.mark.parametrize("client_first", [b"n,,x", b"n,,n=alice"])
def test_sasl_failure_text_is_escaped(client_first: bytes) -> None:
    """c2s finding (WebSocket target: a message that does not parse): a SCRAM
    failure's text, "expected n=<user>,r=<nonce>", went out with its `<` and
    `>` unescaped, so the <failure/> was not well-formed XML and a client's
    parser ended the stream instead of reading the SASL failure."""
    stream = _stream()
    token = base64.b64encode(client_first).decode()
    events = stream.receive_data(
        f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>{token}</auth>"
        .encode())
    assert events == [c2s.AuthFailed(None, "malformed-request", "SCRAM-SHA-1")]
    failure = ET.fromstring(stream.data_to_send())
    assert failure.tag == "{urn:ietf:params:xml:ns:xmpp-sasl}failure"
    assert failure.findtext("{urn:ietf:params:xml:ns:xmpp-sasl}text") == \
        "expected n=<user>,r=<nonce>"


# What each component seed must reach: (accepted, stanzas handed on, ending
# condition, or "open" when the stream is still up). Keeps the corpus honest:
# a seed that silently stopped reaching the established state would leave
# the fuzzer exploring only the failure paths.
COMPONENT_SEEDS: dict[str, tuple[bool, int, str | None]] = {
    "good-handshake-stanzas": (True, 4, None),
    "good-handshake-stanzas-rechunked": (True, 4, None),
    "good-handshake-misuse": (True, 4, None),
    "good-handshake-upper-case": (True, 1, "open"),
    "own-header-good": (True, 1, "open"),
    "good-handshake-deferred": (True, 1, "open"),
    "good-handshake-deferred-pipelined": (False, 0, "not-authorized"),
    "good-handshake-pipelined": (False, 0, "not-authorized"),
    "good-handshake-conflict": (False, 0, "conflict"),
    "good-handshake-server-close": (True, 1, None),
    "good-handshake-shutdown": (True, 1, "system-shutdown"),
    "bad-proof": (False, 0, "not-authorized"),
    "short-proof": (False, 0, "not-authorized"),
    "empty-handshake": (False, 0, "not-authorized"),
    "stanza-before-handshake": (False, 0, "not-authorized"),
    "unknown-domain": (False, 0, "host-unknown"),
    "no-to": (False, 0, "improper-addressing"),
    "client-namespace-header": (False, 0, "invalid-namespace"),
    "client-namespace-stanza": (True, 0, "invalid-namespace"),
    "unknown-element": (True, 0, "invalid-namespace"),
    "foreign-from": (True, 0, "invalid-from"),
    "second-header": (True, 0, "restricted-xml"),
    "garbage": (False, 0, "not-well-formed"),
    "garbage-before-header": (False, 0, "not-well-formed"),
    "over-deep": (True, 0, "policy-violation"),
    "peer-stream-error": (False, 0, None),
}


def test_component_seeds_are_all_listed() -> None:
    names = {f.name for f in (FUZZ_DIR / "corpus" / "component").iterdir()}
    assert names == set(COMPONENT_SEEDS)


@pytest.mark.parametrize("name", sorted(COMPONENT_SEEDS))
def test_component_seed_reaches_its_state(name: str) -> None:
    accepted, stanzas, ending = COMPONENT_SEEDS[name]
    driver = drive_component((FUZZ_DIR / "corpus" / "component" / name).read_bytes())
    assert driver.accepted is accepted
    assert driver.stanzas == stanzas
    if ending == "open":
        assert driver.ending is None
    else:
        assert driver.ending is not None
        assert driver.ending.condition == ending


def test_component_harness_catches_a_forged_verification(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The target can fail: a machine whose digest were wrong (here: it
    verifies the all-zero proof of the bad-proof seed) is caught by the
    harness's own computation of the proof."""
    monkeypatch.setattr(component, "handshake_digest", lambda sid, secret: "0" * 40)
    with pytest.raises(AssertionError, match="<handshake>0{40}<"):
        drive_component((FUZZ_DIR / "corpus" / "component" / "bad-proof").read_bytes())
