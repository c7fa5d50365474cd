"""`ServerState`: what every route handler shares, kept on `app.state.lowbit` by `build_app`."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from fastapi import Request

import lowbit
from lowbit.runtime.outputs import RequestOutput

from . import responses as rs
from .async_engine import AsyncEngine, EngineDeadError
from .errors import APIError, from_value_error
from .limits import ServerLimits
from .metrics import Metrics


class ServerState:
    def __init__(self, async_engine: AsyncEngine, names: Sequence[str], limits: ServerLimits):
        self.async_engine = async_engine
        self.info = async_engine.info
        self.tokenizer = async_engine.engine.tokenizer
        self.strings = rs.TokenStrings(self.tokenizer)
        self.names = list(names)
        self.limits = limits
        self.draining = False  # shutting down: new requests are refused (server/shutdown.py)
        self.metrics = Metrics(async_engine.engine.stats)
        self.created = int(time.time())
        info = self.info
        identity = f"{lowbit.__version__}|{info.source}|{info.dtype}|{info.kv_cache_dtype}"
        self.fingerprint = "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:10]

    def header(self, prefix: str, model: str) -> rs.Header:
        return rs.Header(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model, self.fingerprint)

    def check_model(self, model: str) -> None:
        if model not in self.names:
            raise APIError(
                f"The model `{model}` does not exist. Served: {self.names}", 404, "model", "model_not_found"
            )

    def model_card(self, name: str) -> dict:
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "lowbit"}
        # The context one request can really get: a KV pool smaller than the context caps it.
        return {**card, "max_model_len": min(self.info.max_model_len, self.info.kv_tokens)}

    def start(
        self, prompt: list[int], params, request_id: str, prompt_param: str
    ) -> AsyncIterator[RequestOutput]:
        """Validate and queue one generation; every problem is a 400 before anything streams
        (one about the prompt names `prompt_param`: "messages" or "prompt")."""
        if self.draining:
            raise shutting_down()
        try:
            stream = self.async_engine.generate(prompt, params, request_id)
        except ValueError as e:
            raise from_value_error(e, prompt_param) from None
        except EngineDeadError as e:
            raise APIError(str(e), 503, type="server_error") from None
        self.metrics.prompt_tokens.inc(len(prompt))
        return self._observed(stream, time.perf_counter())

    async def _observed(
        self, stream: AsyncIterator[RequestOutput], started: float
    ) -> AsyncIterator[RequestOutput]:
        """Pass outputs through, recording time to first token and inter-token latency."""
        self.metrics.in_flight.inc()
        last, seen = None, 0
        try:
            async for output in stream:
                now = time.perf_counter()
                count = sum(len(c.token_ids) for c in output.outputs)
                new, seen = count - seen, count
                if last is None:
                    self.metrics.ttft.observe(now - started)
                elif new:
                    for _ in range(new):
                        self.metrics.itl.observe((now - last) / new)
                self.metrics.generation_tokens.inc(new)
                last = now
                yield output
        finally:
            self.metrics.in_flight.dec()


def shutting_down() -> APIError:
    return APIError("The server is shutting down; retry on another instance.", 503, type="server_error")


def server_state(request: Request) -> ServerState:
    """The state of the app serving `request`."""
    return request.app.state.lowbit
