"""Concurrency and cancellation against a real `lowbit serve` in fp32 (batch-invariant, so a
request's greedy tokens must not depend on what else shares its batches).

16 concurrent streaming clients must each get exactly what its prompt gets alone; clients that
disconnect mid-stream, or a non-streamed request whose client times out, must be aborted, leaving
no running request and the whole KV pool free (read from /metrics), and the server must go on
answering correctly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from .openai_server import MAIN, MODEL, LiveServer, serving

MAX_TOKENS = 10
PROMPTS = [
    "What is the capital of France?",
    "Name three fruits.",
    "Why is the sky blue?",
    "Write a haiku about snow.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "Who wrote Hamlet?",
    "Describe a cat in one sentence.",
    "What is the boiling point of water?",
    "Suggest a name for a dog.",
    "How many legs does a spider have?",
    "What colour is grass?",
    "Translate 'hello' into Spanish.",
    "What is the largest ocean?",
    "Tell me a fun fact about space.",
    "What do bees make?",
]
LONG = 400  # max_tokens of the streams that get abandoned: they would run far past the test
# max_tokens of the abandoned non-streamed requests: a client gives up after 1 s, so anything slower
# than ~1000 tokens/s cannot finish it first (and on this CPU it would take minutes).
VERY_LONG = 1500


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    yield from serving(MAIN)


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


@pytest.fixture(scope="module")
def references(server) -> dict[str, tuple[str, str]]:
    """Each prompt's greedy (text, finish_reason), requested alone, one after the other."""
    server.wait_idle()
    refs = {}
    with server.client() as client:
        for prompt in PROMPTS:
            reply = client.chat.completions.create(
                model=MODEL, messages=messages(prompt), temperature=0, max_tokens=MAX_TOKENS
            )
            refs[prompt] = (reply.choices[0].message.content, reply.choices[0].finish_reason)
    assert len({text for text, _ in refs.values()}) == len(PROMPTS), "prompts must give distinct answers"
    return refs


async def stream_chat(client, prompt: str, max_tokens: int = MAX_TOKENS, leave_after: int | None = None):
    """Stream one greedy chat completion: (text, finish_reasons, chunks seen). With `leave_after`,
    close the stream (disconnect) after that many chunks."""
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages(prompt), temperature=0, max_tokens=max_tokens, stream=True,
        extra_body={"ignore_eos": leave_after is not None},
    )  # fmt: skip
    text, reasons, seen = "", [], 0
    async for chunk in stream:
        seen += 1
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
        if leave_after is not None and seen >= leave_after:
            await stream.close()
            break
    return text, reasons, seen


async def peak_running(server: LiveServer, stop: asyncio.Event) -> int:
    """The most requests /metrics showed running at once until `stop`."""
    peak = 0
    async with httpx.AsyncClient(timeout=10) as http:
        while not stop.is_set():
            text = (await http.get(f"{server.url}/metrics")).text
            for line in text.splitlines():
                if line.startswith("lowbit_num_requests_running "):
                    peak = max(peak, int(float(line.split()[1])))
            await asyncio.sleep(0.05)
    return peak


def test_concurrent_streams_equal_lone_results(server, references):
    async def main():
        stop = asyncio.Event()
        watcher = asyncio.create_task(peak_running(server, stop))
        async with server.async_client() as client:
            results = await asyncio.wait_for(asyncio.gather(*(stream_chat(client, p) for p in PROMPTS)), 120)
        stop.set()
        return results, await watcher

    results, peak = asyncio.run(main())
    for prompt, (text, reasons, _) in zip(PROMPTS, results, strict=True):
        ref_text, ref_reason = references[prompt]
        assert (text, reasons) == (ref_text, [ref_reason]), prompt
    assert peak >= 2, "the requests should have been batched together"
    server.wait_idle()


def test_disconnecting_clients_are_aborted(server, references):
    """Half of 16 streaming clients leave after 2-3 chunks (each would otherwise run for LONG
    tokens); the other half still get their exact answers and the pool ends up entirely free."""
    before = server.metrics()

    async def main():
        async with server.async_client() as client:
            jobs = [
                stream_chat(client, p, max_tokens=LONG, leave_after=2 + i // 2 % 2)
                if i % 2 == 0
                else stream_chat(client, p)
                for i, p in enumerate(PROMPTS)
            ]
            return await asyncio.wait_for(asyncio.gather(*jobs), 120)

    results = asyncio.run(main())
    for i, (prompt, (text, reasons, seen)) in enumerate(zip(PROMPTS, results, strict=True)):
        if i % 2 == 0:
            assert seen == 2 + i // 2 % 2 and reasons == [], prompt
        else:
            assert (text, reasons) == (references[prompt][0], [references[prompt][1]]), prompt

    after = server.wait_idle(timeout=30)
    generated = after.get("lowbit_generation_tokens_total") - before.get("lowbit_generation_tokens_total")
    assert generated < 8 * MAX_TOKENS + 8 * LONG / 4, f"{generated} tokens: abandoned requests ran on"
    assert after.get("lowbit_kv_blocks_used") == 0

    # and the server still answers, correctly
    with server.client() as client:
        reply = client.chat.completions.create(
            model=MODEL, messages=messages(PROMPTS[0]), temperature=0, max_tokens=MAX_TOKENS
        )
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == references[PROMPTS[0]]
    assert "Paris" in reply.choices[0].message.content


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_non_streamed_request_of_a_departed_client_is_aborted(server, endpoint):
    """A client that times out on a long non-streamed generation closes its connection; the
    server must stop generating for it, not run to max_tokens."""
    server.wait_idle()
    before = server.metrics()
    body = {"model": MODEL, "max_tokens": VERY_LONG, "ignore_eos": True, "temperature": 0}
    if endpoint == "/v1/chat/completions":
        body["messages"] = messages("Tell me a very long story.")
    else:
        body["prompt"] = "Once upon a time"
    started = time.monotonic()
    with server.http(timeout=1.0) as http, pytest.raises(httpx.ReadTimeout):
        http.post(endpoint, json=body)
    server.wait_idle(timeout=15)
    freed_after = time.monotonic() - started
    after = server.metrics()

    generated = after.get("lowbit_generation_tokens_total") - before.get("lowbit_generation_tokens_total")
    assert generated < VERY_LONG / 2, f"{generated} tokens generated for a client that left after 1 s"
    assert freed_after < 10
    counted = after.get("lowbit_requests_total", 0.0, endpoint=endpoint, status="499") - before.get(
        "lowbit_requests_total", 0.0, endpoint=endpoint, status="499"
    )
    assert counted == 1, "the abandoned request is counted as 499 (client closed request)"
