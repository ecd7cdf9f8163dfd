"""Features, one module each, loaded by name from the configuration.

A module is a file with `setup(module: mlink.module.Module) -> None`: it
declares the disco features it adds and hooks the events it handles (see
`mlink.hooks`), through its own `Module` context, never the server. The
configuration's `<modules>` section turns default modules off and names
others by import path; without it, `DEFAULT_MODULES` run. A module may
define `OPTIONS`, a dataclass of its settings (see docs/modules.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

from mlink.config_model import DEFAULT_MODULES
from mlink.module import Module

if TYPE_CHECKING:
    from mlink.module import ModuleHost

__all__ = ["DEFAULT_MODULES", "ModuleLoadError", "import_module_file", "load_modules"]


class ModuleLoadError(Exception):
    """A configured module cannot be imported or has no `setup`."""


def import_module_file(name: str) -> ModuleType:
    """`name` is one of ours ("carbons") or an import path ("acme.audit")."""
    path = name if "." in name else f"mlink.modules.{name}"
    try:
        found = importlib.import_module(path)
    except ImportError as exc:
        raise ModuleLoadError(f"unknown module {name!r}: {exc}") from None
    if not callable(getattr(found, "setup", None)):
        raise ModuleLoadError(f"module {name!r} has no setup(module) function")
    return found


def load_modules(host: ModuleHost, names: Sequence[str] | None = None) -> list[Module]:
    """Set up each named module (the default set when None) with its own
    context; returns the contexts, in load order."""
    contexts: list[Module] = []
    for name in DEFAULT_MODULES if names is None else names:
        context = Module(name, host)
        import_module_file(name).setup(context)
        contexts.append(context)
    return contexts
