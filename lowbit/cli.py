"""The `lowbit` command line. Heavy imports (torch, transformers) happen inside the commands so
that `lowbit --help` stays instant."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

app = typer.Typer(
    help="lowbit: serve and run quantized LLMs (GGUF, GPTQ, AWQ, ...) on CPU and GPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ModelArg = Annotated[
    str | None, typer.Argument(help="GGUF file or HF model directory; default: SmolLM2-135M-Instruct Q4_1")
]
# The values runtime/config.py's KV_CACHE_DTYPES and runtime/quant/rtn.py's RTN_SCHEMES accept (not
# imported from there: that imports torch, and `lowbit --help` must stay instant; tests/cli compares).
KV_CACHE_DTYPE_HELP = "auto (follows --dtype), float32, float16, bfloat16 or int8 (scale per token and head)."
QUANTIZATION_HELP = "Round-to-nearest on load for dense HF dirs: w4a16, w8a16 or w8a8."


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log loading details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@app.command()
def chat(
    model: ModelArg = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option()] = 0.95,
    top_k: Annotated[int, typer.Option(help="0 disables.")] = 0,
    repetition_penalty: Annotated[float, typer.Option()] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 1024,
    seed: Annotated[int | None, typer.Option()] = None,
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CPU), float32, float16, bfloat16.")] = "auto",
    kv_cache_dtype: Annotated[str, typer.Option(help=KV_CACHE_DTYPE_HELP)] = "auto",
    quantization: Annotated[str | None, typer.Option(help=QUANTIZATION_HELP)] = None,
) -> None:
    """Chat with a model in the terminal, streaming its answers."""
    from rich.console import Console

    from lowbit.chat import run_chat
    from lowbit.progress import build_cpu_kernels, step
    from lowbit.runtime.config import EngineConfig
    from lowbit.runtime.llm import LLM
    from lowbit.runtime.sampling_params import SamplingParams

    console = Console(highlight=False)
    options = {"dtype": dtype, "kv_cache_dtype": kv_cache_dtype, "quantization": quantization}
    try:
        params = SamplingParams(
            temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
            max_tokens=max_tokens, seed=seed,
        )  # fmt: skip
        config = EngineConfig(model=model, **options)
        name = _model_name(model)
        build_cpu_kernels(config.resolve_device())
        with step(f"loading {name}", f"loaded {name}") as s:
            llm = LLM(model, **options)
            s.done = f"loaded {llm.engine.info.source}"
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    info = llm.engine.info
    console.print(
        f"[bold]{info.source}[/bold] · {info.dtype} · KV cache {info.kv_cache_dtype}, {info.kv_tokens} tokens"
    )
    run_chat(llm, params, system, console)


def _model_name(model: str | None) -> str:
    """What the progress line calls the model (its file or directory name); a ValueError, before any
    slow step, if `model` (or the default model) is missing or not a model."""
    from pathlib import Path

    from lowbit.loaders.default_model import default_model_path
    from lowbit.loaders.registry import detect

    path = Path(model or default_model_path())
    detect(path)
    return path.name


@app.command()
def serve(
    model: ModelArg = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="LOWBIT_API_KEY", help="Require 'Authorization: Bearer <key>'.")
    ] = None,
    served_model_name: Annotated[
        list[str] | None, typer.Option(help="Name(s) clients use for the model; default: the file's stem.")
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CPU), float32, float16, bfloat16.")] = "auto",
    kv_cache_dtype: Annotated[str, typer.Option(help=KV_CACHE_DTYPE_HELP)] = "auto",
    kv_cache_memory_mib: Annotated[
        int | None, typer.Option(help="KV pool size; default: a share of free memory.")
    ] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Most sequences per step.")] = 32,
    max_num_batched_tokens: Annotated[int, typer.Option(help="Most tokens per step (prefill chunk).")] = 512,
    max_model_len: Annotated[int | None, typer.Option(help="Context length; default: the model's.")] = None,
    quantization: Annotated[str | None, typer.Option(help=QUANTIZATION_HELP)] = None,
    graceful_timeout: Annotated[
        int, typer.Option(help="Seconds in-flight requests get to finish on shutdown.")
    ] = 30,
    max_request_bytes: Annotated[int, typer.Option(help="Largest request body (413 above).")] = 8 << 20,
    max_n: Annotated[int, typer.Option(help="Most choices (n) per prompt.")] = 16,
    max_request_sequences: Annotated[
        int, typer.Option(help="Most sequences (prompts x n) in one request.")
    ] = 64,
    max_stop: Annotated[int, typer.Option(help="Most stop strings per request.")] = 4,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API."""
    import signal
    from pathlib import Path

    import uvicorn

    from lowbit.loaders.default_model import default_model_path
    from lowbit.progress import build_cpu_kernels, step
    from lowbit.runtime.config import EngineConfig
    from lowbit.server.app import build_app
    from lowbit.server.async_engine import AsyncEngine
    from lowbit.server.limits import ServerLimits
    from lowbit.server.shutdown import DrainingServer

    kv_cache_memory = kv_cache_memory_mib << 20 if kv_cache_memory_mib else None
    try:
        limits = ServerLimits(max_request_bytes, max_n, max_request_sequences, max_stop)
        config = EngineConfig(
            model=model, dtype=dtype, kv_cache_dtype=kv_cache_dtype, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            quantization=quantization, kv_cache_memory=kv_cache_memory,
        )  # fmt: skip
        name = _model_name(model)
        build_cpu_kernels(config.resolve_device())
        with step(f"loading {name}", f"loaded {name}") as s:
            async_engine = AsyncEngine.from_config(config, max_pending=max(4 * max_num_seqs, 64))
            s.done = f"loaded {async_engine.info.source}"
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    names = served_model_name or [Path(model or default_model_path()).name.removesuffix(".gguf")]
    info = async_engine.info
    app_ = build_app(async_engine, names, api_key, limits)
    typer.echo(
        f"serving {names[0]} ({info.dtype}, KV cache {info.kv_cache_dtype} x {info.kv_tokens} tokens) "
        f"on http://{host}:{port}/v1"
    )
    # uvicorn drains in-flight requests on SIGTERM and then re-raises the signal; with the default
    # handler that kills the process (status 143) after a clean shutdown. Exit with 0 instead.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    served = uvicorn.Config(
        app_, host=host, port=port, log_level="warning", timeout_graceful_shutdown=graceful_timeout
    )
    DrainingServer(served).run()


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


