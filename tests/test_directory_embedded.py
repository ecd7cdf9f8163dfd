"""The embedded (LDIF file) directory, and the LDIF reader/writer."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from mlink.config_model import EmbeddedConfig
from mlink.directory import ldif
from mlink.directory.base import DirectoryError, NoSuchUser, UserExists
from mlink.directory.embedded import EmbeddedDirectory
from mlink.directory.names import escape_dn_value
from mlink.directory.password_hash import hash_password, is_outdated, verify_password
from mlink.sasl.secrets import derive_secret
from tests.ldap_fixtures import run_slapd_tool

BASE = "dc=example,dc=com"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "directory.ldif"


@pytest.fixture
async def directory(path: Path):
    d = await EmbeddedDirectory.create(path, BASE, "example.com")
    yield d
    await d.aclose()


# --- LDIF ----------------------------------------------------------------


def test_ldif_round_trip_with_base64_and_folding():
    long_value = "x" * 200
    entries = [
        ldif.Entry(
            "cn=Zoë \\+ friends,dc=example,dc=com",
            {
                "objectClass": ["top", "person"],
                "cn": ["Zoë + friends"],
                "description": [" leading space", "trailing ", ":colon", "<lt", "a\nb", ""],
                "sn": [long_value],
                "jpegPhoto": [b"\xff\xd8\x00binary"],
            },
        )
    ]
    text = ldif.dumps(entries, header="a comment\nsecond line")
    assert all(len(line) <= ldif.FOLD_WIDTH for line in text.splitlines())
    assert "version:" not in text  # slapadd 2.5 refuses it
    back = ldif.parse(text)
    assert back == entries


def test_ldif_reader_handles_folding_comments_version_and_case():
    text = (
        "version: 1\n"
        "# a comment\n"
        "#  folded comment\n"
        "dn: uid=a,dc=ex\n"
        " ample,dc=com\n"
        "objectClass: top\n"
        "cn:: w6lsw6g=\n"
        "CN: second\n"
        "\n\n"
        "dn:: dWlkPWIsZGM9Y29t\n"
        "uid: b\n"
    )
    a, b = ldif.parse(text)
    assert a.dn == "uid=a,dc=example,dc=com"
    assert a.get("cn") == ["élè", "second"]
    assert b.dn == "uid=b,dc=com"


@pytest.mark.parametrize(
    "bad",
    [
        "cn: no dn\n",
        "dn: a=b\nchangetype: add\n",
        "dn: a=b\njpegPhoto:< file:///etc/passwd\n",
        " continuation first\n",
        "dn: a=b\ncn:: !!!notbase64\n",
        "dn: a=b\nnocolon\n",
    ],
)
def test_ldif_reader_refuses_what_it_cannot_keep(bad):
    with pytest.raises(ldif.LDIFError):
        ldif.parse(bad)


def ssha_hash(password: str) -> str:
    """A `{SSHA}` value as slapd (and mlink before Argon2) writes it."""
    salt = b"12345678"
    return "{SSHA}" + base64.b64encode(
        hashlib.sha1(password.encode() + salt).digest() + salt).decode()


def test_password_hash_helpers():
    h = hash_password("pässword")
    assert h.startswith("{ARGON2}$argon2id$")
    assert verify_password(h, "pässword")
    assert not verify_password(h, "password")
    assert not is_outdated(h)
    legacy = ssha_hash("pässword")
    assert verify_password(legacy, "pässword") and not verify_password(legacy, "password")
    assert is_outdated(legacy)
    assert not verify_password("pässword", "pässword")  # clear text refused
    assert not verify_password("{ARGON2}$argon2id$garbage", "pässword")
    # "#" is escaped wherever it is (libldap refuses a bare one inside a value).
    assert escape_dn_value(" #a,b+c\\d ") == "\\ \\#a\\,b\\+c\\\\d\\ "


# --- the directory -------------------------------------------------------


async def test_add_check_list_delete(directory: EmbeddedDirectory, path: Path):
    await directory.add_user("alice@example.com", "alice-pw")
    await directory.add_user("alice@example.org", "other-pw")  # same localpart
    assert await directory.list_users() == ["alice@example.com", "alice@example.org"]
    assert await directory.user_exists("alice@example.com")
    assert await directory.check_password("alice@example.com", "alice-pw")
    assert not await directory.check_password("alice@example.com", "other-pw")
    assert not await directory.check_password("alice@example.com", "")
    assert not await directory.check_password("nobody@example.com", "alice-pw")
    with pytest.raises(UserExists):
        await directory.add_user("alice@example.com", "x")

    text = path.read_text()
    assert "alice-pw" not in text and "other-pw" not in text
    (alice,) = [e for e in ldif.parse(text) if e.first("mail") == "alice@example.com"]
    (stored,) = alice.get("userPassword")
    assert str(stored).startswith("{ARGON2}$argon2id$")  # never a fast hash at rest
    assert "dn: mail=alice@example.org,ou=People,dc=example,dc=com" in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"

    await directory.delete_user("alice@example.com")
    assert await directory.list_users() == ["alice@example.org"]
    assert not await directory.check_password("alice@example.com", "alice-pw")
    with pytest.raises(NoSuchUser):
        await directory.delete_user("alice@example.com")


async def test_scram_secrets_and_set_password(directory: EmbeddedDirectory):
    await directory.add_user("bob@example.com", "old-pw")
    s256 = await directory.scram_secret("bob@example.com", "SCRAM-SHA-256")
    s1 = await directory.scram_secret("bob@example.com", "SCRAM-SHA-1")
    assert s256 is not None and s256.mechanism == "SCRAM-SHA-256"
    assert s1 is not None and s1.mechanism == "SCRAM-SHA-1"
    assert s256.matches_password("old-pw") and s1.matches_password("old-pw")
    assert s256 == derive_secret("SCRAM-SHA-256", "old-pw", s256.salt, s256.iterations)
    assert await directory.scram_secret("nobody@example.com", "SCRAM-SHA-1") is None

    await directory.set_password("bob@example.com", "new-pw")
    assert await directory.check_password("bob@example.com", "new-pw")
    assert not await directory.check_password("bob@example.com", "old-pw")
    new = await directory.scram_secret("bob@example.com", "SCRAM-SHA-256")
    assert new is not None and new.matches_password("new-pw")
    with pytest.raises(NoSuchUser):
        await directory.set_password("nobody@example.com", "x")


async def test_user_without_authpassword(path: Path, caplog):
    """An entry written by another tool: userPassword only."""
    d = await EmbeddedDirectory.create(path, BASE)
    entries = ldif.parse(path.read_text())
    entries.append(
        ldif.Entry(
            "uid=carol,ou=People,dc=example,dc=com",
            {
                "objectClass": ["top", "person", "organizationalPerson", "inetOrgPerson"],
                "cn": ["Carol"],
                "sn": ["Carol"],
                "uid": ["carol"],
                "mail": ["carol@example.com"],
                "userPassword": [ssha_hash("carol-pw")],
            },
        )
    )
    path.write_text(ldif.dumps(entries))
    assert await d.check_password("carol@example.com", "carol-pw")
    assert not await d.check_password("carol@example.com", "wrong")
    with caplog.at_level("INFO", logger="mlink.directory"):
        assert await d.scram_secret("carol@example.com", "SCRAM-SHA-256") is None
    assert "no authPassword value for SCRAM-SHA-256" in caplog.text
    # Setting the password through mlink adds mlinkUser and the secrets.
    await d.set_password("carol@example.com", "carol-new")
    assert await d.scram_secret("carol@example.com", "SCRAM-SHA-1") is not None
    (entry,) = [e for e in ldif.parse(path.read_text()) if e.first("uid") == "carol"]
    assert "mlinkUser" in entry.get("objectClass")


async def test_legacy_hash_upgraded_at_next_password_login(path: Path):
    """A user whose userPassword is a fast {SSHA} (written by an older mlink
    or another tool) gets an Argon2id hash after the next successful
    password login, and every mechanism still works with the same password;
    a wrong password rewrites nothing."""
    d = await EmbeddedDirectory.create(path, BASE)
    await d.add_user("dave@example.com", "dave-pw")
    entries = ldif.parse(path.read_text())
    (dave,) = [e for e in entries if e.first("mail") == "dave@example.com"]
    dave.set("userPassword", [ssha_hash("dave-pw")])
    path.write_text(ldif.dumps(entries))

    def stored() -> str:
        (entry,) = [e for e in ldif.parse(path.read_text())
                    if e.first("mail") == "dave@example.com"]
        return str(entry.get("userPassword")[0])

    dn = dave.dn
    assert not await d.port.upgrade_password_hash(dn, "wrong-pw")
    assert stored().startswith("{SSHA}")
    ok, _ = await d.password_login("dave@example.com", "dave-pw")
    assert ok
    assert await d.refresh_credentials("dave@example.com", "dave-pw")
    assert stored().startswith("{ARGON2}$argon2id$")
    assert verify_password(stored(), "dave-pw")
    # SCRAM follows the new value (secrets re-bound), PLAIN still works,
    # and a second login has nothing left to rewrite.
    secret = await d.scram_secret("dave@example.com", "SCRAM-SHA-256")
    assert secret is not None and secret.matches_password("dave-pw")
    assert await d.check_password("dave@example.com", "dave-pw")
    assert not await d.refresh_credentials("dave@example.com", "dave-pw")


async def test_missing_file_is_an_empty_directory(tmp_path: Path):
    path = tmp_path / "sub" / "d.ldif"
    path.parent.mkdir()
    d = EmbeddedDirectory(EmbeddedConfig(file=path, base_dn="dc=localhost"))
    assert await d.list_users() == []
    assert not await d.check_password("a@localhost", "x")
    await d.add_user("a@localhost", "pw")
    entries = ldif.parse(path.read_text())
    assert [e.dn for e in entries] == [
        "dc=localhost",
        "ou=People,dc=localhost",
        "mail=a@localhost,ou=People,dc=localhost",
    ]


async def test_bad_jids_refused(directory: EmbeddedDirectory):
    for jid in ["", "nodomain", "a@b/resource", "münchen@example.com"]:
        with pytest.raises(DirectoryError):
            await directory.add_user(jid, "pw")


async def test_filter_like_jid_finds_nothing(directory: EmbeddedDirectory):
    await directory.add_user("alice@example.com", "pw")
    assert not await directory.user_exists("*)(mail=*")
    assert not await directory.check_password("*)(mail=*", "pw")
    assert await directory.scram_secret("*", "SCRAM-SHA-256") is None


async def test_import_of_many_users_writes_once(directory: EmbeddedDirectory, path: Path,
                                             monkeypatch: pytest.MonkeyPatch):
    """However many users, an import rewrites the file a fixed number of
    times: once for the entries and passwords, once for the SCRAM secrets
    bound to the password hashes the directory then holds."""
    await directory.add_user("u0@example.com", "before")
    # 200: each password costs an Argon2id hash (about 45 ms of a core).
    pairs = [(f"u{i}@example.com", f"pw{i}") for i in range(200)]
    import mlink.directory.embedded as embedded_module

    writes: list[Path] = []
    real_write = embedded_module._atomic_write

    def counting_write(target: Path, text: str) -> None:
        writes.append(target)
        real_write(target, text)

    monkeypatch.setattr(embedded_module, "_atomic_write", counting_write)
    assert await directory.import_users(pairs) == 200
    assert writes == [path, path]
    users = await directory.list_users()
    assert len(users) == 200
    assert await directory.check_password("u0@example.com", "pw0")  # updated
    assert not await directory.check_password("u0@example.com", "before")
    assert await directory.check_password("u199@example.com", "pw199")
    # The file alone is enough: a fresh instance sees the same users.
    fresh = EmbeddedDirectory(EmbeddedConfig(file=path, base_dn=BASE))
    assert len(await fresh.list_users()) == 200


async def test_import_does_not_stall_the_loop(directory: EmbeddedDirectory):
    """While 300 users are derived and written, the loop keeps ticking."""
    gaps: list[float] = []
    done = trio.Event()

    async def ticker():
        last = trio.current_time()
        while not done.is_set():
            await trio.sleep(0.01)
            now = trio.current_time()
            gaps.append(now - last)
            last = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await directory.import_users((f"t{i}@example.com", "pw") for i in range(300))
        done.set()
    assert gaps and max(gaps) < 0.5, max(gaps)


async def test_reload_after_another_instance_writes(path: Path):
    server = await EmbeddedDirectory.create(path, BASE)
    cli = EmbeddedDirectory(EmbeddedConfig(file=path, base_dn=BASE))
    assert await server.list_users() == []
    await cli.add_user("new@example.com", "pw")
    assert await server.check_password("new@example.com", "pw")
    await cli.delete_user("new@example.com")
    assert not await server.user_exists("new@example.com")


async def test_concurrent_writers_lose_nothing(path: Path):
    """Two instances (as two CLI processes would) adding users at once."""
    await EmbeddedDirectory.create(path, BASE)
    a = EmbeddedDirectory(EmbeddedConfig(file=path, base_dn=BASE))
    b = EmbeddedDirectory(EmbeddedConfig(file=path, base_dn=BASE))
    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(a.add_user, f"a{i}@example.com", "pw")
            nursery.start_soon(b.add_user, f"b{i}@example.com", "pw")
    c = EmbeddedDirectory(EmbeddedConfig(file=path, base_dn=BASE))
    assert len(await c.list_users()) == 20


ADD_SCRIPT = """
import sys, trio
from pathlib import Path
from mlink.config_model import EmbeddedConfig
from mlink.directory.embedded import EmbeddedDirectory
d = EmbeddedDirectory(EmbeddedConfig(file=Path(sys.argv[1]), base_dn=sys.argv[2]))
async def main():
    for i in range(15):
        await d.add_user(f"{sys.argv[3]}{i}@example.com", "pw")
