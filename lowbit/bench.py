"""`lowbit bench` (and benchmarks/decode.py): CPU speed on one GGUF, lowbit (bf16 KV and int8 KV)
beside llama.cpp and HF transformers.

Each engine runs in its own process, so load time and resident memory are its own. Per engine:
load seconds, RSS after load, prompt processing tokens/s (a `--prompt-tokens` prompt), decode
tokens/s (`--tokens` greedy tokens after a warm-up run), peak RSS. Ratios are against llama.cpp
and HF in the same run, because this machine is noisy. llama.cpp runs through `llama-cpp-python`
(an optional benchmark dependency: `pip install llama-cpp-python`, ~8 minutes to compile here);
the engine is skipped with a message when it is not installed.

    lowbit bench                                      # default model, all engines
    lowbit bench --engine lowbit-bf16kv --engine llama.cpp --tokens 256
    python benchmarks/decode.py --engines lowbit-bf16kv lowbit-int8kv   # the same, as a script
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("lowbit-bf16kv", "lowbit-int8kv", "llama.cpp", "hf-transformers")
# Context (tokens) for lowbit and llama.cpp alike: llama.cpp's n_ctx, lowbit's max_model_len and
# KV pool size, so that peak memory compares the same model at the same context.
CONTEXT = 2048


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _prompt_ids(tokenizer_encode, count: int) -> list[int]:
    from lowbit.quantize.text_data import standard_text

    return tokenizer_encode(standard_text("wiki")[: count * 8])[:count]


def _kernels(llm) -> dict[str, str]:
    """Which kernel runs each weight scheme of the loaded model, e.g. {"ggml Q6_K": "cpu-ggml (14)"}."""
    from collections import Counter

    from lowbit.runtime.layers.linear import Linear

    seen: Counter = Counter()
    for module in llm.engine.model.modules():
        if isinstance(module, Linear):
            config = module.packed.kernel.config
            label = f"{config.name} {getattr(config, 'qtype', '')}".strip()
            seen[(label, module.packed.kernel.name)] += 1
    return {label: f"{kernel} ({count})" for (label, kernel), count in sorted(seen.items())}


def _lowbit(model: str | None, kv: str, prompt_tokens: int, tokens: int, threads: int) -> dict:
    from lowbit import LLM, SamplingParams
    from lowbit.runtime.config import EngineConfig

    start = time.perf_counter()
    blocks = CONTEXT // EngineConfig.block_size
    llm = LLM(model, kv_cache_dtype=kv, num_threads=threads, max_model_len=CONTEXT, num_kv_blocks=blocks)
    load = time.perf_counter() - start
    rss = _status_kib("VmRSS")
    prompt = _prompt_ids(llm.tokenizer.encode, prompt_tokens)
    one = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([prompt[:32]], one)  # warm-up
    start = time.perf_counter()
    llm.generate([prompt], one)
    prefill = len(prompt) / (time.perf_counter() - start)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    text = _prompt_ids(llm.tokenizer.encode, 16 * 9)  # the same text, long enough for 9 prompts
    short = text[:16]
    llm.generate([short], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    decode_times = []
    for _ in llm.stream(short, params):
        decode_times.append(time.perf_counter())
    decode = (len(decode_times) - 1) / (decode_times[-1] - decode_times[0])
    # 8 concurrent streams: distinct 16-token prompts, wall time includes their short prefills.
    prompts = [text[16 * i : 16 * (i + 1)] for i in range(1, 9)]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    streams = sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)
    return {"load_s": load, "rss_mib": rss / 1024, "prefill_tok_s": prefill, "decode_tok_s": decode,
            "decode_8_streams_tok_s": streams, "kernels": _kernels(llm)}  # fmt: skip


def _hf(model: str | None, prompt_tokens: int, tokens: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.loaders.default_model import default_model_path

    torch.set_num_threads(threads)
    path = default_model_path() if model is None else Path(model)
    start = time.perf_counter()
    source = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    hf = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(**source)
    load = time.perf_counter() - start
    rss = _status_kib("VmRSS")
    prompt = torch.tensor([_prompt_ids(tok.encode, prompt_tokens)])
    with torch.no_grad():
        hf(prompt[:, :32])
        start = time.perf_counter()
        hf(prompt)
        prefill = prompt.shape[1] / (time.perf_counter() - start)
        short = prompt[:, :16]
        hf.generate(short, max_new_tokens=8, do_sample=False)
        start = time.perf_counter()
        out = hf.generate(short, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)
        decode = (out.shape[1] - short.shape[1]) / (time.perf_counter() - start)
    return {"load_s": load, "rss_mib": rss / 1024, "prefill_tok_s": prefill, "decode_tok_s": decode}


def _llama_cpp(model: str | None, prompt_tokens: int, tokens: int, threads: int) -> dict:
    """llama.cpp's own loop: eval the prompt, then greedy sample + eval one token at a time."""
    from llama_cpp import Llama

    from lowbit.loaders.default_model import default_model_path

    path = str(default_model_path() if model is None else model)
    start = time.perf_counter()
    llm = Llama(path, n_ctx=CONTEXT, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    load = time.perf_counter() - start
    rss = _status_kib("VmRSS")
    prompt = _prompt_ids(lambda text: llm.tokenize(text.encode(), add_bos=False), prompt_tokens)
    llm.eval(prompt[:32])  # warm-up
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - start)

    def greedy(count: int) -> float:
        llm.reset()
        llm.eval(prompt[:16])
        start = time.perf_counter()
        for _ in range(count):
            llm.eval([llm.sample(top_k=1, temp=0.0)])
        return count / (time.perf_counter() - start)

    greedy(8)
    return {"load_s": load, "rss_mib": rss / 1024, "prefill_tok_s": prefill, "decode_tok_s": greedy(tokens)}


