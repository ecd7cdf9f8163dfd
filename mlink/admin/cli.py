"""The `mlink` command line: init, serve, check, user management.

Every command exits non-zero with one line on stderr when it fails, so
scripts and provisioning tools can rely on it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import trio

from mlink.config import ConfigError, load_config
from mlink.config_model import Config
from mlink.directory.base import DirectoryError, DirectoryUnavailable
from mlink.jid import InvalidJID, parse_jid

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("mlink.xml")
DEFAULT_SETUP_DIR = Path("mlink-data")
DEFAULT_DOMAIN = "localhost"


class CommandError(Exception):
    """A failure to report as one line and exit status 1."""


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args) or 0
    except (CommandError, ConfigError, DirectoryError) as exc:
        print(f"mlink: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlink", description="A directory-centred XMPP server.")
    sub = p.add_subparsers(metavar="COMMAND")

    init = sub.add_parser("init", help="create a standalone setup in DIR")
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument("--domain", default=DEFAULT_DOMAIN)
    init.add_argument("--c2s-port", type=int, default=5222)
    init.add_argument("--tls-port", type=int, default=5223)
    init.add_argument("--ws-port", type=int, default=5280)
    init.add_argument("--tls-cert", type=Path)
    init.add_argument("--tls-key", type=Path)
    init.set_defaults(func=cmd_init)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--config", type=Path)
    serve.add_argument("--shards", type=int, metavar="N",
                       help="shard processes (default: one per CPU core; one when a "
                            "listener uses port 0)")
    serve.set_defaults(func=cmd_serve)

    status = sub.add_parser("status", help="show the running server's shards and bus")
    status.add_argument("--config", type=Path)
    status.set_defaults(func=cmd_status)

    reload = sub.add_parser("reload", help="make the running server re-read its configuration")
    reload.add_argument("--config", type=Path,
                        help="the file the server was started with (it finds the server)")
    reload.set_defaults(func=cmd_reload)

    check = sub.add_parser("check", help="validate a configuration and its directory")
    check.add_argument("--config", type=Path)
    check.set_defaults(func=cmd_check)

    user = sub.add_parser("user", help="manage user accounts")
    user_sub = user.add_subparsers(metavar="ACTION")
    for name, create, help_text in (
        ("add", True, "create an account"),
        ("passwd", False, "set an account's password"),
    ):
        cmd = user_sub.add_parser(name, help=help_text)
        cmd.add_argument("jid")
        secret = cmd.add_mutually_exclusive_group(required=True)
        secret.add_argument("--password")
        secret.add_argument("--password-file", type=Path)
        cmd.add_argument("--config", type=Path)
        cmd.set_defaults(func=cmd_user_password, create=create)
    delete = user_sub.add_parser("delete", help="remove an account")
    delete.add_argument("jid")
    delete.add_argument("--config", type=Path)
    delete.set_defaults(func=cmd_user_delete)
    listing = user_sub.add_parser("list", help="list accounts")
    listing.add_argument("--config", type=Path)
    listing.set_defaults(func=cmd_user_list)
    imp = user_sub.add_parser("import", help="add or update accounts from 'jid password' lines")
    imp.add_argument("file", type=Path, metavar="FILE")
    imp.add_argument("--config", type=Path)
    imp.set_defaults(func=cmd_user_import)

    export = sub.add_parser("export", help="write accounts and their data as XEP-0227")
    export.add_argument("file", type=Path, metavar="FILE")
    export.add_argument("--per-user", action="store_true",
                        help="FILE is a directory: one <user>@<host>.xml per user "
                             "(Prosody's layout, what prosody-migrator reads)")
    export.add_argument("--config", type=Path)
    export.set_defaults(func=cmd_export)
    pie_import = sub.add_parser("import", help="add accounts and their data from XEP-0227 "
                                               "files (a file, or a directory of them)")
    pie_import.add_argument("file", type=Path, metavar="FILE")
    pie_import.add_argument("--config", type=Path)
    pie_import.set_defaults(func=cmd_import)
    backup = sub.add_parser("backup", help="copy the store and directory while the server runs")
    backup.add_argument("dir", type=Path, metavar="DIR")
    backup.add_argument("--config", type=Path)
    backup.set_defaults(func=cmd_backup)
    return p


# -- configuration --------------------------------------------------------------


def _config_path(given: Path | None, create_default: bool = False) -> Path:
    """`--config`, else ./mlink.xml, else (for serve) a fresh ./mlink-data."""
    if given is not None:
        return given
    if DEFAULT_CONFIG.exists():
        return DEFAULT_CONFIG
    default_setup = DEFAULT_SETUP_DIR / "mlink.xml"
    if default_setup.exists():
        return default_setup
    if not create_default:
        raise CommandError(f"no configuration: {DEFAULT_CONFIG} not found (use --config F)")
    from mlink.admin.setup import init_setup

    path = init_setup(DEFAULT_SETUP_DIR, domain=DEFAULT_DOMAIN)
    print(f"mlink: created a standalone setup for {DEFAULT_DOMAIN} in {DEFAULT_SETUP_DIR}/",
          file=sys.stderr)
    return path


def _load(given: Path | None, create_default: bool = False) -> Config:
    return _checked(load_config(_config_path(given, create_default)))


def _checked(config: Config) -> Config:
    """Problems only the feature modules can see (e.g. an unknown profile
    field name), reported like any other configuration error."""
    from mlink.profile import check_profiles

    problems = check_profiles(config)
    if problems:
        raise CommandError(f"{config.path}: {problems[0]}")
    return config


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# -- commands ---------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from mlink.admin.setup import SetupError, init_setup

    if (args.tls_cert is None) != (args.tls_key is None):
        raise CommandError("--tls-cert and --tls-key go together")
    try:
        path = init_setup(
            args.dir,
            domain=args.domain,
            c2s_port=args.c2s_port,
            tls_port=args.tls_port,
            ws_port=args.ws_port,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    except SetupError as exc:
        raise CommandError(str(exc)) from None
    print(f"created {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the supervisor, which runs the shards (`--shards 1` included:
    there is no separate single-process path)."""
    from mlink.shard.control import find_oserror
    from mlink.shard.supervisor import (
        check_ports_free,
        check_shards,
        default_shards,
        run_supervisor,
    )

    path = _config_path(args.config, create_default=True)
    config = _checked(load_config(path))
    shards = args.shards if args.shards is not None else default_shards(config)
    try:
        check_shards(config, shards)
        check_ports_free(config)
    except (ValueError, OSError) as exc:
        raise CommandError(str(exc)) from None
    _setup_logging(config.log_level)
    try:
        return run_supervisor(path, config, shards)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        error = find_oserror(exc)
        if error is None:
            raise
        raise CommandError(str(error)) from None


