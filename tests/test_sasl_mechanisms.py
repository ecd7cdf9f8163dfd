"""Server-side SASL mechanisms: RFC test vectors, failure paths, slixmpp round trips.

Why: these state machines decide who gets in. The RFC vectors pin the
arithmetic; the failure cases pin the channel-binding and parsing rules; the
slixmpp round trips show a real client library agrees with us.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from mlink.sasl.mechanisms import (
    MECHANISM_NAMES,
    Challenge,
    ChannelBinding,
    Failure,
    NeedPassword,
    NeedSecret,
    PlainMechanism,
    SaslStateError,
    ScramMechanism,
    Success,
    authzid_allowed,
    available_mechanisms,
    create_mechanism,
)
from mlink.sasl.secrets import ScramSecret, derive_secret

RFC5802 = {
    "mechanism": "SCRAM-SHA-1",
    "salt": "QSXCR+Q6sek8bf92",
    "server_nonce": "3rfcNHYJY1ZVvWVs7j",
    "client_first": b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
    "server_first": b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
    "client_final": (
        b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
    ),
    "server_final": b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
}
RFC7677 = {
    "mechanism": "SCRAM-SHA-256",
    "salt": "W22ZaJ0SNY7soEsUEjb6gQ==",
    "server_nonce": "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
    "client_first": b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
    "server_first": (
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    ),
    "client_final": (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    ),
    "server_final": b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
}


def _secret(vector: dict[str, Any], password: str = "pencil") -> ScramSecret:
    return derive_secret(vector["mechanism"], password, base64.b64decode(vector["salt"]), 4096)


def _vector_mech(vector: dict[str, Any], **kwargs: Any) -> ScramMechanism:
    nonce = vector["server_nonce"]
    return ScramMechanism(vector["mechanism"], nonce_source=lambda: nonce, **kwargs)


# -- RFC vectors -----------------------------------------------------------


@pytest.mark.parametrize("vector", [RFC5802, RFC7677], ids=["rfc5802", "rfc7677"])
def test_rfc_vector(vector: dict[str, Any]) -> None:
    mech = _vector_mech(vector)
    assert mech.receive(vector["client_first"]) == NeedSecret("user", None, vector["mechanism"])
    assert mech.provide_secret(_secret(vector)) == Challenge(vector["server_first"])
    assert mech.receive(vector["client_final"]) == Success(vector["server_final"], "user", None)


@pytest.mark.parametrize("vector", [RFC5802, RFC7677], ids=["rfc5802", "rfc7677"])
def test_rfc_vector_without_initial_response(vector: dict[str, Any]) -> None:
    mech = _vector_mech(vector)
    assert mech.receive(None) == Challenge(b"")
    assert isinstance(mech.receive(vector["client_first"]), NeedSecret)


def test_empty_initial_response_gets_empty_challenge_once() -> None:
    mech = _vector_mech(RFC5802)
    assert mech.receive(b"") == Challenge(b"")
    assert mech.receive(b"") == Failure("malformed-request", "missing GS2 header")


@pytest.mark.parametrize("vector", [RFC5802, RFC7677], ids=["rfc5802", "rfc7677"])
def test_wrong_password_is_not_authorized(vector: dict[str, Any]) -> None:
    mech = _vector_mech(vector)
    mech.receive(vector["client_first"])
    mech.provide_secret(_secret(vector, "pencil2"))
    assert mech.receive(vector["client_final"]) == Failure("not-authorized")


def test_unknown_user_fails_only_after_client_final() -> None:
    mech = _vector_mech(RFC5802)
    mech.receive(RFC5802["client_first"])
    challenge = mech.provide_secret(None)
    assert isinstance(challenge, Challenge)
    assert challenge.data.startswith(b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=")
    assert challenge.data.endswith(b",i=4096")
    assert mech.receive(RFC5802["client_final"]) == Failure("not-authorized")


def test_unknown_user_salt_is_stable() -> None:
    """Two probes for the same missing user must see the same salt."""
    salts = []
    for _ in range(2):
        mech = _vector_mech(RFC5802)
        mech.receive(RFC5802["client_first"])
        salts.append(mech.provide_secret(None))
    assert salts[0] == salts[1]


def test_secret_for_wrong_hash_is_a_caller_bug() -> None:
    mech = _vector_mech(RFC5802)
    mech.receive(RFC5802["client_first"])
    with pytest.raises(ValueError):
        mech.provide_secret(_secret(RFC7677))


def test_out_of_order_calls_raise() -> None:
    mech = _vector_mech(RFC5802)
    with pytest.raises(SaslStateError):
        mech.provide_secret(None)
    mech.receive(RFC5802["client_first"])
    with pytest.raises(SaslStateError):
        mech.receive(RFC5802["client_final"])


def test_default_nonce_is_long_and_printable() -> None:
    mech = ScramMechanism("SCRAM-SHA-256")
    mech.receive(b"n,,n=user,r=abc")
    challenge = mech.provide_secret(_secret(RFC7677))
    assert isinstance(challenge, Challenge)
    nonce = challenge.data.split(b",")[0][2:]
    assert nonce.startswith(b"abc") and len(nonce) >= 3 + 24
    base64.b64decode(nonce[3:], validate=True)


# -- SCRAM parsing ---------------------------------------------------------


def _final(vector: dict[str, Any], **replace: bytes) -> bytes:
    parts = dict(part.split(b"=", 1) for part in vector["client_final"].split(b","))
    for key, value in replace.items():
        parts[key.encode()] = value
    return b",".join(k + b"=" + v for k, v in parts.items())


def _run_to_final(client_first: bytes, client_final: bytes, **kwargs: Any) -> object:
    mech = _vector_mech(RFC5802, **kwargs)
    event = mech.receive(client_first)
    if not isinstance(event, NeedSecret):
        return event
    mech.provide_secret(_secret(RFC5802))
    return mech.receive(client_final)


@pytest.mark.parametrize(
    "client_first",
    [
        b"n,n=user,r=abc",  # gs2 header lacks the authzid slot
        b"x,,n=user,r=abc",  # unknown cb flag
        b"n,b=x,n=user,r=abc",  # authzid field without a=
        b"n,,r=abc,n=user",  # attributes out of order
        b"n,,n=user",  # no nonce
        b"n,,n=,r=abc",  # empty user name
        b"n,,n=us=2Ber,r=abc",  # bad saslname escape
        b"n,,n=user=,r=abc",  # dangling '='
        b"n,,m=ext,n=user,r=abc",  # reserved mandatory extension
        b"n,,n=user,r=abc,m=ext",  # m= is never an optional extension either
        b"n,,n=user,r=abc,1=x",  # extension name not ALPHA
        b"n,,n=user,r=a\x7fc",  # nonce not printable
        b"n,,n=\xff,r=abc",  # not UTF-8
        b"n,,n=a\x07b,r=abc",  # SASLprep failure
        b"p=tls exporter,,n=user,r=abc",  # bad cb-name syntax
        b"n,,n=user,r=" + b"a" * 5000,  # over MAX_SCRAM_MESSAGE
    ],
)
def test_malformed_client_first(client_first: bytes) -> None:
    event = _vector_mech(RFC5802).receive(client_first)
    assert isinstance(event, Failure) and event.condition == "malformed-request"


def test_saslname_escapes_and_authzid() -> None:
    mech = _vector_mech(RFC5802)
    event = mech.receive(b"n,a=ad=2Cmin=3D,n=us=3Der=2C,r=abc")
    assert event == NeedSecret("us=er,", "ad,min=", "SCRAM-SHA-1")


def test_username_is_saslprepped() -> None:
    event = _vector_mech(RFC5802).receive("n,,n=\u2168\u00ad,r=abc".encode())
    assert event == NeedSecret("IX", None, "SCRAM-SHA-1")


def test_optional_extensions_are_ignored() -> None:
    mech = _vector_mech(RFC5802)
    first = RFC5802["client_first"] + b",x=ignored"
    assert isinstance(mech.receive(first), NeedSecret)


@pytest.mark.parametrize(
    ("client_final", "condition"),
    [
        (_final(RFC5802, c=b"eSws"), "not-authorized"),  # c= says "y,,"
        (_final(RFC5802, c=b"biws="), "malformed-request"),  # bad base64
        (_final(RFC5802, r=b"fyko+d2lbbFgONRv9qkxdawL"), "not-authorized"),  # nonce cut
        (_final(RFC5802, p=b"AAAA"), "malformed-request"),  # short proof
        (_final(RFC5802, p=base64.b64encode(b"\0" * 20)), "not-authorized"),  # bad proof
        (b"r=x,c=biws,p=AAAA", "malformed-request"),  # order
        (b"c=biws,r=x", "malformed-request"),  # no proof
        (
            b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,m=x,p=AAAA",
            "malformed-request",
        ),
    ],
)
def test_bad_client_final(client_final: bytes, condition: str) -> None:
    event = _run_to_final(RFC5802["client_first"], client_final)
    assert isinstance(event, Failure) and event.condition == condition


def test_client_final_extension_is_part_of_auth_message() -> None:
    """An extension changes AuthMessage, so the RFC proof no longer matches."""
    final = RFC5802["client_final"].replace(b",p=", b",x=1,p=")
    assert _run_to_final(RFC5802["client_first"], final) == Failure("not-authorized")


def test_messages_after_completion_fail() -> None:
    mech = _vector_mech(RFC5802)
    mech.receive(RFC5802["client_first"])
    mech.provide_secret(_secret(RFC5802))
    assert isinstance(mech.receive(RFC5802["client_final"]), Success)
    assert mech.receive(b"more") == Failure("malformed-request", "authentication already finished")


# -- channel binding -------------------------------------------------------

CB = ChannelBinding({"tls-exporter": b"\x01" * 32, "tls-server-end-point": b"\x02" * 32})


def _plus_exchange(cb_type: str, cb_data: bytes, mech_cb: ChannelBinding = CB) -> object:
    gs2 = f"p={cb_type},,".encode()
    first = gs2 + b"n=user,r=fyko+d2lbbFgONRv9qkxdawL"
    nonce = b"fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j"
    mech = _vector_mech(RFC5802, plus=True, channel_binding=mech_cb, cb_offered=True)
    event = mech.receive(first)
    if not isinstance(event, NeedSecret):
        return event
    challenge = mech.provide_secret(_secret(RFC5802))
    assert isinstance(challenge, Challenge)
    proof = _client_proof(first, challenge.data, gs2 + cb_data, nonce)
    return mech.receive(proof)


def _client_proof(first: bytes, server_first: bytes, cb_input: bytes, nonce: bytes) -> bytes:
    """Minimal SCRAM-SHA-1 client (RFC 5802 §3), independent of the server code."""
    import hashlib
    import hmac

    without_proof = b"c=" + base64.b64encode(cb_input) + b",r=" + nonce
    salted = hashlib.pbkdf2_hmac("sha1", b"pencil", base64.b64decode(RFC5802["salt"]), 4096)
    client_key = hmac.digest(salted, b"Client Key", "sha1")
    stored = hashlib.sha1(client_key).digest()
    auth = first.split(b",", 2)[2] + b"," + server_first + b"," + without_proof
    signature = hmac.digest(stored, auth, "sha1")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return without_proof + b",p=" + base64.b64encode(proof)


@pytest.mark.parametrize("cb_type", ["tls-exporter", "tls-server-end-point"])
def test_plus_with_matching_binding_succeeds(cb_type: str) -> None:
    event = _plus_exchange(cb_type, CB.types[cb_type])
    assert isinstance(event, Success) and event.username == "user"


def test_plus_with_wrong_binding_data_fails() -> None:
    assert _plus_exchange("tls-exporter", b"\x03" * 32) == Failure(
        "not-authorized", "channel binding mismatch"
    )


def test_plus_with_unavailable_type_fails() -> None:
    event = _plus_exchange("tls-unique", b"")
    assert isinstance(event, Failure) and event.condition == "not-authorized"


@pytest.mark.parametrize("flag", [b"n", b"y"])
def test_plus_without_binding_fails(flag: bytes) -> None:
    mech = _vector_mech(RFC5802, plus=True, channel_binding=CB, cb_offered=True)
    event = mech.receive(flag + b",,n=user,r=abc")
    assert isinstance(event, Failure) and event.condition == "malformed-request"


def test_binding_on_non_plus_mechanism_fails() -> None:
    mech = _vector_mech(RFC5802, channel_binding=CB, cb_offered=True)
    event = mech.receive(b"p=tls-exporter,,n=user,r=abc")
    assert isinstance(event, Failure) and event.condition == "malformed-request"


def test_y_flag_after_offering_plus_is_a_downgrade() -> None:
    mech = _vector_mech(RFC5802, channel_binding=CB, cb_offered=True)
    assert mech.receive(b"y,,n=user,r=abc") == Failure(
        "not-authorized", "channel binding downgrade detected"
    )


def test_y_flag_without_plus_offer_is_fine() -> None:
    """'y' with c=eSws (base64 "y,,") works when no -PLUS was advertised."""
    first = b"y,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
    nonce = b"fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j"
    mech = _vector_mech(RFC5802, cb_offered=False)
    assert isinstance(mech.receive(first), NeedSecret)
    challenge = mech.provide_secret(_secret(RFC5802))
    assert isinstance(challenge, Challenge)
    event = mech.receive(_client_proof(first, challenge.data, b"y,,", nonce))
    assert isinstance(event, Success)


def test_c_must_repeat_the_gs2_header_exactly() -> None:
    """Client says 'n' then claims 'y' in c=: the binding check must catch it."""
    first = b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
    nonce = b"fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j"
    mech = _vector_mech(RFC5802)
    mech.receive(first)
    challenge = mech.provide_secret(_secret(RFC5802))
    assert isinstance(challenge, Challenge)
    event = mech.receive(_client_proof(first, challenge.data, b"y,,", nonce))
    assert event == Failure("not-authorized", "channel binding mismatch")


def test_plus_mechanism_requires_binding_data() -> None:
    with pytest.raises(ValueError):
        ScramMechanism("SCRAM-SHA-256", plus=True, channel_binding=None)


# -- PLAIN -----------------------------------------------------------------


def test_plain_success() -> None:
    mech = PlainMechanism()
    event = mech.receive(b"\x00juliet\x00r0m30myr0m30")
    assert event == NeedPassword("juliet", "r0m30myr0m30", None)
    assert "r0m30" not in repr(event)
    assert mech.password_result(True) == Success(None, "juliet", None)


def test_plain_wrong_password() -> None:
    mech = PlainMechanism()
    mech.receive(b"\x00juliet\x00bad")
    assert mech.password_result(False) == Failure("not-authorized")


def test_plain_authzid_is_reported() -> None:
    event = PlainMechanism().receive(b"juliet@example.org\x00juliet\x00pw")
    assert event == NeedPassword("juliet", "pw", "juliet@example.org")


def test_plain_saslprep_applies_to_authcid_and_password() -> None:
    event = PlainMechanism().receive("\x00\u2168\x00I\u00adX\u00a0".encode())
    assert event == NeedPassword("IX", "IX ", None)


def test_plain_without_initial_response() -> None:
    mech = PlainMechanism()
    assert mech.receive(None) == Challenge(b"")
    assert isinstance(mech.receive(b"\x00a\x00b"), NeedPassword)


@pytest.mark.parametrize(
    "data",
    [
        b"juliet\x00pw",  # one NUL
        b"\x00juliet\x00pw\x00",  # three NULs
        b"\x00\x00pw",  # empty authcid
        b"\x00juliet\x00",  # empty password
        b"\x00jul\xffiet\x00pw",  # not UTF-8
        b"\x00jul\x07iet\x00pw",  # SASLprep: control character
        b"\x00juliet\x00" + b"p" * 5000,  # over MAX_PLAIN_MESSAGE
    ],
)
def test_plain_malformed(data: bytes) -> None:
    event = PlainMechanism().receive(data)
    assert isinstance(event, Failure) and event.condition == "malformed-request"


def test_plain_empty_response_after_empty_challenge() -> None:
    mech = PlainMechanism()
    mech.receive(b"")
    event = mech.receive(b"")
    assert isinstance(event, Failure) and event.condition == "malformed-request"


def test_plain_state_errors() -> None:
    mech = PlainMechanism()
    with pytest.raises(SaslStateError):
        mech.password_result(True)
    mech.receive(b"\x00a\x00b")
    with pytest.raises(SaslStateError):
        mech.receive(b"\x00a\x00b")


@pytest.mark.parametrize(
    ("authzid", "allowed"),
    [
        (None, True),
        ("", True),
        ("juliet@example.org", True),
        ("Juliet@Example.ORG", True),
        ("juliet@example.org.", True),
        ("romeo@example.org", False),
        ("juliet@example.net", False),
        ("juliet@example.org/balcony", False),
        ("example.org", False),
        ("juliet", False),
    ],
)
def test_authzid_allowed(authzid: str | None, allowed: bool) -> None:
    assert authzid_allowed(authzid, "juliet", "example.org") is allowed


# -- advertising and factory -----------------------------------------------


def test_available_mechanisms() -> None:
    assert available_mechanisms(True, {"tls-exporter"}, True) == list(MECHANISM_NAMES)
    assert available_mechanisms(True, set(), True) == ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]
    assert available_mechanisms(False, {"tls-exporter"}, False) == [
        "SCRAM-SHA-256",
        "SCRAM-SHA-1",
    ]
    assert available_mechanisms(True, {"tls-bogus"}, False) == ["SCRAM-SHA-256", "SCRAM-SHA-1"]
    assert "DIGEST-MD5" not in MECHANISM_NAMES


def test_create_mechanism() -> None:
    assert isinstance(create_mechanism("PLAIN", None, False), PlainMechanism)
    mech = create_mechanism("SCRAM-SHA-256-PLUS", CB, True)
    assert isinstance(mech, ScramMechanism) and mech.plus and mech.name == "SCRAM-SHA-256-PLUS"
    mech = create_mechanism("SCRAM-SHA-1", CB, True)
    assert isinstance(mech, ScramMechanism) and not mech.plus
    assert create_mechanism("SCRAM-SHA-1-PLUS", None, False) is None
    assert create_mechanism("SCRAM-SHA-1-PLUS", ChannelBinding(), False) is None
    assert create_mechanism("DIGEST-MD5", None, False) is None
    assert create_mechanism("scram-sha-1", None, False) is None


def test_failure_rejects_unknown_condition() -> None:
    with pytest.raises(ValueError):
        Failure("no-such-condition")


# -- slixmpp's client against our server -----------------------------------


def _slixmpp_client(mechs: list[str], *, cb: bytes | None, tls_version: str, proposed: bool) -> Any:
    """slixmpp's own mechanism chooser and client-side SCRAM, with fixed settings."""
    sasl = pytest.importorskip("slixmpp.util.sasl")

    def credentials(required: object, optional: object) -> dict[str, Any]:
        return {"username": "juliet", "password": "s3cr\u00e9t", "channel_binding": cb}

    def security(values: object) -> dict[str, Any]:
        return {
            "encrypted": True,
            "unencrypted_scram": False,
            "tls_version": tls_version,
            "binding_proposed": proposed,
        }

    return sasl.choose(mechs, credentials, security)


