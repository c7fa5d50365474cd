"""Continuous batching on CPU: aggregate decode tokens/s at several concurrent streams, and time to
first token with and without a cached 500-token system prompt.

    python benchmarks/throughput.py                 # default model, 1/4/8/16 streams
    python benchmarks/throughput.py --streams 1 8 --tokens 64

Decode throughput counts the tokens generated after every stream has its first token, over the
time that took, so prompt processing is not in it. Prompts are distinct 16-token wiki slices.
"""

from __future__ import annotations

import argparse
import time

from lowbit import LLM, SamplingParams
from lowbit.quantize.text_data import standard_text


def decode_throughput(llm: LLM, prompts: list[list[int]], tokens: int) -> float:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"s{i}", prompt, params)
    counts: dict[str, int] = {}
    start = None
    while engine.has_unfinished():
        for out in engine.step():
            counts[out.request_id] = len(out.outputs[0].token_ids)
        if start is None and len(counts) == len(prompts):
            start, first = time.perf_counter(), sum(counts.values())
    return (sum(counts.values()) - first) / (time.perf_counter() - start)


def time_to_first_token(llm: LLM, prompt: list[int]) -> float:
    start = time.perf_counter()
    next(iter(llm.stream(prompt, SamplingParams(temperature=0, max_tokens=1))))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-cache-dtype", default="auto")
    args = parser.parse_args()

    llm = LLM(
        args.model, num_threads=args.threads, kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory=512 << 20
    )
    ids = llm.tokenizer.encode(standard_text("wiki")[:40000])
    decode_throughput(llm, [ids[:16]], 8)  # warm-up
    single = None
    print(f"{'streams':>7} {'decode tok/s':>13} {'vs 1 stream':>12}")
    for n in args.streams:
        rate = decode_throughput(llm, [ids[i * 16 : (i + 1) * 16] for i in range(n)], args.tokens)
        single = single or rate
        print(f"{n:>7} {rate:>13.1f} {rate / single:>11.2f}x")

    system = ids[1000:1500]  # a 500-token "system prompt"
    for caching in (False, True):
        llm.engine.block_manager.enable_prefix_caching = caching
        time_to_first_token(llm, [*system, 28, 29, 30])  # the first request fills the cache
        ttft = time_to_first_token(llm, [*system, 31, 32, 33])
        state = "on " if caching else "off"
        print(f"TTFT, 500-token shared system prompt, prefix caching {state}: {ttft * 1000:.0f} ms")


if __name__ == "__main__":
    main()
