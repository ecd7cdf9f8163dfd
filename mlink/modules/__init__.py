"""Features, one module each; `load_modules` registers them on the hooks."""

from __future__ import annotations

from mlink.hooks import Hooks
from mlink.modules import ping

MODULES = (ping,)


def load_modules(hooks: Hooks) -> None:
    for module in MODULES:
        module.register(hooks)
