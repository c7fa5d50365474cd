"""Engine output streams -> HTTP: merging several prompts' streams, collecting a non-streamed
response while watching for the client to leave, and server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from lowbit.runtime.outputs import RequestOutput

from . import responses as rs
from .async_engine import EngineDeadError
from .errors import APIError, error_body

DISCONNECT_POLL_SECONDS = 0.25


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
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


async def until_done(request: Request, outputs: AsyncIterator) -> list:
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


def sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """Events as server-sent events ending in `data: [DONE]`; an engine failure mid-stream is sent
    as an OpenAI-shaped error event (the status line has gone out already)."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except EngineDeadError as e:
            yield f"data: {json.dumps(error_body(str(e), type='server_error'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def chat_events(
    header: rs.Header, stream: AsyncIterator[RequestOutput], strings: rs.TokenStrings, include_usage: bool
) -> AsyncIterator[dict]:
    started: set[int] = set()
    ended: set[int] = set()
    final = None
    async for output in stream:
        final = output
        choices = rs.chat_delta_choices(output, started, strings, ended)
        if choices:
            yield rs.chat_chunk(header, choices, None, include_usage)
    if include_usage and final is not None:
        yield rs.chat_chunk(header, [], rs.usage(final), include_usage=True)


async def completion_events(
    header: rs.Header, merged: AsyncIterator, n: int, strings: rs.TokenStrings, include_usage: bool
) -> AsyncIterator[dict]:
    finals: dict[int, RequestOutput] = {}
    ended: set[int] = set()  # choices whose finish_reason was sent: never sent again
    offsets: dict[int, int] = {}  # each choice's text streamed so far, for text_offset
    async for i, output in merged:
        choices = []
        for c in output.outputs:
            index = i * n + c.index
            if index in ended or not (c.delta_text or c.finished):
                continue
            if c.finished:
                ended.add(index)
            entries = c.logprobs[-len(c.delta_token_ids) :] if c.logprobs and c.delta_token_ids else []
            offset = offsets.get(index, 0)
            offsets[index] = offset + len(c.delta_text)
            choices.append(rs.completion_choice(index, c, c.delta_text, strings, entries, offset))
        if output.finished:
            finals[i] = output
        if choices:
            yield rs.completion_body(header, choices, None, include_usage)
    if include_usage:
        usage = rs.merge_usage([rs.usage(finals[i]) for i in sorted(finals)])
        yield rs.completion_body(header, [], usage, include_usage)
