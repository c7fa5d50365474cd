"""A real `lowbit serve` subprocess for the OpenAI API tests, and helpers to talk to it.

Servers are started once per test session and shared by every module that asks for the same
configuration: each module declares a thin session-scoped fixture around `serving(config)`, and
whichever of those fixtures is finalized first (all at the end of the session) stops the process
with SIGTERM and checks that it exits with status 0.

References are independent of the code under test where possible: transformers' own tokenizer for
token counts, prometheus_client's parser for /metrics, raw SSE parsing with httpx for streams.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

MODEL = "SmolLM2-135M-Instruct.Q4_1"  # the default model's served name: its file's stem
API_KEY = "test-key"
START_TIMEOUT = 180.0  # seconds for imports + model load on a slow, shared CI machine
STOP_TIMEOUT = 30.0
MAX_MODEL_LEN = 2048


@dataclass(frozen=True)
class ServerConfig:
    name: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    api_key_flag: bool = True  # pass --api-key test-key (else the test supplies the key some other way)


# The server the API, error, fuzz and load tests share. fp32, because several tests compare the
# text of one request with another's (streamed vs not, concurrent vs alone, cut by a stop string
# vs not): in fp32 a request's tokens do not depend on what else shares its batches or on how its
# prompt was chunked or served from the prefix cache, while in the default bf16 mode the packed CPU
# kernels round differently at other shapes, so greedy outputs may legitimately differ. (The
# shutdown test runs the default bf16 mode.) The context is capped at 2048 tokens so that the KV
# pool (128 MiB: ~2900 tokens in fp32) holds one full-context sequence, which a chat request without
# max_tokens needs (it may run until the context is full).
COMMON_ARGS = (
    "--dtype", "float32", "--kv-cache-memory-mib", "128", "--max-model-len", str(MAX_MODEL_LEN),
    "--max-num-seqs", "16", "--graceful-timeout", "10",
)  # fmt: skip
MAIN = ServerConfig("main", COMMON_ARGS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    """One `lowbit serve` process on 127.0.0.1."""

    config: ServerConfig
    port: int
    log_path: Path
    process: subprocess.Popen = field(repr=False)
    api_key: str = API_KEY

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, config: ServerConfig, log_dir: Path, api_key: str = API_KEY) -> LiveServer:
        port = free_port()
        log_path = log_dir / f"lowbit-serve-{config.name}-{port}.log"
        cmd = [sys.executable, "-m", "lowbit.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        if config.api_key_flag:
            cmd += ["--api-key", api_key]
        cmd += list(config.args)
        env = {**os.environ, **dict(config.env)}  # --api-key, when given, wins over LOWBIT_API_KEY
        with open(log_path, "wb") as log:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        return cls(config, port, log_path, process, api_key)

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return "<no log>"

    def wait_ready(self, timeout: float = START_TIMEOUT) -> LiveServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"lowbit serve exited with {self.process.returncode} before it was ready:\n{self.log()}"
                )
            try:
                health = httpx.get(f"{self.url}/health", timeout=2)
            except httpx.TransportError:
                pass
            else:
                if health.status_code == 200:
                    return self
                raise RuntimeError(f"lowbit serve is unhealthy: {health.status_code} {health.text}")
            time.sleep(0.2)
        self.process.kill()
        raise RuntimeError(f"lowbit serve was not ready after {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Signal the server and wait for it to exit; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"lowbit serve did not exit {timeout} s after {sig!r}:\n{self.log()}"
                ) from None
        return self.process.returncode

    # ------------------------------------------------------------------ clients

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs = {"api_key": self.api_key, "max_retries": 0, "timeout": 120.0, **kwargs}
        return openai.OpenAI(base_url=f"{self.url}/v1", **kwargs)

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs = {"api_key": self.api_key, "max_retries": 0, "timeout": 120.0, **kwargs}
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", **kwargs)

    def http(self, auth: bool = True, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers if auth else {}, timeout=timeout)

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> Metrics:
        response = httpx.get(f"{self.url}/metrics", timeout=10)
        assert response.status_code == 200, response.text
        return Metrics.parse(response.text)

    def wait_idle(self, timeout: float = 30.0) -> Metrics:
        """Poll /metrics until no request runs or waits and the KV pool is entirely free."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m.idle:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout} s: {m.engine_gauges()}")
            time.sleep(0.1)


