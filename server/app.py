"""The OpenAI-compatible HTTP app: `build_app` wires the routes (`routes.py`) to one served engine.
Any OpenAI client works against it unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import lowbit

from .async_engine import AsyncEngine
from .errors import install_error_handlers
from .guard import Guard
from .limits import ServerLimits
from .metrics import Metrics
from .routes import router
from .state import ServerState


class _CountRequests:
    """Counts every HTTP request by path and response status (500 when none was sent)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # By route template, not raw path: any number of unknown paths share one series.
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The engine loop runs while the app does; on shutdown (after uvicorn has let in-flight
    responses finish) whatever is left is aborted."""
    async_engine = app.state.lowbit.async_engine
    async_engine.start()
    yield
    await async_engine.stop()


def build_app(
    async_engine: AsyncEngine,
    names: Sequence[str],
    api_key: str | None = None,
    limits: ServerLimits | None = None,
) -> FastAPI:
    """The app serving `async_engine` under the model name(s) `names`; with `api_key`, every route
    but /health and /metrics wants it as a bearer token."""
    limits = limits or ServerLimits()
    app = FastAPI(title="lowbit", version=lowbit.__version__, lifespan=_lifespan)
    app.state.lowbit = state = ServerState(async_engine, names, limits)
    install_error_handlers(app)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_request_bytes)
    # A plain ASGI middleware, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware wraps
    # `receive` so that `request.is_disconnected()` never sees a client leave, and a non-streamed
    # request whose client went away would then be generated to the end for nobody.
    app.add_middleware(_CountRequests, metrics=state.metrics)  # outermost: it counts 401s and 413s too
    app.include_router(router)
    return app
