"""Load test of `lowbit serve`: requests/s, tokens/s, time to first token and inter-token latency
at several concurrency levels, through the real HTTP server with SSE streaming.

    python benchmarks/serve.py                          # starts a server on the default model
    python benchmarks/serve.py --url http://127.0.0.1:8000 --model NAME   # an already running one
    python benchmarks/serve.py --soak 10 --clients 16   # mixed load for 10 minutes (serve_soak.py)

Each client streams chat completions back to back (greedy, `--tokens` tokens each, distinct
prompts); a level runs `--requests-per-client` requests per client. TTFT is request start to the
first content chunk; ITL is the gap between content chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import httpx
from serve_soak import rss_mib, soak

TOPICS = ["the sea", "a city", "mountains", "a river", "the moon", "a forest", "trains", "bread"]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int, out: dict) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.perf_counter()
    last = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if not chunk["choices"] or not chunk["choices"][0]["delta"].get("content"):
                continue
            now = time.perf_counter()
            if last is None:
                out["ttft"].append(now - start)
            else:
                out["itl"].append(now - last)
            last = now
            out["chunks"] += 1
    out["requests"] += 1


async def _level(url: str, model: str, clients: int, per_client: int, tokens: int) -> dict:
    out = {"ttft": [], "itl": [], "chunks": 0, "requests": 0}

    async def client_loop(c: int, client: httpx.AsyncClient) -> None:
        for r in range(per_client):
            prompt = f"Write about {TOPICS[(c + r) % len(TOPICS)]}, story number {c * per_client + r}."
            await _one(client, url, model, prompt, tokens, out)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
        out["seconds"] = time.perf_counter() - start
    return out


def _start_server(port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lowbit.cli", "serve", "--port", str(port), *extra]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("server did not come up")


def _report_soak(url: str, model: str, clients: int, minutes: float, server) -> None:
    before = rss_mib(server.pid) if server else float("nan")
    tally, seconds = asyncio.run(soak(url, model, clients, minutes))
    after = rss_mib(server.pid) if server else float("nan")
    ttft = [1000 * _percentile(tally.ttft, q) for q in (0.5, 0.9, 0.99)]
    itl = [1000 * _percentile(tally.itl, q) for q in (0.5, 0.9, 0.99)]
    rate, token_rate = tally.requests / seconds, tally.tokens / seconds
    print(
        f"{minutes:g} min, {clients} clients: {tally.requests} requests ({rate:.2f}/s), "
        f"{tally.tokens} tokens ({token_rate:.1f}/s), {tally.dropped} dropped on purpose"
    )
    latency = [1000 * _percentile(tally.latency, q) for q in (0.5, 0.9, 0.99)]

    def row(values: list[float]) -> str:
        return " / ".join(f"{v:.0f}" for v in values)

    print(f"streamed: TTFT ms p50/p90/p99 {row(ttft)}, ITL ms {row(itl)}")
    print(f"not streamed: whole answer ms p50/p90/p99 {row(latency)}")
    print(f"errors: {len(tally.errors)}   server RSS MiB: {before:.0f} at start, {after:.0f} at the end")
    for error in tally.errors[:10]:
        print("  " + error)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=None, help="an already running server (default: start one)")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct.Q4_1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--server-args", default="--max-num-seqs 32 --kv-cache-memory-mib 1024")
    parser.add_argument("--soak", type=float, default=None, help="minutes of mixed load instead of levels")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of --soak")
    args = parser.parse_args()

    server = None if args.url else _start_server(args.port, args.server_args.split())
    url = args.url or f"http://127.0.0.1:{args.port}"
    try:
        if args.soak is not None:
            _report_soak(url, args.model, args.clients, args.soak, server)
            return
        asyncio.run(_level(url, args.model, 1, 1, 8))  # warm-up
        columns = ("clients", "req/s", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99")
        print(" ".join(f"{c:>{w}}" for c, w in zip(columns, (7, 7, 7, 9, 9, 8, 8), strict=True)))
        for clients in args.concurrency:
            r = asyncio.run(_level(url, args.model, clients, args.requests_per_client, args.tokens))
            ttft = [1000 * _percentile(r["ttft"], q) for q in (0.5, 0.99)]
            itl = [1000 * _percentile(r["itl"], q) for q in (0.5, 0.99)]
            print(
                f"{clients:>7} {r['requests'] / r['seconds']:>7.2f} {r['chunks'] / r['seconds']:>7.1f} "
                f"{ttft[0]:>7.0f}ms {ttft[1]:>7.0f}ms {itl[0]:>6.0f}ms {itl[1]:>6.0f}ms"
            )
            assert r["requests"] == clients * args.requests_per_client, "some requests did not finish"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
