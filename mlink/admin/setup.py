"""`mlink init`: make a directory that a standalone server can start from.

One command gives a working setup (configuration, embedded user directory,
certificate) so trying mlink needs neither an LDAP server nor a CA. It never
overwrites: re-running it by mistake on a live setup must not replace the
user directory or the key.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import ipaddress
import os
from pathlib import Path
from typing import Any

from mlink.config import (
    LISTENER_DEFAULT_PORTS,
    MAX_PORT,
    absolute_path,
    base_dn_for_domain,
    load_config,
    normalise_domain,
)
from mlink.config_model import (
    DEFAULT_CONSOLE_PORT,
    AdminConfig,
    Config,
    ConsoleConfig,
    DirectoryConfig,
    EmbeddedConfig,
    ListenerConfig,
    TLSConfig,
)
from mlink.config_render import write_config
from mlink.config_schema import Host, Invalid, ParseEnv

__all__ = [
    "CERT_FILE",
    "CONFIG_FILE",
    "DIRECTORY_FILE",
    "KEY_FILE",
    "SetupError",
    "SetupExists",
    "base_dn_for_domain",
    "generate_self_signed",
    "init_setup",
]

CONFIG_FILE = "mlink.xml"
DIRECTORY_FILE = "directory.ldif"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
# A self-signed certificate is trusted by pinning it, not through a CA, so
# rotation is manual; ten years keeps a test or small private server from
# breaking one day for no visible reason.
CERT_VALIDITY = datetime.timedelta(days=3650)
# Start validity a day early so clients with a slightly slow clock accept a
# certificate made a moment ago.
CERT_BACKDATE = datetime.timedelta(days=1)
# The private key must not be readable by other local users.
KEY_FILE_MODE = 0o600
SETUP_DIR_MODE = 0o700


class SetupError(Exception):
    """`mlink init` cannot proceed; the message is meant for the user."""


class SetupExists(SetupError):
    """The target already holds a setup; refusing protects its users and key."""


def generate_self_signed(domain: str, cert_path: Path, key_path: Path) -> None:
    """Write a self-signed certificate and key for `domain` (PEM).

    ECDSA P-256: every TLS 1.2+ client supports it and it is generated
    instantly. The SAN carries the domain (A-label form, as certificates
    require); for `localhost` the loopback addresses too, so clients that
    connect by IP still match. Both files are created exclusively, and the
    key with mode 0600 from the start, so it is never briefly world-readable.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ascii_domain = normalise_domain(domain).encode("idna").decode("ascii")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ascii_domain)])
    alt_names: list[x509.GeneralName] = [x509.DNSName(ascii_domain)]
    if ascii_domain == "localhost":
        alt_names += [
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CERT_BACKDATE)
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    try:
        fd = os.open(cert_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
    except BaseException:
        key_path.unlink(missing_ok=True)  # no key without its certificate
        raise


def certificate_fingerprint(cert_path: Path) -> str:
    """The SHA-256 fingerprint of the first certificate in `cert_path`,
    as clients show it (colon-separated upper-case hex)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _check_port(name: str, port: int) -> None:
    if not isinstance(port, int) or not 0 <= port <= MAX_PORT:
        raise SetupError(f"{name} must be a port number 0..{MAX_PORT}, not {port!r}")


def init_setup(
    directory: Path,
    domain: str = "localhost",
    c2s_port: int = LISTENER_DEFAULT_PORTS["c2s"],
    tls_port: int = LISTENER_DEFAULT_PORTS["tls"],
    ws_port: int = LISTENER_DEFAULT_PORTS["websocket"],
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    address: str | None = None,
    console_admin: str | None = None,
    console_port: int = DEFAULT_CONSOLE_PORT,
) -> Path:
    """Create a ready standalone setup in `directory`; return the config path.

    Writes `mlink.xml`, an embedded directory `directory.ldif` (base DN from
    the domain) and, unless `tls_cert`/`tls_key` are given, a self-signed
    `cert.pem`/`key.pem`. Raises SetupExists when any of those files is
    already there, SetupError for bad arguments. On failure, files this call
    created are removed so it can simply be run again.

    With `console_admin` (a bare JID of the domain), the web console is
    enabled on loopback (`console_port`) with that user as its administrator.

    Synchronous, for the CLI: it starts its own short Trio run to create
    the directory file, so from async code call it through
    `trio.to_thread.run_sync`.
    """
    directory = Path(directory)
    try:
        domain = normalise_domain(domain)
    except ValueError as exc:
        raise SetupError(f"bad domain: {exc}") from None
    _check_port("c2s port", c2s_port)
    _check_port("tls port", tls_port)
    _check_port("websocket port", ws_port)
    if console_admin is not None:
        _check_port("console port", console_port)
        local, at, admin_domain = console_admin.partition("@")
        if not local or not at or "/" in console_admin or admin_domain.lower() != domain:
            raise SetupError(f"--console-admin must be a user of {domain} (user@{domain}), "
                             f"not {console_admin!r}")
    used = [p for p in (c2s_port, tls_port, ws_port) if p != 0]
    if len(used) != len(set(used)):
        raise SetupError(f"the listeners need distinct ports, got {c2s_port}/{tls_port}/{ws_port}")
    if (tls_cert is None) != (tls_key is None):
        raise SetupError("--tls-cert and --tls-key must be given together")
    if tls_cert is not None and tls_key is not None:
        tls_cert, tls_key = absolute_path(Path(tls_cert)), absolute_path(Path(tls_key))
        for what, path in (("certificate", tls_cert), ("key", tls_key)):
            if not path.is_file():
                raise SetupError(f"TLS {what} {str(path)!r} does not exist")

    config_path = directory / CONFIG_FILE
    directory_path = directory / DIRECTORY_FILE
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    ours = [config_path, directory_path]
    if tls_cert is None:
        ours += [cert_path, key_path]
    existing = [p.name for p in ours if p.exists() or p.is_symlink()]
    if existing:
        raise SetupExists(
            f"{directory} already holds an mlink setup ({', '.join(existing)}); "
            "refusing to overwrite it — choose another directory or remove those files"
        )

    if address is not None:
        try:
            address = Host().parse(address, ParseEnv(Path.cwd(), {}))
        except Invalid as exc:
            raise SetupError(f"--address: {exc}") from None

    created_directory = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if created_directory:
            # Private to the server's user whatever the umask: it holds the
            # key, the directory file with the password hashes, the store.
            directory.chmod(SETUP_DIR_MODE)
    except OSError as exc:
        raise SetupError(f"cannot create {directory}: {exc.strerror}") from None

    created: list[Path] = []
    try:
        if tls_cert is None or tls_key is None:
            generate_self_signed(domain, cert_path, key_path)
            created += [cert_path, key_path]
            tls_cert, tls_key = absolute_path(cert_path), absolute_path(key_path)

        base_dn = base_dn_for_domain(domain)
        _create_directory(directory_path, base_dn, domain)
        created.append(directory_path)

        cfg = Config(
            path=absolute_path(config_path),
            domains=(domain,),
            listeners=tuple(
                dataclasses.replace(listener, address=address) if address else listener
                for listener in (
                    ListenerConfig(kind="c2s", port=c2s_port),
                    ListenerConfig(kind="tls", port=tls_port),
                    ListenerConfig(kind="websocket", port=ws_port),
                    *_wss_listener(ws_port, (c2s_port, tls_port)),
                )),
            tls=TLSConfig(certificate=tls_cert, key=tls_key, required=True),
            directory=DirectoryConfig(
                backend="embedded",
                embedded=EmbeddedConfig(file=absolute_path(directory_path), base_dn=base_dn),
            ),
            data_dir=absolute_path(directory),
            console=ConsoleConfig(
                enabled=True, port=console_port,
                admins=(AdminConfig(jid=console_admin),)) if console_admin else ConsoleConfig(),
        )
        write_config(cfg, config_path)
        created.append(config_path)
        # What we wrote must load; a failure here is a bug, better found now
        # than when the server is first started.
        load_config(config_path)
    except FileExistsError as exc:
        _remove(created)
        raise SetupExists(
            f"{exc.filename} appeared while setting up; refusing to overwrite"
        ) from None
    except BaseException:
        _remove(created)
        raise
    return config_path


def _create_directory(path: Path, base_dn: str, domain: str) -> None:
    """Create the embedded directory file through its own backend, so the
    file has exactly the layout the server will read.

    `EmbeddedDirectory.create` is async (it writes in a worker thread), and
    `init_setup` is called from the synchronous CLI, so it gets its own
    short Trio run here. A file that already exists becomes SetupExists.
    """
    # Imported here: the directory backend is another layer, and the config
    # side of this module should stay importable without it.
    import trio

    from mlink.directory.base import DirectoryError
    from mlink.directory.embedded import EmbeddedDirectory

    async def create() -> None:
        result: Any = EmbeddedDirectory.create(path, base_dn, domain)
        if inspect.isawaitable(result):
            result = await result
        aclose = getattr(result, "aclose", None)
        if aclose is not None:
            await aclose()

    try:
        trio.run(create)
    except DirectoryError as exc:
        if path.exists():
            raise SetupExists(f"{path} already exists; refusing to overwrite it") from None
        raise SetupError(f"cannot create {path}: {exc}") from None


def _remove(paths: list[Path]) -> None:
    for path in reversed(paths):
        try:
            path.unlink()
        except OSError:
            pass


def _wss_listener(ws_port: int, taken: tuple[int, ...]) -> list[ListenerConfig]:
    """WebSocket over HTTPS next to the plain one, as Prosody's 5280/5281:
    the port after `ws_port` (free ports when `ws_port` is 0); none when
    that port is already one of the other listeners'."""
    port = ws_port + 1 if ws_port else 0
    if port and (port in taken or port > 65535):
        return []
    return [ListenerConfig(kind="websocket-tls", port=port)]
