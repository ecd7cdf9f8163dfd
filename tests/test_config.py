"""Configuration file loading, error reporting, writing and `mlink init`."""

from __future__ import annotations

import re
import ssl
import stat
import sys
import time
import types
from pathlib import Path

import pytest

from mlink.admin.setup import SetupError, SetupExists, base_dn_for_domain, init_setup
from mlink.config import ConfigError, load_config, normalise_domain, write_config
from mlink.config_model import (
    Config,
    DirectoryConfig,
    LDAPConfig,
    ListenerConfig,
    TLSConfig,
)

GOOD = """\
<?xml version="1.0"?>
<mlink>
  <domain>Example.COM.</domain>
  <domain>chat.example.org</domain>
  <listen type="c2s" port="5222" address="0.0.0.0"/>
  <listen type="tls" port="5223"/>
  <listen type="websocket" port="5280" address="::1"/>
  <tls certificate="cert.pem" key="sub/key.pem" required="true"/>
  <directory backend="embedded">
    <embedded file="directory.ldif" base="dc=example,dc=com"/>
  </directory>
  <limits stanza-bytes="100000" depth="32" auth-timeout="30.5"/>
  <data dir="state"/>
  <log level="debug"/>
</mlink>
"""

LDAP = """\
<mlink>
  <domain>example.com</domain>
  <listen type="c2s"/>
  <tls required="false"/>
  <directory backend="ldap">
    <ldap base="dc=example,dc=com" bind-dn="cn=mlink,dc=example,dc=com"
          bind-password-file="secret.txt" jid-attribute="uid" pool-size="4" timeout="2.5">
      <server>ldaps://ldap1.example.com</server>
      <server>ldap://ldap2.example.com:389</server>
    </ldap>
  </directory>
</mlink>
"""


@pytest.fixture
def tls_files(tmp_path: Path) -> Path:
    """Placeholder cert/key files: load_config only checks they exist."""
    (tmp_path / "cert.pem").write_text("cert")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "key.pem").write_text("key")
    return tmp_path


def write(tmp_path: Path, text: str, name: str = "mlink.xml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_for(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:")
    return info.value


def test_good_file_loads(tls_files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tls_files, GOOD)
    # Relative paths follow the file, not the working directory.
    monkeypatch.chdir("/")
    cfg = load_config(path)
    base = tls_files
    assert cfg.path == path
    assert cfg.domains == ("example.com", "chat.example.org")
    assert cfg.listeners == (
        ListenerConfig("c2s", 5222, "0.0.0.0"),
        ListenerConfig("tls", 5223, "0.0.0.0"),
        ListenerConfig("websocket", 5280, "::1"),
    )
    assert cfg.tls == TLSConfig(base / "cert.pem", base / "sub" / "key.pem", True)
    assert cfg.directory.backend == "embedded"
    assert cfg.directory.embedded.file == base / "directory.ldif"
    assert cfg.directory.embedded.base_dn == "dc=example,dc=com"
    assert cfg.limits.max_stanza_bytes == 100000
    assert cfg.limits.max_depth == 32
    assert cfg.limits.auth_timeout == 30.5
    assert cfg.data_dir == base / "state"
    assert cfg.log_level == "debug"


def test_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '<mlink><domain>localhost</domain><listen type="tls"/>'
        '<tls certificate="c" key="k"/></mlink>',
    )
    (tmp_path / "c").write_text("")
    (tmp_path / "k").write_text("")
    cfg = load_config(path)
    assert cfg.listeners == (ListenerConfig("tls", 5223, "0.0.0.0"),)
    assert cfg.tls.required is True
    assert cfg.directory.backend == "embedded"
    assert cfg.directory.embedded.base_dn == "dc=localhost"
    assert cfg.directory.embedded.file == tmp_path / "directory.ldif"
    assert cfg.data_dir == tmp_path
    assert cfg.log_level == "info"


