"""The routes: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics, /tokenize,
/detokenize. Each handler finds what it serves with on `request.app.state` (`server_state`), so
the handlers are plain module-level functions and `build_app` only wires them up. The API key and
the body size are checked before any of them runs (server/guard.py). Tokenization runs in a worker
thread: a large prompt takes seconds, and on the event loop it would stall every other request."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from lowbit.runtime.outputs import RequestOutput

from . import requests as rq
from . import responses as rs
from . import streams
from .errors import APIError, error_body
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .state import server_state, shutting_down

router = APIRouter()


def _aborted(output: RequestOutput) -> bool:
    return any(c.finish_reason == "abort" for c in output.outputs)


@router.get("/health")
async def health(request: Request) -> Response:
    error = server_state(request).async_engine.error
    if error is not None:
        return JSONResponse(error_body(f"engine failed: {error!r}", type="server_error"), 503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    state = server_state(request)
    return {"object": "list", "data": [state.model_card(name) for name in state.names]}


@router.get("/v1/models/{model:path}")
async def model(model: str, request: Request) -> dict:
    state = server_state(request)
    state.check_model(model)
    return state.model_card(model)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = server_state(request)
    state.check_model(body.model)
    rq.check_chat_features(body)
    params = rq.chat_sampling_params(body)
    state.limits.check(1, params.n, body.stop)
    prompt = await run_in_threadpool(rq.chat_prompt, body, state.tokenizer)
    header = state.header("chatcmpl", body.model)
    stream = state.start(prompt, params, header.id, "messages")
    if not body.stream:
        outputs = await streams.until_done(request, stream)
        if state.draining and _aborted(outputs[-1]):
            raise shutting_down()
        return rs.chat_completion(header, outputs[-1], state.strings)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return streams.sse(streams.chat_events(header, stream, state.strings, include_usage))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = server_state(request)
    state.check_model(body.model)
    rq.check_completion_features(body)
    params = rq.completion_sampling_params(body)
    state.limits.check(rq.prompt_count(body), params.n, body.stop)
    prompts = await run_in_threadpool(rq.completion_prompts, body, state.tokenizer)
    header = state.header("cmpl", body.model)
    started = [state.start(p, params, f"{header.id}-{i}", "prompt") for i, p in enumerate(prompts)]
    n = params.n
    if not body.stream:
        finals: dict[int, RequestOutput] = {}
        for i, output in await streams.until_done(request, streams.merge(started)):
            finals[i] = output
        if state.draining and any(_aborted(f) for f in finals.values()):
            raise shutting_down()
        choices = [
            rs.completion_choice(i * n + c.index, c, c.text, state.strings)
            for i in sorted(finals)
            for c in finals[i].outputs
        ]
        usage = rs.merge_usage([rs.usage(finals[i]) for i in sorted(finals)])
        return rs.completion_body(header, choices, usage)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = streams.completion_events(header, streams.merge(started), n, state.strings, include_usage)
    return streams.sse(events)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    state = server_state(request)
    if body.model is not None:
        state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError("give exactly one of prompt and messages", 400, "prompt")
    if body.prompt is not None:
        tokens = await run_in_threadpool(state.tokenizer.encode, body.prompt, body.add_special_tokens)
    else:
        chat = ChatCompletionRequest(
            model=body.model or state.names[0],
            messages=body.messages,
            add_generation_prompt=body.add_generation_prompt,
        )
        tokens = await run_in_threadpool(rq.chat_prompt, chat, state.tokenizer)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": state.info.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state = server_state(request)
    if body.model is not None:
        state.check_model(body.model)
    vocab = state.info.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(f"tokens must be ids in [0, {vocab})", 400, "tokens")
    text = await run_in_threadpool(state.tokenizer.decode, body.tokens, False)
    return {"prompt": text}
