"""Graceful shutdown: on SIGTERM stop admitting, let what is in flight finish within the grace
period, then end the rest cleanly, before uvicorn's own deadline would cut their connections.

uvicorn on its own waits `timeout_graceful_shutdown` for connections to close and then cancels
their tasks: streams ended in an incomplete chunked read (no finish_reason, no `[DONE]`), a
non-streamed request got a plain-text 500, and the log filled with CancelledError tracebacks.
Here the engine's requests are aborted a little before that deadline: every stream then ends on
an output with finish_reason "abort" and `data: [DONE]`, and a non-streamed request gets an
OpenAI error body (503), so every connection closes on its own.
"""

from __future__ import annotations

import asyncio
import time

import uvicorn
from fastapi import FastAPI

from .state import ServerState

MARGIN_SECONDS = 1.0  # before uvicorn's deadline: time for the aborted responses to go out
POLL_SECONDS = 0.05


def drain_deadline(grace: float) -> float:
    """Seconds after the signal at which what is still running gets aborted."""
    return max(grace - MARGIN_SECONDS, grace / 2)


async def drain(app: FastAPI, grace: float) -> None:
    """Refuse new requests, wait for those in flight, abort what is left at the deadline."""
    state: ServerState = app.state.lowbit
    state.draining = True
    engine = state.async_engine
    deadline = time.monotonic() + drain_deadline(grace)
    while engine.num_in_flight and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
    engine.abort_all()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on the exit signal also starts `drain` on the served app."""

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: object) -> None:
        loop = getattr(self, "_loop", None)
        if not self.should_exit and loop is not None:
            grace = self.config.timeout_graceful_shutdown or 0
            loop.call_soon_threadsafe(lambda: loop.create_task(drain(self.config.app, grace)))
        super().handle_exit(sig, frame)
