"""The OpenAI-compatible HTTP app: /v1/chat/completions, /v1/completions, /v1/models, /health,
/metrics, /tokenize, /detokenize. Any OpenAI client works against it unchanged."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import lowbit
from lowbit.runtime.outputs import RequestOutput

from . import requests as rq
from . import responses as rs
from .async_engine import AsyncEngine, EngineDeadError
from .errors import APIError, error_body, from_value_error, install_error_handlers
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

DISCONNECT_POLL_SECONDS = 0.25


class ServerState:
    def __init__(self, async_engine: AsyncEngine, names: Sequence[str], api_key: str | None):
        self.async_engine = async_engine
        self.engine = async_engine.engine
        self.tokenizer = self.engine.tokenizer
        self.strings = rs.TokenStrings(self.tokenizer)
        self.names = list(names)
        self.api_key = api_key
        self.metrics = Metrics(self.engine)
        self.created = int(time.time())
        e = self.engine
        identity = f"{lowbit.__version__}|{e.checkpoint_source}|{e.dtype}|{e.kv_spec.dtype}"
        self.fingerprint = "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:10]

    def header(self, prefix: str, model: str) -> rs.Header:
        return rs.Header(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model, self.fingerprint)

    def check_model(self, model: str) -> None:
        if model not in self.names:
            raise APIError(
                f"The model `{model}` does not exist. Served: {self.names}", 404, "model", "model_not_found"
            )

    def start(self, prompt: list[int], params, request_id: str) -> AsyncIterator[RequestOutput]:
        """Validate and queue one generation; every problem is a 400 before anything streams."""
        try:
            stream = self.async_engine.generate(prompt, params, request_id)
        except ValueError as e:
            raise from_value_error(e, "messages") from None
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


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Several prompts' outputs as they come, tagged with the prompt's index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                queue.put_nowait((i, output))
        except Exception as e:  # handed to the consumer, raised there
            queue.put_nowait((i, e))
            return
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_done(request: Request, outputs: AsyncIterator) -> list:
    """Collect a non-streamed response; if the client goes away first, abandon it (the request
    is aborted and its KV blocks freed) instead of generating for nobody."""

    async def collect() -> list:
        return [item async for item in outputs]

    task = asyncio.ensure_future(collect())
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise APIError("client disconnected", 499)


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except EngineDeadError as e:
            yield f"data: {json.dumps(error_body(str(e), type='server_error'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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
            self.metrics.requests.labels(scope["path"], str(status)).inc()


def build_app(async_engine: AsyncEngine, names: Sequence[str], api_key: str | None = None) -> FastAPI:
    state = ServerState(async_engine, names, api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        yield
        await async_engine.stop()

    app = FastAPI(title="lowbit", version=lowbit.__version__, lifespan=lifespan)
    app.state.lowbit = state
    install_error_handlers(app)

    # A plain ASGI middleware, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware wraps
    # `receive` so that `request.is_disconnected()` never sees a client leave, and a non-streamed
    # request whose client went away would then be generated to the end for nobody.
    app.add_middleware(_CountRequests, metrics=state.metrics)

    async def authorized(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer ") or header[7:].strip() != state.api_key:
            what = "You didn't provide an API key" if not header else "Incorrect API key provided"
            raise APIError(f"{what}. Pass it as 'Authorization: Bearer <key>'.", 401, None, "invalid_api_key")

    guarded = [Depends(authorized)]

    @app.get("/health")
    async def health() -> Response:
        if async_engine.error is not None:
            return JSONResponse(
                error_body(f"engine failed: {async_engine.error!r}", type="server_error"), 503
            )
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        card = {"object": "model", "created": state.created, "owned_by": "lowbit"}
        data = [{"id": name, **card, "max_model_len": state.engine.max_model_len} for name in state.names]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        state.check_model(body.model)
        prompt = rq.chat_prompt(body, state.tokenizer)
        params = rq.chat_sampling_params(body)
        header = state.header("chatcmpl", body.model)
        stream = state.start(prompt, params, header.id)
        if not body.stream:
            outputs = await _until_done(request, stream)
            return rs.chat_completion(header, outputs[-1], state.strings)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(_chat_events(state, header, stream, include_usage))

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        state.check_model(body.model)
        prompts = rq.completion_prompts(body, state.tokenizer)
        params = rq.completion_sampling_params(body)
        header = state.header("cmpl", body.model)
        streams = [state.start(p, params, f"{header.id}-{i}") for i, p in enumerate(prompts)]
        n = params.n
        if not body.stream:
            finals: dict[int, RequestOutput] = {}
            for i, output in await _until_done(request, _merge(streams)):
                finals[i] = output
            choices = [
                rs.completion_choice(i * n + c.index, c, c.text, state.strings)
                for i in sorted(finals)
                for c in finals[i].outputs
            ]
            return rs.completion_body(
                header, choices, rs.merge_usage([rs.usage(finals[i]) for i in sorted(finals)])
            )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(_completion_events(state, header, _merge(streams), n, include_usage))

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeRequest) -> dict:
        if body.model is not None:
            state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError("give exactly one of prompt and messages", 400, "prompt")
        if body.prompt is not None:
            tokens = state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            chat = ChatCompletionRequest(
                model=body.model or state.names[0],
                messages=body.messages,
                add_generation_prompt=body.add_generation_prompt,
            )
            tokens = rq.chat_prompt(chat, state.tokenizer)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.engine.max_model_len}

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(body: DetokenizeRequest) -> dict:
        if body.model is not None:
            state.check_model(body.model)
        vocab = state.engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(f"tokens must be ids in [0, {vocab})", 400, "tokens")
        return {"prompt": state.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    return app


async def _chat_events(
    state: ServerState, header: rs.Header, stream: AsyncIterator[RequestOutput], include_usage: bool
) -> AsyncIterator[dict]:
    started: set[int] = set()
    final = None
    async for output in stream:
        final = output
        choices = rs.chat_delta_choices(output, started, state.strings)
        if choices:
            yield rs.chat_chunk(header, choices, None, include_usage)
    if include_usage and final is not None:
        yield rs.chat_chunk(header, [], rs.usage(final), include_usage=True)


async def _completion_events(
    state: ServerState, header: rs.Header, merged: AsyncIterator, n: int, include_usage: bool
) -> AsyncIterator[dict]:
    finals: dict[int, RequestOutput] = {}
    async for i, output in merged:
        choices = []
        for c in output.outputs:
            if c.delta_text or c.finished:
                entries = c.logprobs[-len(c.delta_token_ids) :] if c.logprobs and c.delta_token_ids else []
                choices.append(rs.completion_choice(i * n + c.index, c, c.delta_text, state.strings, entries))
        if output.finished:
            finals[i] = output
        if choices:
            yield rs.completion_body(header, choices, None, include_usage)
    if include_usage:
        usage = rs.merge_usage([rs.usage(finals[i]) for i in sorted(finals)])
        yield rs.completion_body(header, [], usage, include_usage)
