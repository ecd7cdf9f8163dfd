"""`mlink config export|import`: move a configuration between an XML file
and the directory (`mlink.config_directory`).

Both act on the server entry the bootstrap file names (`--config`, whose
`<configuration source="directory" entry="DN"/>` says where it is):

- `export FILE` writes the configuration held there as a standalone XML
  file (source="file", the bootstrap's `<directory>` and `<data>` kept), so
  it can run a server on its own or be edited and imported again;
- `import FILE` checks FILE as `mlink check` would (`file:line: problem`,
  nothing written when it fails), checks that the result reads back from
  the directory, then makes the server entry's subtree hold it. A running
  server applies it live (the supervisor follows the subtree), reporting
  settings that need a restart in its log.

FILE's own `<directory>`, `<data>` and `<configuration>` are not imported:
they are the bootstrap file's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from mlink.config import ConfigError
from mlink.config_model import Config, ConfigurationSourceConfig

if TYPE_CHECKING:
    from mlink.config_directory import Bootstrap
    from mlink.directory.ldif import Entry

# An exported file is owner-only: it may hold an LDAP bind password (from
# the bootstrap) or a module's secret (external_services' TURN secret),
# and which options are secrets is the modules' business, not ours.
EXPORT_FILE_MODE = 0o600


class ConfigCommandError(Exception):
    """One line for the user; exit status 1."""


def add_parsers(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """The `config` command and its actions; the caller sets its `func`."""
    cmd: argparse.ArgumentParser = sub.add_parser(
        "config", help="move the configuration between an XML file and the directory")
    actions = cmd.add_subparsers(metavar="ACTION")
    export = actions.add_parser("export", help="write the directory's configuration to FILE "
                                               "(- for standard output)")
    export.add_argument("file", metavar="FILE")
    export.add_argument("--force", action="store_true", help="replace FILE if it exists")
    export.add_argument("--config", type=Path, help="the bootstrap file (source=\"directory\")")
    export.set_defaults(action="export")
    imp = actions.add_parser("import", help="check FILE and write it into the directory")
    imp.add_argument("file", type=Path, metavar="FILE")
    imp.add_argument("--config", type=Path, help="the bootstrap file (source=\"directory\")")
    imp.set_defaults(action="import")
    return cmd


def run(args: argparse.Namespace, bootstrap: Path) -> int:
    """Run the action in `args` against the bootstrap file `bootstrap`."""
    action = getattr(args, "action", None)
    if action == "export":
        return export_config(bootstrap, str(args.file), force=args.force)
    if action == "import":
        return import_config(bootstrap, Path(args.file))
    raise ConfigCommandError("config: give an action: export FILE or import FILE")


def _standalone(config: Config) -> Config:
    return dataclasses.replace(config, configuration=ConfigurationSourceConfig())


def export_config(bootstrap: Path, target: str, *, force: bool = False) -> int:
    from mlink.config import load_config
    from mlink.config_directory import bootstrap_of
    from mlink.config_render import render_config

    boot = bootstrap_of(bootstrap)  # a clear error when --config is no bootstrap file
    config = _standalone(load_config(bootstrap))
    if target == "-":
        sys.stdout.write(render_config(config, Path(bootstrap).parent))
        return 0
    path = Path(target)
    text = render_config(config, path.parent)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, EXPORT_FILE_MODE)
    except FileExistsError:
        raise ConfigCommandError(f"{path}: exists (use --force to replace it)") from None
    except OSError as exc:
        raise ConfigCommandError(f"{path}: cannot write: {exc.strerror or exc}") from None
    os.fchmod(fd, EXPORT_FILE_MODE)  # --force over a file that was readable
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"exported {boot.url}/{boot.source.entry} to {path}")
    return 0


def import_config(bootstrap: Path, source: Path) -> int:
    from mlink.config_directory import bootstrap_of, build_config, config_entries
    from mlink.reload import load_checked

    boot = bootstrap_of(bootstrap)
    new = load_checked(source)
    if new.configuration.source == "directory":
        raise ConfigCommandError(f"{source}: is a bootstrap file (source=\"directory\"); "
                                 "import a complete configuration file")
    entries = config_entries(new, boot.source.entry, boot.path.parent)
    # What the server will read back: refused here, before anything is
    # written, if the bootstrap and the imported settings do not go
    # together (a path that only made sense beside FILE, say).
    try:
        build_config(boot, entries)
    except ConfigError as exc:
        raise ConfigCommandError(f"{source}: would not load from the directory: {exc}") from None
    count = trio.run(_write, boot, entries)
    where = f"{boot.url}/{boot.source.entry}"
    if count == 0:
        print(f"{where}: already holds this configuration")
    else:
        print(f"imported {source} into {where} ({count} change(s)); a running server "
              f"applies it within {boot.directory.changes_seconds:g} s")
    return 0


async def _write(boot: Bootstrap, entries: list[Entry]) -> int:
    from mlink.config_directory import write_entries
    from mlink.directory import open_directory
    from mlink.directory.base import DirectoryError

    directory = open_directory(boot.directory)
    try:
        return await write_entries(directory.port,  # type: ignore[attr-defined]
                                   boot.source.entry, entries)
    except DirectoryError as exc:
        raise ConfigCommandError(f"{boot.url}/{boot.source.entry}: cannot write the "
                                 f"configuration: {exc}") from None
    finally:
        await directory.aclose()