def test_ldap_file_loads(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("s3cret\n")
    cfg = load_config(write(tmp_path, LDAP))
    ldap = cfg.directory.ldap
    assert cfg.directory.backend == "ldap"
    assert ldap == LDAPConfig(
        servers=["ldaps://ldap1.example.com", "ldap://ldap2.example.com:389"],
        base_dn="dc=example,dc=com",
        bind_dn="cn=mlink,dc=example,dc=com",
        bind_password="s3cret",
        users_dn="ou=People,dc=example,dc=com",
        jid_attribute="uid",
        pool_size=4,
        timeout=2.5,
        # Remembered so a written-out configuration names the file again.
        bind_password_file=tmp_path / "secret.txt",
    )
    assert cfg.tls.required is False


BASE = '<mlink>\n<domain>example.com</domain>\n<tls required="false"/>\n'

BAD_FILES = [
    # (name, text, line, words in the message)
    ("syntax", BASE + '<listen type="c2s">\n</mlink>\n', 5, "XML syntax error"),
    ("unclosed attr", BASE + '<listen type="c2s/>\n</mlink>\n', 5, "XML syntax error"),
    ("unknown element", BASE + '<listen type="c2s"/>\n<limit depth="3"/>\n</mlink>', 5, "<limit>"),
    ("unknown attribute", BASE + '<listen type="c2s" prot="5"/>\n</mlink>', 4, "'prot'"),
    ("port too big", BASE + '<listen type="c2s" port="65536"/>\n</mlink>', 4, "0..65535"),
    ("port not number", BASE + '<listen type="c2s" port="52x2"/>\n</mlink>', 4, "whole number"),
    ("negative port", BASE + '<listen type="c2s" port="-1"/>\n</mlink>', 4, "whole number"),
    ("listener type", BASE + '<listen type="s2s"/>\n</mlink>', 4, "listener type"),
    (
        "same port twice",
        BASE + '<listen type="c2s"/>\n<listen type="tls" port="5222"/>\n</mlink>',
        5,
        "already used at line 4",
    ),
    (
        "no domain",
        '<mlink>\n<tls required="false"/>\n<listen type="c2s"/>\n</mlink>',
        1,
        "no <domain>",
    ),
    (
        "bad domain",
        '<mlink>\n<tls required="false"/>\n<domain>bad_name.com</domain>\n</mlink>',
        3,
        "not a valid domain",
    ),
    ("ip domain", "<mlink>\n<domain>127.0.0.1</domain>\n</mlink>", 2, "IP address"),
    ("duplicate domain", BASE + "<domain>EXAMPLE.com</domain>\n</mlink>", 4, "given twice"),
    ("no listener", BASE + "</mlink>", 1, "no <listen>"),
    (
        "bad backend",
        BASE + '<listen type="c2s"/>\n<directory backend="sql"/>\n</mlink>',
        5,
        "unknown directory backend 'sql'",
    ),
    (
        "ldap without ldap",
        BASE + '<listen type="c2s"/>\n<directory backend="ldap"/>\n</mlink>',
        5,
        "needs an <ldap>",
    ),
    (
        "wrong backend child",
        BASE + '<listen type="c2s"/>\n<directory>\n<ldap base="dc=x"/>\n</directory>\n</mlink>',
        6,
        "does not apply",
    ),
    (
        "ldap no server",
        BASE + '<listen type="c2s"/>\n<directory backend="ldap">\n'
        '<ldap base="dc=x"/>\n</directory>\n</mlink>',
        6,
        "<server>",
    ),
    (
        "ldap bad url",
        BASE + '<listen type="c2s"/>\n<directory backend="ldap">\n<ldap base="dc=x">'
        "\n<server>http://x</server></ldap>\n</directory>\n</mlink>",
        7,
        "ldap://",
    ),
    (
        "boolean",
        '<mlink>\n<domain>a</domain>\n<listen type="c2s"/>\n<tls required="yes"/>\n</mlink>',
        4,
        "true or false",
    ),
    ("zero limit", BASE + '<listen type="c2s"/>\n<limits depth="0"/>\n</mlink>', 5, "at least 1"),
    (
        "small stanza",
        BASE + '<listen type="c2s"/>\n<limits stanza-bytes="100"/>\n</mlink>',
        5,
        "at least 10000",
    ),
    (
        "bad timeout",
        BASE + '<listen type="c2s"/>\n<limits auth-timeout="0"/>\n</mlink>',
        5,
        "positive",
    ),
    ("twice", BASE + '<listen type="c2s"/>\n<limits/>\n<limits/>\n</mlink>', 6, "first at line 5"),
    (
        "missing cert",
        BASE.replace('required="false"', 'certificate="no.pem" key="no.key"')
        + '<listen type="c2s"/>\n</mlink>',
        3,
        "does not exist",
    ),
    ("tls listener no cert", BASE + '<listen type="tls"/>\n</mlink>', 3, 'type="tls"'),
    (
        "tls required no cert",
        '<mlink>\n<domain>a</domain>\n<listen type="c2s"/>\n</mlink>',
        1,
        "no certificate",
    ),
    ("stray text", BASE + '<listen type="c2s">5222</listen>\n</mlink>', 4, "takes no text"),
    (
        "public url not websocket",
        BASE + '<listen type="c2s"/>\n<websocket public-url="https://x/y"/>\n</mlink>',
        5,
        "must be a ws:// or wss:// URL",
    ),
    ("log level", BASE + '<listen type="c2s"/>\n<log level="loud"/>\n</mlink>', 5, "level"),
    ("root", '<?xml version="1.0"?>\n<prosody/>', 2, "root element"),
    ("namespaced", '<mlink xmlns="urn:x">\n<domain>a</domain>\n</mlink>', 1, "root element"),
    ("undefined entity", BASE + '<listen type="c2s"/>&nbsp;\n</mlink>', 4, "undefined entity"),
    ("empty file", "", 1, "XML syntax error"),
]


@pytest.mark.parametrize(
    "text,line,words", [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES]
)
def test_bad_files(tmp_path: Path, text: str, line: int, words: str) -> None:
    path = write(tmp_path, text)
    err = error_for(path)
    assert err.line == line, str(err)
    assert str(err).startswith(f"{path}:{line}: ")
    assert words in str(err)


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<mlink><domain>&lol9;</domain></mlink>
"""


def test_billion_laughs_refused_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, BILLION_LAUGHS)
    start = time.monotonic()
    err = error_for(path)
    assert time.monotonic() - start < 1.0
    assert err.line == 2
    assert "DOCTYPE" in str(err)


def test_external_entity_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("do-not-read")
    text = (
        '<?xml version="1.0"?>\n'
        f'<!DOCTYPE mlink [<!ENTITY x SYSTEM "file://{secret}">]>\n'
        "<mlink><domain>&x;</domain></mlink>\n"
    )
    err = error_for(write(tmp_path, text))
    assert err.line == 2
    assert "do-not-read" not in str(err)


def test_external_dtd_refused(tmp_path: Path) -> None:
    text = '<?xml version="1.0"?>\n\n<!DOCTYPE mlink SYSTEM "http://example.com/x.dtd">\n<mlink/>'
    err = error_for(write(tmp_path, text))
    assert err.line == 3


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.xml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: cannot read: ")
    assert info.value.line is None


def test_password_options_exclusive(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("x")
    text = LDAP.replace(
        'bind-password-file="secret.txt"', 'bind-password="a" bind-password-file="secret.txt"'
    )
    err = error_for(write(tmp_path, text))
    assert err.line == 6 and "not both" in str(err)


def test_normalise_domain() -> None:
    assert normalise_domain("Example.COM.") == "example.com"
    assert normalise_domain("BÜCHER.de") == "xn--bcher-kva.de"
    assert base_dn_for_domain("example.com") == "dc=example,dc=com"
    assert base_dn_for_domain("localhost") == "dc=localhost"
    assert base_dn_for_domain("bücher.de") == "dc=xn--bcher-kva,dc=de"
    for bad in ("", "a..b", "-a.com", "a b", "x" * 64 + ".com", "user@example.com"):
        with pytest.raises(ValueError):
            normalise_domain(bad)


def test_write_config_round_trip_ldap(tmp_path: Path) -> None:
    cfg = Config(
        path=None,
        domains=["example.com"],
        listeners=[ListenerConfig("c2s", 0, "127.0.0.1")],
        tls=TLSConfig(required=False),
        directory=DirectoryConfig(
            backend="ldap",
            ldap=LDAPConfig(
                servers=["ldap://a", "ldap://b"],
                base_dn="dc=example,dc=com",
                bind_dn="cn=mlink,dc=example,dc=com",
                bind_password='p"<&>',
                users_dn="ou=People,dc=example,dc=com",
            ),
        ),
        data_dir=tmp_path / "data",
    )
    path = tmp_path / "out.xml"
    write_config(cfg, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # holds a password
    assert 'dir="data"' in path.read_text()
    loaded = load_config(path)
    assert loaded.path == path
    assert loaded.directory.backend == "ldap"
    assert loaded.directory.ldap == cfg.directory.ldap
    for name in ("domains", "listeners", "tls", "limits", "data_dir", "log_level"):
        assert getattr(loaded, name) == getattr(cfg, name)
    with pytest.raises(FileExistsError):
        write_config(cfg, path)


# -- mlink init -----------------------------------------------------------


@pytest.fixture
def embedded_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Use the real EmbeddedDirectory when it exists; otherwise a stand-in
    that writes a minimal LDIF, so these tests do not wait for it."""
    try:
        from mlink.directory.embedded import EmbeddedDirectory  # noqa: F401
    except ImportError:

        class StandIn:
            @staticmethod
            def create(path: Path, base_dn: str, domain: str) -> None:
                with open(path, "x", encoding="utf-8") as f:
                    f.write(f"dn: {base_dn}\nobjectClass: domain\n")

        module = types.ModuleType("mlink.directory.embedded")
        module.EmbeddedDirectory = StandIn  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "mlink.directory.embedded", module)