def _round_trip(client: Any, cb: ChannelBinding | None, cb_offered: bool) -> object:
    mech = create_mechanism(client.name, cb, cb_offered)
    assert isinstance(mech, ScramMechanism)
    event = mech.receive(client.process(b""))
    assert isinstance(event, NeedSecret) and event.username == "juliet"
    secret = derive_secret(mech.base_mechanism, "s3cr\u00e9t")
    challenge = mech.provide_secret(secret)
    assert isinstance(challenge, Challenge)
    event = mech.receive(client.process(challenge.data))
    if isinstance(event, Success):
        client.process(event.additional_data)  # verifies v=, raises on mismatch
    return event


@pytest.mark.parametrize("name", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
def test_slixmpp_round_trip_without_binding(name: str) -> None:
    client = _slixmpp_client([name], cb=None, tls_version="TLSv1.3", proposed=False)
    assert client.name == name
    event = _round_trip(client, None, cb_offered=False)
    assert isinstance(event, Success) and event.username == "juliet"


def test_slixmpp_picks_strongest_and_binds_with_tls_exporter() -> None:
    binding = ChannelBinding({"tls-exporter": b"\x05" * 32})
    offered = available_mechanisms(True, binding.supported(), True)
    client = _slixmpp_client(offered, cb=b"\x05" * 32, tls_version="TLSv1.3", proposed=True)
    assert client.name == "SCRAM-SHA-256-PLUS"
    assert isinstance(_round_trip(client, binding, cb_offered=True), Success)


def test_slixmpp_binds_with_tls_unique_below_tls13() -> None:
    binding = ChannelBinding({"tls-unique": b"\x06" * 12})
    client = _slixmpp_client(
        ["SCRAM-SHA-256-PLUS"], cb=b"\x06" * 12, tls_version="TLSv1.2", proposed=True
    )
    assert isinstance(_round_trip(client, binding, cb_offered=True), Success)


def test_slixmpp_without_binding_data_falls_back_with_n_flag() -> None:
    """Python 3.11 has no tls-exporter, so slixmpp on TLS 1.3 skips -PLUS and
    sends 'n' (binding_proposed is true), which we must accept."""
    binding = ChannelBinding({"tls-exporter": b"\x05" * 32})
    offered = available_mechanisms(True, binding.supported(), True)
    client = _slixmpp_client(offered, cb=None, tls_version="TLSv1.3", proposed=True)
    assert client.name == "SCRAM-SHA-256"
    assert isinstance(_round_trip(client, binding, cb_offered=True), Success)
