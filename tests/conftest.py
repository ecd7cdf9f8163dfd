"""Shared fixtures: a private slapd, trustme certificates, a running mlink."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.serverproc import ALICE, ALICE_PW, BOB, BOB_PW, DOMAIN, MlinkProcess, start_mlink

pytest_plugins = ["tests.ldap_fixtures"]


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def cert_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate for `localhost` and `example.com`, issued by the test CA."""
    cert = ca.issue_cert("localhost", "example.com", "127.0.0.1")
    d = tmp_path_factory.mktemp("certs")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_path), append=True)
    return cert_path, key_path


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="module")
def embedded_server(
    tmp_path_factory: pytest.TempPathFactory, cert_files: tuple[Path, Path]
) -> Iterator[MlinkProcess]:
    """`mlink init` + `mlink user add` + `mlink serve` on the embedded directory."""
    setup = tmp_path_factory.mktemp("mlink")
    with start_mlink(setup, DOMAIN, cert_files, users={ALICE: ALICE_PW, BOB: BOB_PW}) as server:
        yield server
