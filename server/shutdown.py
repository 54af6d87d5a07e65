"""Graceful shutdown. On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits for the
responses in flight; left to itself it would then cancel the ones still running, cutting streams
mid-chunk. Here the requests still running when the grace period ends are aborted through the
engine first, so every client gets a well-formed end (an error event and [DONE], or a 503) and the
KV blocks come back before the process exits."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

import uvicorn

logger = logging.getLogger(__name__)
FLUSH_S = 2.0  # after the abort, time for the error events to reach the clients


class DrainingServer(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, grace_s: float, abort: Callable[[], Awaitable[None]]
    ) -> None:
        config.timeout_graceful_shutdown = int(grace_s + FLUSH_S + 1)  # uvicorn's cut comes last
        super().__init__(config)
        self.grace_s, self.abort = grace_s, abort

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        aborter = asyncio.create_task(self._abort_after_grace())
        try:
            await super().shutdown(sockets)
        finally:
            aborter.cancel()

    async def _abort_after_grace(self) -> None:
        await asyncio.sleep(self.grace_s)
        if self.server_state.connections:
            logger.warning(
                "grace period of %g s over: aborting the requests still running", self.grace_s
            )
            await self.abort()
