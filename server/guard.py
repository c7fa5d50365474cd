"""The door: the API key and the body size are checked before a request's body is read.

FastAPI reads and parses a body before it runs any route dependency, so a check there comes too
late: a 200 MB body without a key was read in full (+484 MB resident) before its 401. This ASGI
middleware answers 401 from the headers alone, 413 from the Content-Length header or as soon as a
chunked body passes the limit, and hands the route a body it has already bounded.
"""

from __future__ import annotations

import json
from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body

OPEN_PATHS = ("/health", "/metrics")  # answer without a key (probes, scrapers)


class Guard:
    def __init__(
        self, app: ASGIApp, api_key: str | None, max_body_bytes: int, open_paths: Collection[str] = OPEN_PATHS
    ):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"] not in self.open_paths and (refusal := self._unauthorized(headers)):
            await _reply(send, 401, refusal, "invalid_api_key")
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await _reply(send, 413, self._too_large(), "request_too_large")
            return
        body = await self._read_body(receive)
        if body is None:
            await _reply(send, 413, self._too_large(), "request_too_large")
            return
        await self.app(scope, _replay(body, receive), send)

    def _unauthorized(self, headers: dict[str, str]) -> str | None:
        if self.api_key is None:
            return None
        header = headers.get("authorization", "")
        if header.lower().startswith("bearer ") and header[7:].strip() == self.api_key:
            return None
        what = "You didn't provide an API key" if not header else "Incorrect API key provided"
        return f"{what}. Pass it as 'Authorization: Bearer <key>'."

    def _too_large(self) -> str:
        return f"The request body is larger than this server's limit of {self.max_body_bytes} bytes."

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes the limit (the rest is not read)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once, then the client's own messages (so a disconnect is still seen)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(message, None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
