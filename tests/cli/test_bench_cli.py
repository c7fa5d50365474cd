"""`lowbit bench` run as a user runs it (a subprocess, each engine in its own worker process): a
table row per engine with load time, memory and throughput; a bad engine name is a one-line error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

TIMEOUT = 300


def _run(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("lowbit")
    cmd = [exe] if exe else [sys.executable, "-m", "lowbit.cli"]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=TIMEOUT, env=dict(os.environ)
    )


def test_bench_prints_a_row_per_engine():
    result = _run("bench", "--engine", "lowbit-bf16kv", "--tokens", "4", "--prompt-tokens", "40")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("engine "))
    header, row = lines[at : at + 2]
    assert header.split()[:3] == ["engine", "load", "s"]
    name, load, rss, peak, prefill, decode, streams = row.split()
    assert name == "lowbit-bf16kv"
    assert float(load) > 0 and float(prefill) > 0 and float(decode) > 0 and float(streams) > 0
    assert float(peak) >= float(rss) > 100  # MiB: torch alone is more than that
    # The default model's tensor types (its GGUF header), the kernels that ran them, and decode's
    # weight reads against a copy's bandwidth measured in the same run.
    types = {line.split()[0]: line.split()[1:] for line in lines[:at] if line.startswith("  ")}
    assert types["Q4_1"] == ["210", "5", "63.3"] and types["Q8_0"][:2] == ["1", "8.5"]
    assert any(line.startswith("lowbit-bf16kv kernels: w4a16 -> ") for line in lines)
    assert lines[at + 2].startswith("copy bandwidth ")
    assert lines[at + 3].startswith("lowbit-bf16kv    decode reads weights at ")


def test_bench_rejects_an_unknown_engine():
    result = _run("bench", "--engine", "vllm")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown engines ['vllm']")
