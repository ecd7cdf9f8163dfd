"""The web console (docs/console.md): administration pages, self-service
and `/metrics`, served by the supervisor process on its own HTTPS listener.

Why the supervisor: it is one process (sessions of the console live in one
place), it already asks every shard for its status, sessions and kicks
through the control ops, and it is a Trio loop, which Hypercorn's Trio
worker serves an ASGI application in. The web stack (Starlette, Hypercorn,
Jinja2, prometheus_client) is imported only when `<console>` is configured,
so shards and servers without a console do not carry it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from mlink.shard.supervisor import Supervisor

log = logging.getLogger(__name__)


async def serve_console(supervisor: Supervisor,
                        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the console until cancelled; started once it listens."""
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve

    from mlink.console.app import Console

    config = supervisor.config
    console = Console(supervisor)
    hc = HypercornConfig()
    address = config.console.address
    host = f"[{address}]" if ":" in address else address
    hc.bind = [f"{host}:{config.console.port}"]
    assert config.tls.certificate is not None and config.tls.key is not None
    hc.certfile, hc.keyfile = str(config.tls.certificate), str(config.tls.key)
    hc.accesslog = None
    hc.errorlog = logging.getLogger("mlink.console.http")
    hc.include_server_header = False
    # Forms are small; a larger body is refused before it is parsed.
    hc.h11_max_incomplete_size = 64 * 1024
    try:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve, console.app, hc)
            for bind in binds:
                log.info("console listening on %s", bind)
            task_status.started()
    finally:
        with trio.CancelScope(shield=True):
            await console.aclose()