@app.command()
def quantize(
    model: ModelArg = None,
    output: Annotated[str, typer.Option("--output", "-o", help="Directory to write.")] = "quantized",
    method: Annotated[str, typer.Option(help="rtn, gptq, awq or smoothquant.")] = "gptq",
    bits: Annotated[int, typer.Option(help="4 (W4A16) or 8 (W8A16, or W8A8 with --activations 8).")] = 4,
    activations: Annotated[int, typer.Option(help="16 (weight-only) or 8 (W8A8).")] = 16,
    group_size: Annotated[int, typer.Option(help="Input features per scale; -1 is per channel.")] = 128,
    symmetric: Annotated[
        bool, typer.Option("--sym/--asym", help="int4 zero point fixed at 8, or per group (the default).")
    ] = False,
    act_order: Annotated[
        str | None,
        typer.Option(
            help="GPTQ column order: none, weight (by decreasing Hessian, groups kept; the default) "
            "or group (desc_act: groups in that order too, read through g_idx)."
        ),
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="SmoothQuant migration strength; default: searched per layer.")
    ] = None,
    guard: Annotated[
        bool,
        typer.Option(
            "--guard/--no-guard",
            help="GPTQ/AWQ: per linear, keep RTN's codes where better on held-out calibration windows.",
        ),
    ] = True,
    format: Annotated[str, typer.Option(help="gptq, gptq_v2, awq, compressed-tensors or safetensors.")] = "",
    calibration: Annotated[str | None, typer.Option(help="Text file; default: exllamav2's c4 set.")] = None,
    num_samples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
) -> None:
    """Quantize a model (GGUF or HF dir) and write it in a standard format."""
    from pathlib import Path

    from lowbit.loaders.default_model import default_model_path
    from lowbit.loaders.writer import write_checkpoint
    from lowbit.quantize.pipeline import GUARDED, QuantizeOptions, quantize_model_with_report

    fmt = format or ("compressed-tensors" if activations == 8 or bits == 8 else "gptq")
    try:
        opts = QuantizeOptions(
            method, bits, activations, group_size, symmetric, act_order, alpha, guard,
            num_samples=num_samples, seq_len=seq_len,
        )  # fmt: skip
        text = Path(calibration).read_text(encoding="utf-8") if calibration else None
        source = model or str(default_model_path())
        checkpoint, report = quantize_model_with_report(source, opts, calibration_text=text)
        out = write_checkpoint(checkpoint, output, fmt)
    except (ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if opts.method in GUARDED:
        typer.echo(report.summary())
    typer.echo(f"wrote {fmt} checkpoint to {out}")


@app.command("eval")
def eval_(
    model: ModelArg = None,
    scheme: Annotated[
        list[str] | None,
        typer.Option(help="Schemes to compare (repeat); default: all. 'reference' = as loaded."),
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option(help="Group size of the 4-bit schemes; default: 128 or the largest that fits."),
    ] = None,
    num_samples: Annotated[int, typer.Option(help="Calibration windows (c4).")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    windows: Annotated[int, typer.Option(help="Perplexity windows of wiki text.")] = 16,
    window_len: Annotated[int, typer.Option(help="Tokens per perplexity window.")] = 512,
    dtype: Annotated[
        str, typer.Option(help="Compute dtype; float32 isolates quantization error.")
    ] = "float32",
) -> None:
    """Perplexity on fixed windows of wiki text and memory footprint, per quantization scheme."""
    from rich.console import Console
    from rich.table import Table

    from lowbit.loaders.default_model import default_model_path
    from lowbit.loaders.registry import load_checkpoint
    from lowbit.quantize.eval_report import fitting_group_size, run, schemes
    from lowbit.quantize.text_data import standard_text

    try:
        source = load_checkpoint(model or default_model_path())
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    group_size = group_size or fitting_group_size(source.config)
    known = schemes(group_size, num_samples, seq_len)
    names = scheme or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        typer.echo(f"error: unknown scheme(s) {unknown}; known: {list(known)}", err=True)
        raise typer.Exit(2)
    wiki = standard_text("wiki")
    console = Console(highlight=False)
    console.print(
        f"perplexity over {windows} consecutive windows of {window_len} tokens from the start of exllamav2's "
        f"wiki.utf8; compute {dtype}; calibration: {num_samples} x {seq_len} tokens of c4; "
        f"weights and KV memory as served (default dtype, packed)"
    )
    table = Table("scheme", "perplexity", "vs reference", "weights MiB", "KV MiB / 1k tokens")
    reference: list[float] = []

    def show(r) -> None:
        if not reference:
            reference.append(r.perplexity)
        delta = f"{(r.perplexity / reference[0] - 1) * 100:+.2f}%"
        table.add_row(r.name, f"{r.perplexity:.3f}", delta, f"{r.weights_bytes / 2**20:.1f}",
                      f"{r.kv_bytes_per_1k_tokens / 2**20:.2f}")  # fmt: skip
        console.print(f"{r.name}: perplexity {r.perplexity:.3f} ({delta})")

    def token_ids(engine) -> list[int]:
        return engine.tokenizer.encode(wiki[: 12 * window_len * windows])

    try:
        run(source, [known[n] for n in names], token_ids, window_len, windows, dtype, show)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    console.print(table)


@app.command()
def bench(
    model: ModelArg = None,
    engines: Annotated[
        list[str] | None,
        typer.Option(
            "--engine", help="lowbit-bf16kv, lowbit-int8kv, llama.cpp or hf-transformers; repeat for several."
        ),
    ] = None,
    tokens: Annotated[int, typer.Option(help="Greedy decode tokens per measurement.")] = 128,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length for prompt processing.")] = 512,
    threads: Annotated[int, typer.Option(help="CPU threads for every engine.")] = 2,
) -> None:
    """CPU speed side by side: prefill, decode and 8-stream tok/s and memory, each engine in its own
    process, with ratios against llama.cpp and HF measured in the same run (default: all four;
    llama.cpp needs `pip install llama-cpp-python`)."""
    from lowbit.bench import ENGINES, run

    try:
        run(model, engines or list(ENGINES), tokens, prompt_tokens, threads)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    app()
