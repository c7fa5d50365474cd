"""Soak scenario for `lowbit serve` (benchmarks/serve.py --soak MINUTES): a mixed load for N
minutes, then throughput, TTFT/ITL percentiles, errors (must be 0) and the server's RSS.

Each of `clients` loops: a prompt of 1-400 words, chat or legacy completions, streamed (70%) or
not, max_tokens 8-128; 10% of streams are dropped by the client after a few chunks (a disconnect
the server must absorb). Any HTTP status other than 200, or a stream without `[DONE]` that was not
dropped on purpose, is an error.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "rivers", "run"]


@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)  # streamed: to the first chunk
    itl: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)  # not streamed: to the whole answer
    requests: int = 0
    tokens: int = 0
    dropped: int = 0
    errors: list[str] = field(default_factory=list)


def _body(rng: random.Random, model: str, stream: bool) -> tuple[str, dict]:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 400)))
    common = {"model": model, "max_tokens": rng.randint(8, 128), "temperature": 0.8, "stream": stream}
    if rng.random() < 0.5:
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**common, "prompt": prompt}


async def _streamed(client: httpx.AsyncClient, path: str, body: dict, drop: bool, tally: Tally) -> None:
    start, last, chunks, done = time.perf_counter(), None, 0, False
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            tally.errors.append(f"{path} {response.status_code} {(await response.aread())[:200]!r}")
            return
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
                continue
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                tally.errors.append(f"{path} error event {event}")
                return
            now = time.perf_counter()
            if last is None:
                tally.ttft.append(now - start)
            else:
                tally.itl.append(now - last)
            last, chunks = now, chunks + 1
            if drop and chunks == 3:
                tally.dropped += 1
                return  # leaving the block closes the connection mid-stream
    if not done:
        tally.errors.append(f"{path}: stream ended without [DONE]")
        return
    tally.requests += 1
    tally.tokens += chunks


async def _plain(client: httpx.AsyncClient, path: str, body: dict, tally: Tally) -> None:
    start = time.perf_counter()
    response = await client.post(path, json=body)
    if response.status_code != 200:
        tally.errors.append(f"{path} {response.status_code} {response.text[:200]}")
        return
    tally.latency.append(time.perf_counter() - start)
    tally.requests += 1
    tally.tokens += response.json()["usage"]["completion_tokens"]


async def soak(url: str, model: str, clients: int, minutes: float, seed: int = 0) -> tuple[Tally, float]:
    tally = Tally()
    deadline = time.perf_counter() + 60 * minutes

    async def client_loop(c: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + c)
        while time.perf_counter() < deadline:
            stream = rng.random() < 0.7
            path, body = _body(rng, model, stream)
            try:
                if stream:
                    await _streamed(client, path, body, rng.random() < 0.1, tally)
                else:
                    await _plain(client, path, body, tally)
            except httpx.HTTPError as e:
                tally.errors.append(f"{path}: {e!r}")

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
        return tally, time.perf_counter() - start


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
