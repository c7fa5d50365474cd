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
    kv_cache_dtype: Annotated[str, typer.Option(help="auto or int8.")] = "auto",
    quantization: Annotated[str | None, typer.Option(help="w4a16 or w8a16 on load (HF dirs).")] = None,
) -> None:
    """Chat with a model in the terminal, streaming its answers."""
    from rich.console import Console

    from lowbit.chat import run_chat
    from lowbit.runtime.llm import LLM
    from lowbit.runtime.sampling_params import SamplingParams

    console = Console(highlight=False)
    try:
        params = SamplingParams(
            temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
            max_tokens=max_tokens, seed=seed,
        )  # fmt: skip
        with console.status("loading model..."):
            llm = LLM(model, dtype=dtype, kv_cache_dtype=kv_cache_dtype, quantization=quantization)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    engine, spec = llm.engine, llm.engine.kv_spec
    console.print(
        f"[bold]{engine.checkpoint_source}[/bold] · {engine.dtype} · KV cache {spec.dtype}, "
        f"{spec.num_blocks * spec.block_size} tokens · loaded in {engine.load_seconds:.1f} s"
    )
    run_chat(llm, params, system, console)


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
    kv_cache_dtype: Annotated[str, typer.Option(help="auto or int8.")] = "auto",
    kv_cache_memory_mib: Annotated[
        int | None, typer.Option(help="KV pool size; default: a share of free memory.")
    ] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Most sequences per step.")] = 32,
    max_num_batched_tokens: Annotated[int, typer.Option(help="Most tokens per step (prefill chunk).")] = 512,
    max_model_len: Annotated[int | None, typer.Option(help="Context length; default: the model's.")] = None,
    quantization: Annotated[str | None, typer.Option(help="w4a16 or w8a16 on load (HF dirs).")] = None,
    graceful_timeout: Annotated[
        int, typer.Option(help="Seconds in-flight requests get to finish on shutdown.")
    ] = 30,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API."""
    import signal
    from pathlib import Path

    import uvicorn

    from lowbit.default_model import default_model_path
    from lowbit.runtime.config import EngineConfig
    from lowbit.server.app import build_app
    from lowbit.server.async_engine import AsyncEngine

    kv_cache_memory = kv_cache_memory_mib << 20 if kv_cache_memory_mib else None
    try:
        config = EngineConfig(
            model=model, dtype=dtype, kv_cache_dtype=kv_cache_dtype, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            quantization=quantization, kv_cache_memory=kv_cache_memory,
        )  # fmt: skip
        async_engine = AsyncEngine.from_config(config, max_pending=max(4 * max_num_seqs, 64))
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    names = served_model_name or [Path(model or default_model_path()).name.removesuffix(".gguf")]
    engine = async_engine.engine
    app_ = build_app(async_engine, names, api_key)
    spec = engine.kv_spec
    typer.echo(
        f"serving {names[0]} ({engine.dtype}, KV cache {spec.dtype} x "
        f"{spec.num_blocks * spec.block_size} tokens) on http://{host}:{port}/v1"
    )
    # uvicorn drains in-flight requests on SIGTERM and then re-raises the signal; with the default
    # handler that kills the process (status 143) after a clean shutdown. Exit with 0 instead.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(app_, host=host, port=port, log_level="warning", timeout_graceful_shutdown=graceful_timeout)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    app()
