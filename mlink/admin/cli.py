"""The `mlink` command line: init, serve, check, user management.

Every command exits non-zero with one line on stderr when it fails, so
scripts and provisioning tools can rely on it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import trio

from mlink import __version__
from mlink.admin.config_cli import ConfigCommandError
from mlink.config import ConfigError, load_config
from mlink.config_model import Config
from mlink.directory.base import DirectoryError, DirectoryUnavailable
from mlink.jid import InvalidJID, parse_jid

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("mlink.xml")
DEFAULT_SETUP_DIR = Path("mlink-data")
DEFAULT_DOMAIN = "localhost"
# Where a system-wide installation keeps its configuration, and the
# variable that names another file for every command.
SYSTEM_CONFIG = Path("/etc/mlink/mlink.xml")
CONFIG_ENV = "MLINK_CONFIG"
# How long `serve` waits for the directory's first answer before warning.
DIRECTORY_PROBE_SECONDS = 5.0


class CommandError(Exception):
    """A failure to report as one line and exit status 1."""


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    if args.func is not cmd_serve:
        # A command reports its failure as one line (below); the library's
        # log records of the same failure would print it a second time.
        logging.getLogger().setLevel(logging.CRITICAL)
    try:
        return args.func(args) or 0
    except (CommandError, ConfigError, DirectoryError, ConfigCommandError) as exc:
        print(f"mlink: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `mlink status | head -2`: the reader left; not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlink", description="A directory-centred XMPP server.")
    p.add_argument("--version", action="version", version=f"mlink {__version__}")
    sub = p.add_subparsers(metavar="COMMAND")

    init = sub.add_parser("init", help="create a standalone setup in DIR")
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument("--domain", default=DEFAULT_DOMAIN)
    init.add_argument("--c2s-port", type=int, default=5222)
    init.add_argument("--tls-port", type=int, default=5223)
    init.add_argument("--ws-port", type=int, default=5280)
    init.add_argument("--tls-cert", type=Path)
    init.add_argument("--tls-key", type=Path)
    init.add_argument("--address", default=None, metavar="A",
                      help="the address every listener binds (default 0.0.0.0: all IPv4 "
                           "addresses; 127.0.0.1 for this machine only, :: for IPv6 too)")
    init.add_argument("--console-admin", default=None, metavar="JID",
                      help="enable the web console on 127.0.0.1 with this user as its "
                           "administrator (add the user with `mlink user add`)")
    init.add_argument("--console-port", type=int, default=5443, metavar="PORT")
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

    session = sub.add_parser("session", help="list or end sessions on the running server")
    session_sub = session.add_subparsers(metavar="ACTION")
    slist = session_sub.add_parser("list", help="the connected sessions, one per line")
    slist.add_argument("--user", metavar="JID", help="only this user's sessions")
    slist.add_argument("--config", type=Path)
    slist.set_defaults(func=cmd_session_list)
    kick = session_sub.add_parser("kick", help="end a session (full JID) or all of a user's")
    kick.add_argument("jid")
    kick.add_argument("--reason", default="", metavar="TEXT",
                      help="shown to the user with the stream error")
    kick.add_argument("--config", type=Path)
    kick.set_defaults(func=cmd_session_kick)

    user = sub.add_parser("user", help="manage user accounts")
    user_sub = user.add_subparsers(metavar="ACTION")
    for name, create, help_text in (
        ("add", True, "create an account"),
        ("passwd", False, "set an account's password"),
    ):
        cmd = user_sub.add_parser(name, help=help_text)
        cmd.add_argument("jid")
        secret = cmd.add_mutually_exclusive_group()
        secret.add_argument("--password",
                            help="the password (visible to other local users in the process "
                                 "list: prefer the prompt or --password-file)")
        secret.add_argument("--password-file", type=Path, metavar="FILE",
                            help="read the password from the first line of FILE (- for "
                                 "standard input); neither option: prompt for it")
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

    from mlink.admin.rooms import add_parsers

    add_parsers(sub).set_defaults(func=cmd_room)
    from mlink.admin.config_cli import add_parsers as add_config_parsers

    add_config_parsers(sub).set_defaults(func=cmd_config)
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
    """Where the configuration is: `--config`, then `$MLINK_CONFIG`, then
    ./mlink.xml, then the standalone setup ./mlink-data/mlink.xml, then
    /etc/mlink/mlink.xml; else (for serve only) a new standalone setup in
    ./mlink-data, announced before it is created."""
    if given is not None:
        return given
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env)
    for candidate in (DEFAULT_CONFIG, DEFAULT_SETUP_DIR / "mlink.xml", SYSTEM_CONFIG):
        if candidate.exists():
            return candidate
    if not create_default:
        raise CommandError(f"no configuration: none of {DEFAULT_CONFIG}, "
                           f"{DEFAULT_SETUP_DIR}/mlink.xml, {SYSTEM_CONFIG} exists "
                           f"(use --config F or set {CONFIG_ENV})")
    from mlink.admin.setup import SetupError, init_setup

    print(f"mlink: no configuration found ({DEFAULT_CONFIG}, {SYSTEM_CONFIG}, ${CONFIG_ENV}); "
          f"creating a standalone setup for {DEFAULT_DOMAIN} in "
          f"{DEFAULT_SETUP_DIR.resolve()}/", file=sys.stderr)
    try:
        path = init_setup(DEFAULT_SETUP_DIR, domain=DEFAULT_DOMAIN)
    except SetupError as exc:
        raise CommandError(str(exc)) from None
    _print_next_steps(path, sys.stderr)
    return path


def _print_next_steps(config_path: Path, out: TextIO) -> None:
    """What a newcomer does next: add a user, point a client at the
    server, and check the certificate's fingerprint (self-signed: clients
    such as mcabber and Profanity ask to confirm it)."""
    from mlink.admin.setup import certificate_fingerprint

    config = load_config(config_path)
    domain = config.domains[0]
    ports = {lc.kind: lc.port for lc in config.listeners}
    where = f"--config {config_path}" if config_path != DEFAULT_CONFIG else ""
    lines = ["next steps:",
             f"  add a user:     mlink user add alice@{domain} {where}".rstrip()]
    if "c2s" in ports:
        lines.append(f"  connect:        alice@{domain}, server {domain} port {ports['c2s']} "
                     "(STARTTLS)" + (f", or port {ports['tls']} (direct TLS)"
                                     if "tls" in ports else ""))
    if "websocket" in ports:
        lines.append(f"  web clients:    ws://{domain}:{ports['websocket']}/xmpp-websocket")
    if config.tls.certificate is not None:
        lines.append("  certificate:    SHA-256 "
                     + certificate_fingerprint(config.tls.certificate))
    print("\n".join(lines), file=out)


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


def _setup_logging(level: str, file: Path | None = None) -> None:
    from mlink.util.logsetup import configure_logging

    configure_logging(level, "%(asctime)s %(levelname)s %(name)s: %(message)s", file)


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
            address=args.address,
            console_admin=args.console_admin,
            console_port=args.console_port,
        )
    except SetupError as exc:
        raise CommandError(str(exc)) from None
    print(f"created {path}")
    _print_next_steps(path, sys.stdout)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """`mlink config export|import` (mlink.admin.config_cli)."""
    from mlink.admin.config_cli import run

    if getattr(args, "action", None) is None:
        raise CommandError("config: give an action: export FILE or import FILE")
    return run(args, _config_path(getattr(args, "config", None)))


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
    _refuse_second_server(config, path)
    try:
        check_shards(config, shards)
        check_ports_free(config)
    except (ValueError, OSError) as exc:
        raise CommandError(str(exc)) from None
    _setup_logging(config.log_level, config.log_file)
    _warn_if_directory_silent(config)
    try:
        return run_supervisor(path, config, shards)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        error = find_oserror(exc)
        if error is None:
            raise
        raise CommandError(str(error)) from None


def _refuse_second_server(config: Config, path: Path) -> None:
    """A server already answering on this configuration's control socket
    is this configuration's server: say so (with its pid), rather than
    the "port in use" its listeners would give."""
    from mlink.shard.supervisor import query_status

    try:
        status = query_status(config)
    except OSError:
        return
    raise CommandError(f"already running (pid {status.get('pid', '?')}) with {path}; "
                       "stop it first, or `mlink reload` to apply a changed configuration")


def _warn_if_directory_silent(config: Config) -> None:
    """One warning at start when the directory does not answer: the server
    still starts (it retries, and logins work once the directory is back),
    but the administrator should know why logins fail meanwhile."""
    async def ping() -> None:
        from mlink.directory import open_directory

        directory = open_directory(config.directory)
        try:
            with trio.fail_after(DIRECTORY_PROBE_SECONDS):
                await directory.ping()
        finally:
            await directory.aclose()

    try:
        trio.run(ping)
    except (DirectoryError, trio.TooSlowError, OSError) as exc:
        log.warning("the directory does not answer (%s); serving anyway, logins fail until "
                    "it does", exc or "no answer within "
                    f"{DIRECTORY_PROBE_SECONDS:g} s")


def cmd_status(args: argparse.Namespace) -> int:
    from mlink.config import data_dir_hint
    from mlink.shard.supervisor import format_status, request_status

    # Found by its data directory, read leniently as `reload` does: the
    # status (a refused configuration change included) is most wanted
    # when the configuration is broken.
    try:
        status = request_status(data_dir_hint(_config_path(args.config)))
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
    for change in answer.get("listeners", []):
        print(f"{path}: {change}")
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
            return (await _exposed_secrets(directory, config),
                    await _fast_hashes(directory))
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


async def _exposed_secrets(directory: object, config: Config) -> list[str]:
    """Problems with who can read credentials in an LDAP directory: SCRAM
    secrets (and password hashes) must be readable by the service account
    only, or anyone who reads them can log in (SCRAM) or crack them. With
    the configuration held in the directory, its server entry and children
    too: they may hold secrets (a component's, a TURN server's) now or
    after the next `mlink config import`, so the entry itself must not be
    visible, whether or not a secret is in it today."""
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
    if config.configuration.source == "directory":
        entry = config.configuration.entry
        try:
            # objectClass: every entry has it, so an entry shown at all is
            # found, not only one that holds a secret today.
            readable = await directory.port.readable_by("", "", entry, ["objectClass"])
        except Exception as exc:  # noqa: BLE001 - as above
            log.debug("anonymous configuration read check: %s", exc)
            return []
        if readable:
            return [f"anonymous clients can read the server configuration entry "
                    f"{readable[0]}, which may hold secrets: restrict it to the service "
                    "account (see conf/mlink-acl.ldif, docs/directory.md)"]
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
    """`--password`, the first line of `--password-file` (`-`: standard
    input), or else a prompt (twice, on a terminal), else one line of
    standard input (a script piping it)."""
    if args.password is not None:
        password = args.password
    elif args.password_file is not None and str(args.password_file) == "-":
        password = sys.stdin.readline().rstrip("\r\n")
    elif args.password_file is not None:
        try:
            text = args.password_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"{args.password_file}: cannot read: {exc.strerror}") from None
        password = text.splitlines()[0] if text else ""
    elif sys.stdin.isatty():
        import getpass

        try:
            password = getpass.getpass("password: ")
            if password and getpass.getpass("again: ") != password:
                raise CommandError("the two passwords differ")
        except EOFError:
            raise CommandError("no password given") from None
    else:
        password = sys.stdin.readline().rstrip("\r\n")
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
    _end_sessions(config, jid, "your account was deleted", removed=True)
    return 0


def _end_sessions(config: Config, jid: str, text: str, removed: bool = False) -> None:
    """Tell a running server to end `jid`'s sessions on every shard (and,
    `removed`, that the account is gone); no server running is no error
    (nobody is connected then)."""
    from mlink.shard.supervisor import request_end_user

    try:
        reply = request_end_user(config.data_dir, jid, text, removed)
    except OSError:
        return
    if reply.get("ok"):
        print(f"ended {jid}'s sessions on the running server")


def _any_jid(text: str, config: Config) -> str:
    """A bare or full JID of a served domain."""
    try:
        jid = parse_jid(text)
    except InvalidJID as exc:
        raise CommandError(f"invalid JID {text!r}: {exc}") from None
    if not jid.local:
        raise CommandError(f"{text!r} is not a user JID (user@domain[/resource])")
    if jid.domain not in config.domains:
        raise CommandError(f"{jid.domain} is not a domain this server serves")
    return str(jid)


def cmd_session_list(args: argparse.Namespace) -> int:
    """`JID  shard N  ADDRESS` per session, sorted by JID."""
    from mlink.shard.supervisor import request_sessions

    config = _load(args.config)
    user = _bare_jid(args.user, config) if args.user else None
    try:
        reply = request_sessions(config.data_dir, user)
    except OSError as exc:
        raise CommandError(str(exc)) from None
    for one in sorted(reply.get("sessions", []), key=lambda s: (s["jid"], s["shard"])):
        print(f"{one['jid']}  shard {one['shard']}  {one.get('address', '')}".rstrip())
    _warn_unanswered(reply)
    return 0


def cmd_session_kick(args: argparse.Namespace) -> int:
    from mlink.shard.supervisor import request_kick

    config = _load(args.config)
    jid = _any_jid(args.jid, config)
    try:
        reply = request_kick(config.data_dir, jid, args.reason or "ended by an administrator")
    except OSError as exc:
        raise CommandError(str(exc)) from None
    _warn_unanswered(reply)
    ended = reply.get("ended", [])
    if not ended:
        raise CommandError(f"no session of {jid} on the running server")
    for full in ended:
        print(f"ended {full}")
    return 0


def _warn_unanswered(reply: dict[str, Any]) -> None:
    missing: list[int] = reply.get("unanswered") or []
    if missing:
        print(f"mlink: warning: shard(s) {', '.join(map(str, missing))} did not answer",
              file=sys.stderr)


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


def cmd_room(args: argparse.Namespace) -> int:
    """`mlink room list|show|create|destroy` (mlink/admin/rooms.py)."""
    from mlink.admin.rooms import RoomCommandError, run

    if not hasattr(args, "room_action"):
        raise CommandError("room needs an action: list, show, create or destroy")
    config = _load(args.config)
    try:
        lines = run(args, config)
    except RoomCommandError as exc:
        raise CommandError(str(exc)) from None
    for line in lines:
        print(line)
    return 0


# Exit status of an import refused for a problem in its input files.
BAD_INPUT = 2


def cmd_export(args: argparse.Namespace) -> int:
    from mlink.admin.xep0227 import MigrationError, StoreVersionError, run_export
    from mlink.store import StoreError

    config = _load(args.config)
    try:
        summary = trio.run(run_export, config, args.file, args.per_user)
    except (MigrationError, StoreVersionError, StoreError, OSError) as exc:
        raise CommandError(str(exc)) from None
    for jid in summary.without_credentials:
        print(f"mlink: warning: {jid} has no current SCRAM secrets; exported without "
              "credentials", file=sys.stderr)
    where = args.file if not args.per_user else f"{len(summary.files)} files in {args.file}"
    print(f"exported {summary.users} accounts to {where}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from mlink.admin.xep0227 import MigrationError, StoreVersionError, run_import
    from mlink.store import StoreError

    config = _load(args.config)
    try:
        summary, plan = trio.run(run_import, config, args.file)
    except MigrationError as exc:
        print(f"mlink: {exc}", file=sys.stderr)
        return BAD_INPUT
    except (StoreVersionError, StoreError) as exc:
        raise CommandError(str(exc)) from None
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
