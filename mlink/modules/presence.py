"""(being written)"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlink.server import Server


def register(server: Server) -> None:
    return None
