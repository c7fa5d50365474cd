"""`lowbit serve` startup as its output shows it: what it is loading and how long that took on
stderr, the serving address on stdout. (tests/server covers the HTTP API of a running server.)"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time

import httpx

from tests.server.openai_server import free_port

from .test_chat_cli import LOAD_TIMEOUT, _lowbit


def test_loading_says_what_it_does_on_stderr_with_the_time_taken(default_gguf):
    port = free_port()
    cmd = [*_lowbit(), "serve", "--port", str(port), "--kv-cache-memory-mib", "16", "--max-model-len", "512"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(LOAD_TIMEOUT, process.kill)  # a hung start ends the readline below
    watchdog.start()
    try:
        serving = process.stdout.readline()
        assert serving.startswith(f"serving {default_gguf.stem} "), serving
        assert serving.rstrip().endswith(f"on http://127.0.0.1:{port}/v1"), serving
        _wait_healthy(port, process)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    lines = stderr.splitlines()
    # stderr is a pipe: no spinner, but what is being loaded and then how long it took.
    loading = f"loading {default_gguf.name}..."
    loaded = rf"loaded {re.escape(str(default_gguf))} in (\d+\.\d) s"
    assert loading in lines, stderr
    found = [(i, float(m[1])) for i, line in enumerate(lines) if (m := re.fullmatch(loaded, line))]
    assert len(found) == 1, stderr
    ((index, seconds),) = found
    assert index > lines.index(loading) and 0 < seconds < LOAD_TIMEOUT, stderr
    assert "loaded" not in serving + stdout


def _wait_healthy(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    """uvicorn takes SIGTERM gracefully (exit 0) once it runs: wait for that before sending it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"lowbit serve on port {port} did not become healthy")