@dataclass
class Metrics:
    """Samples of one /metrics scrape, parsed by prometheus_client (not by the server's code)."""

    samples: dict[tuple[str, frozenset], float]
    families: dict[str, str]  # family name -> type

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples, families = {}, {}
        for family in text_string_to_metric_families(text):
            families[family.name] = family.type
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = s.value
        return cls(samples, families)

    def get(self, name: str, default: float | None = None, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        if key not in self.samples:
            if default is not None:
                return default
            raise KeyError(
                f"no sample {name}{labels} in /metrics; have {sorted({n for n, _ in self.samples})}"
            )
        return self.samples[key]

    def engine_gauges(self) -> dict[str, float]:
        names = ("lowbit_kv_blocks_used", "lowbit_num_requests_running", "lowbit_num_requests_waiting",
                 "lowbit_http_requests_in_flight")  # fmt: skip
        return {n: self.get(n) for n in names}

    @property
    def idle(self) -> bool:
        return all(v == 0 for v in self.engine_gauges().values())


# ---------------------------------------------------------------------- shared servers

_servers: dict[ServerConfig, LiveServer] = {}


@functools.cache
def log_dir() -> Path:
    """Where server logs go (kept after the run: a failing test points at its server's log)."""
    return Path(tempfile.mkdtemp(prefix="lowbit-openai-tests-"))


def launch(config: ServerConfig) -> LiveServer:
    """Start the shared server for `config` if it is not running yet (does not wait)."""
    if config not in _servers:
        _servers[config] = LiveServer.start(config, log_dir())
    return _servers[config]


def ready(config: ServerConfig, attempts: int = 3) -> LiveServer:
    """The shared server for `config`, up and healthy. A free port can be taken by someone else
    between our probe and the server's bind: then it is started again on another."""
    for attempt in range(attempts):
        server = launch(config)
        try:
            return server.wait_ready()
        except RuntimeError:
            if attempt == attempts - 1 or "address already in use" not in server.log().lower():
                raise
            del _servers[config]
    raise AssertionError("unreachable")


@atexit.register
def _kill_leftovers() -> None:
    """A run cut short (a crash, a failed setup) must not leave servers behind."""
    for server in _servers.values():
        if server.process.poll() is None:
            server.process.kill()


def serving(config: ServerConfig) -> Iterator[LiveServer]:
    """Body of a session-scoped fixture: the shared, ready server; stopped (exit status 0
    checked) when the first fixture holding it is finalized."""
    server = ready(config)
    yield server
    if _servers.get(config) is server:
        del _servers[config]
        status = server.stop()
        assert status == 0, f"lowbit serve exited with status {status} on SIGTERM:\n{server.log()}"


@functools.cache
def hf_tokenizer():
    """transformers' own tokenizer for the default GGUF: the independent token-count reference."""
    from transformers import AutoTokenizer

    from lowbit.loaders.default_model import default_model_path

    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def chat_ids(messages: list[dict]) -> list[int]:
    ids = hf_tokenizer().apply_chat_template(messages, add_generation_prompt=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def text_ids(text: str) -> list[int]:
    return list(hf_tokenizer()(text)["input_ids"])


# ---------------------------------------------------------------------- raw HTTP helpers


def sse(response: httpx.Response) -> tuple[list[dict], bool]:
    """The JSON events of a server-sent event stream and whether it ended with `data: [DONE]`
    (and nothing after it)."""
    events, done = [], False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        assert not done, f"data after [DONE]: {line!r}"
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            done = True
        else:
            events.append(json.loads(data))
    return events, done


ANY = object()  # assert_error: do not check this field


def assert_error(response: httpx.Response, status: int, param: object = ANY, code: object = ANY) -> dict:
    """`response` is an OpenAI-shaped error: {"error": {"message", "type", "param", "code"}}."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert_error_shape(body)
    error = body["error"]
    if param is not ANY:
        assert error["param"] == param, error
    if code is not ANY:
        assert error["code"] == code, error
    return error


def assert_error_shape(body: Any) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
