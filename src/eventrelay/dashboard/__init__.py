"""`eventrelay dashboard`: a small web UI over services' outboxes, inboxes, open sagas and dead letters.

Server-rendered pages on the library's own minimal HTTP layer (`eventrelay.http`): no framework, no script.
It opens each service's store as the `eventrelay` command does (`Service.opened`); a replay runs the handler
in the dashboard's process, with the service's code, like `eventrelay dead-letters replay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence

from eventrelay.dashboard.app import Dashboard
from eventrelay.errors import ConfigurationError
from eventrelay.http import is_loopback
from eventrelay.service import Service

logger = logging.getLogger(__name__)


async def run_dashboard(
    services: Sequence[Service],
    host: str,
    port: int,
    token: str | None,
    on_listening: Callable[[str], object] | None = None,
) -> None:
    """Serve the dashboard until SIGINT or SIGTERM. A token is required unless `host` is loopback.

    `on_listening` is called with the dashboard's URL once it listens (port 0: the port it was given).
    """
    if not token and not is_loopback(host):
        raise ConfigurationError(
            f"The dashboard replays and discards messages: listening on {host} needs --token "
            "(or EVENTRELAY_DASHBOARD_TOKEN), or listen on 127.0.0.1"
        )
    dashboard = Dashboard(services, token or None)
    await dashboard.open()
    server = await dashboard.serve(host, port)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        url = f"http://{host}:{server.sockets[0].getsockname()[1]}/"
        logger.info("Dashboard of %s at %s", ", ".join(s.name for s in services), url)
        if on_listening is not None:
            on_listening(url)
        await stopping.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        server.close()
        await server.wait_closed()
        await dashboard.close()


__all__ = ["Dashboard", "run_dashboard"]