def cmd_status(args: argparse.Namespace) -> int:
    from mlink.shard.supervisor import format_status, query_status

    config = _load(args.config)
    try:
        status = query_status(config)
    except OSError as exc:
        raise CommandError(str(exc)) from None
    print(format_status(status))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running server to re-read its file. The server's verdict is
    printed: a refused file gives its one-line `file:line: problem` and
    exit status 1, the server keeps its configuration. The server is found
    through the data directory the file names, read leniently so that a
    broken file still reaches the server (which logs the refusal too)."""
    from mlink.config import data_dir_hint
    from mlink.shard.supervisor import request_reload

    path = _config_path(args.config)
    try:
        answer = request_reload(data_dir_hint(path))
    except OSError as exc:
        # No server to ask: still say what is wrong with the file, if anything.
        load_config(path)
        raise CommandError(str(exc)) from None
    if not answer.get("ok"):
        raise CommandError(str(answer.get("error", "the server refused the reload")))
    print(f"{path}: configuration reloaded")
    for name in answer.get("restart", []):
        print(f"{path}: {name} changed: needs a restart to apply")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)

    async def ping() -> tuple[list[str], list[str]]:
        from mlink.directory import open_directory

        directory = open_directory(config.directory)
        try:
            await directory.ping()
            return await _exposed_secrets(directory), await _fast_hashes(directory)
        finally:
            await directory.aclose()

    try:
        exposed, warnings = trio.run(ping)
    except DirectoryUnavailable as exc:
        raise CommandError(f"directory does not answer: {exc}") from None
    if exposed:
        raise CommandError(exposed[0])
    for warning in warnings:
        print(f"{config.path}: warning: {warning}")
    print(f"{config.path}: configuration valid; {config.directory.backend} directory answers")
    return 0


# userPassword schemes an offline guess breaks at GPU speed.
FAST_HASH_SCHEMES = frozenset({"", "{SSHA}", "{SHA}", "{SSHA256}", "{SSHA512}", "{MD5}",
                               "{SMD5}", "{CLEARTEXT}"})


async def _fast_hashes(directory: object) -> list[str]:
    """A warning when users' password hashes are fast to crack (see
    mlink.directory.password_hash): not a failure, since only the next
    password change (LDAP) or login (embedded) can replace them."""
    from mlink.directory.core import PortDirectory
    from mlink.directory.embedded import EmbeddedPort

    if not isinstance(directory, PortDirectory):
        return []
    try:
        schemes = await directory.password_schemes()
    except DirectoryError as exc:
        log.debug("password scheme survey: %s", exc)
        return []
    fast = {scheme or "clear text": n for scheme, n in schemes.items()
            if scheme in FAST_HASH_SCHEMES}
    if not fast:
        return []
    listing = ", ".join(f"{n} {scheme}" for scheme, n in sorted(fast.items()))
    if isinstance(directory.port, EmbeddedPort):
        remedy = "each is replaced by an Argon2id hash at the user's next password login"
    else:
        remedy = ("set the directory's password hash to {ARGON2} (docs/ldap.md); each is "
                  "replaced when the user next changes the password")
    return [f"{sum(fast.values())} userPassword values are fast to crack ({listing}): "
            f"{remedy}"]


async def _exposed_secrets(directory: object) -> list[str]:
    """Problems with who can read credentials in an LDAP directory: SCRAM
    secrets (and password hashes) must be readable by the service account
    only, or anyone who reads them can log in (SCRAM) or crack them."""
    from mlink.directory.ldap import LDAPDirectory, LDAPPort

    if not isinstance(directory, LDAPDirectory) or not isinstance(directory.port, LDAPPort):
        return []  # the embedded file is written with mode 0600
    cfg = directory.config
    attributes = [cfg.scram_attribute, "userPassword"]
    users = cfg.users_dn or f"ou=People,{cfg.base_dn}"
    try:
        readable = await directory.port.readable_by("", "", users, attributes)
    except Exception as exc:  # noqa: BLE001 - an anonymous bind refused is fine
        log.debug("anonymous read check: %s", exc)
        return []
    if readable:
        return [f"anonymous clients can read {' or '.join(attributes)} of {readable[0]}: "
                "restrict them to the service account (see conf/mlink-acl.ldif, "
                "docs/ldap.md)"]
    return []


def _bare_jid(text: str, config: Config) -> str:
    try:
        jid = parse_jid(text)
    except InvalidJID as exc:
        raise CommandError(f"invalid JID {text!r}: {exc}") from None
    if not jid.local or jid.resource:
        raise CommandError(f"{text!r} is not a bare user JID (user@domain)")
    if jid.domain not in config.domains:
        raise CommandError(f"{jid.domain} is not a domain this server serves")
    return str(jid)


def _password(args: argparse.Namespace) -> str:
    if args.password is not None:
        password = args.password
    else:
        try:
            password = args.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise CommandError(f"{args.password_file}: cannot read: {exc.strerror}") from None
    if not password:
        raise CommandError("the password is empty")
    return str(password)


def _with_directory(config: Config, action):  # type: ignore[no-untyped-def]
    async def run():  # type: ignore[no-untyped-def]
        from mlink.directory import open_directory

        directory = open_directory(config.directory)
        try:
            return await action(directory)
        finally:
            await directory.aclose()

    return trio.run(run)


def cmd_user_password(args: argparse.Namespace) -> int:
    """`user add` (args.create: a new account) and `user passwd`."""
    config = _load(args.config)
    jid, password = _bare_jid(args.jid, config), _password(args)
    if args.create:
        _with_directory(config, lambda d: d.add_user(jid, password))
        print(f"added {jid}")
    else:
        _with_directory(config, lambda d: d.set_password(jid, password))
        print(f"password changed for {jid}")
    return 0


def cmd_user_delete(args: argparse.Namespace) -> int:
    config = _load(args.config)
    jid = _bare_jid(args.jid, config)
    _with_directory(config, lambda d: d.delete_user(jid))
    print(f"deleted {jid}")
    _end_sessions(config, jid, "your account was deleted")
    return 0


def _end_sessions(config: Config, jid: str, text: str) -> None:
    """Tell a running server to end `jid`'s sessions on every shard; no
    server running is no error (nobody is connected then)."""
    from mlink.shard.supervisor import request_end_user

    try:
        reply = request_end_user(config.data_dir, jid, text)
    except OSError:
        return
    if reply.get("ok"):
        print(f"ended {jid}'s sessions on the running server")


def cmd_user_list(args: argparse.Namespace) -> int:
    config = _load(args.config)
    for jid in _with_directory(config, lambda d: d.list_users()):
        print(jid)
    return 0


def cmd_user_import(args: argparse.Namespace) -> int:
    config = _load(args.config)
    pairs = list(_read_pairs(args.file, config))
    count = _with_directory(config, lambda d: d.import_users(pairs))
    print(f"imported {count} users")
    return 0


def _read_pairs(path: Path, config: Config) -> Iterator[tuple[str, str]]:
    """`jid password` per line; blank lines and '#' comments skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CommandError(f"{path}: cannot read: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        jid_text, _, password = text.partition(" ")
        password = password.strip()
        if not password:
            raise CommandError(f"{path}:{number}: expected 'jid password'")
        try:
            yield _bare_jid(jid_text, config), password
        except CommandError as exc:
            raise CommandError(f"{path}:{number}: {exc}") from None


# Exit status of an import refused for a problem in its input files.
BAD_INPUT = 2


def cmd_export(args: argparse.Namespace) -> int:
    from mlink.admin.xep0227 import MigrationError, run_export

    config = _load(args.config)
    try:
        summary = trio.run(run_export, config, args.file, args.per_user)
    except (MigrationError, OSError) as exc:
        raise CommandError(str(exc)) from None
    for jid in summary.without_credentials:
        print(f"mlink: warning: {jid} has no SCRAM secrets; exported without credentials",
              file=sys.stderr)
    where = args.file if not args.per_user else f"{len(summary.files)} files in {args.file}"
    print(f"exported {summary.users} accounts to {where}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from mlink.admin.xep0227 import MigrationError, run_import

    config = _load(args.config)
    try:
        summary, plan = trio.run(run_import, config, args.file)
    except MigrationError as exc:
        print(f"mlink: {exc}", file=sys.stderr)
        return BAD_INPUT
    for warning in summary.warnings:
        print(f"mlink: {warning}", file=sys.stderr)
    print(summary.line(plan.skipped))
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from mlink.admin.backup import BackupError, run_backup

    config = _load(args.config)
    try:
        report = run_backup(config, args.dir)
    except BackupError as exc:
        raise CommandError(str(exc)) from None
    for what, path in report.written:
        print(f"wrote {path}: {what}")
    for note in report.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