def test_init_creates_loadable_setup(tmp_path: Path, embedded_directory: None) -> None:
    target = tmp_path / "srv"
    path = init_setup(target, domain="Example.com", c2s_port=15222, tls_port=0, ws_port=15280)
    assert path == target / "mlink.xml"
    cfg = load_config(path)
    assert cfg.domains == ("example.com",)
    assert [(lsn.kind, lsn.port) for lsn in cfg.listeners] == [
        ("c2s", 15222),
        ("tls", 0),
        ("websocket", 15280),
        ("websocket-tls", 15281),
    ]
    assert cfg.directory.backend == "embedded"
    assert cfg.directory.embedded.base_dn == "dc=example,dc=com"
    assert cfg.directory.embedded.file == target / "directory.ldif"
    assert cfg.directory.embedded.file.exists()
    assert cfg.tls.certificate == target / "cert.pem"
    assert cfg.tls.key == target / "key.pem"
    assert cfg.tls.required is True
    assert stat.S_IMODE(cfg.tls.key.stat().st_mode) == 0o600
    text = path.read_text()
    assert 'certificate="cert.pem"' in text and 'file="directory.ldif"' in text

    # The certificate is for the domain and a client pinning it can connect.
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cfg.tls.certificate.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["example.com"]
    validity = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert validity.days >= 3650
    _handshake(cfg.tls.certificate, cfg.tls.key, "example.com")