def worker(args: argparse.Namespace) -> None:
    if args.worker == "llama.cpp":
        result = _llama_cpp(args.model, args.prompt_tokens, args.tokens, args.threads)
    elif args.worker == "hf-transformers":
        result = _hf(args.model, args.prompt_tokens, args.tokens, args.threads)
    else:
        kv = "int8" if args.worker == "lowbit-int8kv" else "auto"
        result = _lowbit(args.model, kv, args.prompt_tokens, args.tokens, args.threads)
    result["peak_rss_mib"] = _status_kib("VmHWM") / 1024
    print(json.dumps(result))


def run(
    model: str | None, engines: list[str], tokens: int, prompt_tokens: int, threads: int
) -> dict[str, dict]:
    """Each engine in its own process (`python -m lowbit.bench --worker ENGINE`); prints the table."""
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        raise ValueError(f"unknown engines {unknown}: choose from {list(ENGINES)}")
    results = {}
    for engine in engines:
        if engine == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
            print("llama.cpp skipped: pip install llama-cpp-python", file=sys.stderr)
            continue
        cmd = [sys.executable, "-m", "lowbit.bench", "--worker", engine, "--tokens", str(tokens)]
        cmd += ["--prompt-tokens", str(prompt_tokens), "--threads", str(threads)]
        cmd += ["--model", model] if model else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ValueError(f"{engine} failed: {last}")
        results[engine] = json.loads(done.stdout.strip().splitlines()[-1])
    weight_bytes = _print_types(model)
    _print_table(results)
    if weight_bytes:
        _print_bandwidth(results, weight_bytes, threads)
    return results


def _copy_bandwidth(threads: int, size: int = 1 << 30) -> float:
    """Memory bandwidth in bytes/s (read + write) of a large copy, best of three."""
    import torch

    torch.set_num_threads(threads)
    src, dst = torch.ones(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best


def _print_bandwidth(results: dict[str, dict], weight_bytes: int, threads: int) -> None:
    """Decode reads every weight once per token: weight bytes x tokens/s against a large copy's
    bandwidth measured now (the KV cache and activations are not counted)."""
    copy = _copy_bandwidth(threads)
    print(f"copy bandwidth {copy / 1e9:.1f} GB/s (read + write, {threads} threads)")
    for engine, r in results.items():
        read = weight_bytes * r["decode_tok_s"]
        share = f"{read / copy:.0%} of the copy bandwidth"
        print(f"{engine:<16} decode reads weights at {read / 1e9:.1f} GB/s = {share}")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--tokens", type=int, default=128, help="decode tokens per measurement")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    run(args.model, args.engines, args.tokens, args.prompt_tokens, args.threads)


def _print_types(model: str | None) -> int:
    """The file's tensor types with their bits per weight and bytes; returns the bytes of all
    tensors (0 for a model that is not a GGUF file)."""
    from collections import Counter

    from gguf import GGML_QUANT_SIZES

    from lowbit.loaders.default_model import default_model_path
    from lowbit.loaders.gguf_file import read_gguf

    path = default_model_path() if model is None else Path(model)
    if path.suffix != ".gguf":
        return 0
    tensors = list(read_gguf(path).tensors.values())
    count, size = Counter(t.qtype for t in tensors), Counter()
    for t in tensors:
        size[t.qtype] += t.nbytes
    print(f"{path.name}: tensor types")
    print(f"  {'type':<8} {'tensors':>7} {'bits/weight':>11} {'MiB':>8}")
    for qtype in sorted(count, key=lambda q: -size[q]):
        block, type_size = GGML_QUANT_SIZES[qtype]
        bits = 8 * type_size / block
        print(f"  {qtype.name:<8} {count[qtype]:>7} {bits:>11.4g} {size[qtype] / 2**20:>8.1f}")
    return sum(size.values())


def _print_table(results: dict[str, dict]) -> None:
    for engine, r in results.items():
        if "kernels" in r:
            print(
                f"{engine} kernels: "
                + ", ".join(f"{label} -> {kernel}" for label, kernel in r["kernels"].items())
            )
    peers = [p for p in ("llama.cpp", "hf-transformers") if p in results]
    header = f"{'engine':<16} {'load s':>7} {'RSS MiB':>8} {'peak MiB':>9} "
    header += f"{'prefill tok/s':>14} {'decode tok/s':>13} {'8 streams tok/s':>16}"
    for p in peers:
        header += f" {'prefill/' + p:>22} {'decode/' + p:>21}"
    print(header)
    for engine, r in results.items():
        line = f"{engine:<16} {r['load_s']:>7.1f} {r['rss_mib']:>8.0f} {r['peak_rss_mib']:>9.0f} "
        line += f"{r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f}"
        line += f" {r.get('decode_8_streams_tok_s', float('nan')):>16.1f}"
        for p in peers:
            prefill = r["prefill_tok_s"] / results[p]["prefill_tok_s"]
            decode = r["decode_tok_s"] / results[p]["decode_tok_s"]
            line += f" {prefill:>21.2f}x {decode:>20.2f}x"
        print(line)


if __name__ == "__main__":
    main()