trio.run(main)
"""


async def test_concurrent_processes_lose_nothing(path: Path):
    await EmbeddedDirectory.create(path, BASE)
    repo = Path(__file__).resolve().parent.parent
    procs = [
        subprocess.Popen([sys.executable, "-c", ADD_SCRIPT, str(path), BASE, prefix], cwd=repo)
        for prefix in ("p", "q", "r")
    ]
    for proc in procs:
        assert await trio.to_thread.run_sync(proc.wait) == 0
    d = EmbeddedDirectory(EmbeddedConfig(file=path, base_dn=BASE))
    assert len(await d.list_users()) == 45


async def test_written_file_loads_into_slapd_and_users_can_bind(directory, path, tmp_path):
    """The file is what slapadd loads: schema-valid, and a user can bind
    with the Argon2id userPassword afterwards (slapd's argon2 module, which
    tools/slapd-run loads, verifies the hashes mlink wrote)."""
    await directory.add_user("alice@example.com", "alice-pw")
    await directory.import_users([("bob@example.com", "bob-pw"), ("x@example.org", "x-pw")])
    workdir = tmp_path / "slapd"
    out = await trio.to_thread.run_sync(
        lambda: run_slapd_tool("--dir", str(workdir), "--no-base", "--ldif", str(path))
    )
    url = out.splitlines()[0]
    try:
        for dn, pw, ok in [
            ("mail=alice@example.com,ou=People,dc=example,dc=com", "alice-pw", True),
            ("mail=x@example.org,ou=People,dc=example,dc=com", "x-pw", True),
            ("mail=bob@example.com,ou=People,dc=example,dc=com", "wrong", False),
        ]:
            proc = await trio.run_process(
                ["ldapwhoami", "-x", "-H", url, "-D", dn, "-w", pw],
                capture_stdout=True,
                check=False,
            )
            assert (proc.returncode == 0) == ok, (dn, proc.returncode)
    finally:
        await trio.to_thread.run_sync(lambda: run_slapd_tool("--stop", str(workdir)))


async def test_a_login_hands_its_entry_to_who_asked(directory: EmbeddedDirectory):
    """`read_at_login`: the login's own search brings the profile attributes
    (no second search for the session's first presence), only for a login
    that succeeded, and never a credential."""
    await directory.add_user("erin@example.com", "erin-pw")
    seen: list[tuple[str, dict[str, list[bytes]]]] = []
    directory.read_at_login(["cn", "mail", "userPassword"], lambda j, v: seen.append((j, v)))
    ok, _ = await directory.password_login("erin@example.com", "wrong")
    assert not ok and seen == []
    ok, _ = await directory.password_login("erin@example.com", "erin-pw")
    assert ok
    assert seen == [("erin@example.com", {"cn": [b"erin"], "mail": [b"erin@example.com"]})]
    seen.clear()
    secret = await directory.scram_secret("erin@example.com", "SCRAM-SHA-256")
    assert secret is not None
    assert seen == [("erin@example.com", {"cn": [b"erin"], "mail": [b"erin@example.com"]})]