def _handshake(cert: Path, key: Path, hostname: str) -> None:
    """Complete a TLS handshake in memory, client trusting only `cert`."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not complete")


def test_init_localhost_default(tmp_path: Path, embedded_directory: None) -> None:
    cfg = load_config(init_setup(tmp_path))
    assert cfg.domains == ("localhost",)
    assert cfg.directory.embedded.base_dn == "dc=localhost"
    assert [lsn.port for lsn in cfg.listeners] == [5222, 5223, 5280, 5281]


def test_init_refuses_to_overwrite(tmp_path: Path, embedded_directory: None) -> None:
    path = init_setup(tmp_path, domain="example.com")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(SetupExists, match="refusing to overwrite"):
        init_setup(tmp_path, domain="example.com")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # Only the directory file left over is enough to refuse.
    other = tmp_path / "other"
    other.mkdir()
    (other / "directory.ldif").write_text("users")
    with pytest.raises(SetupExists, match="directory.ldif"):
        init_setup(other)
    assert sorted(p.name for p in other.iterdir()) == ["directory.ldif"]
    assert path.exists()


def test_init_with_given_certificate(tmp_path: Path, embedded_directory: None) -> None:
    first = init_setup(tmp_path / "a")
    cert, key = first.parent / "cert.pem", first.parent / "key.pem"
    with pytest.raises(SetupError, match="together"):
        init_setup(tmp_path / "b", tls_cert=cert)
    assert not (tmp_path / "b").exists()
    cfg = load_config(init_setup(tmp_path / "b", tls_cert=cert, tls_key=key))
    assert cfg.tls.certificate == cert
    assert not (tmp_path / "b" / "cert.pem").exists()


def test_init_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="domain"):
        init_setup(tmp_path, domain="not a domain")
    with pytest.raises(SetupError, match="port"):
        init_setup(tmp_path, c2s_port=70000)
    with pytest.raises(SetupError, match="distinct"):
        init_setup(tmp_path, c2s_port=5222, tls_port=5222)
    assert list(tmp_path.iterdir()) == []


def test_documented_examples_load(tmp_path: Path) -> None:
    """The examples in docs/configuration.md must stay valid."""
    doc = Path(__file__).absolute().parent.parent / "docs" / "configuration.md"
    blocks = re.findall(r"```xml\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 2
    for name in ("cert.pem", "key.pem", "ldap-password"):
        (tmp_path / name).write_text("x\n")
    backends = set()
    for i, block in enumerate(blocks):
        block = re.sub(r'"/etc/letsencrypt/[^"]*/(fullchain|privkey)\.pem"', r'"\1.pem"', block)
        block = block.replace('"fullchain.pem"', '"cert.pem"').replace('"privkey.pem"', '"key.pem"')
        backends.add(load_config(write(tmp_path, block, f"doc{i}.xml")).directory.backend)
    assert backends == {"embedded", "ldap"}


def test_directory_changes_seconds(tmp_path: Path) -> None:
    """The change feed's interval: a few seconds by default, configurable,
    refused below the floor with the usual one-line error."""
    body = '<domain>localhost</domain><listen type="tls"/><tls certificate="c" key="k"/>'
    (tmp_path / "c").write_text("")
    (tmp_path / "k").write_text("")
    cfg = load_config(write(tmp_path, f"<mlink>{body}</mlink>"))
    assert cfg.directory.changes_seconds == 3.0
    cfg = load_config(write(tmp_path, f'<mlink>{body}<directory changes-seconds="1.5"/></mlink>'))
    assert cfg.directory.changes_seconds == 1.5
    error = error_for(write(tmp_path, f'<mlink>{body}<directory changes-seconds="0.01"/></mlink>'))
    assert "changes-seconds" in str(error)
