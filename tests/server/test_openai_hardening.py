"""Hostile-client defects of issue 24, each through the real `lowbit serve` (the shared fp32 server)
with httpx or the official client, bounded in count and time, on 127.0.0.1:

- the API key and the body size are checked before the body is read (401 / 413 in OpenAI's shape);
- a maximum-size prompt is tokenized off the event loop: /health answers meanwhile;
- one request cannot ask for more than the configured choices, sequences or stop strings;
- a streamed n > 1 request sends each choice's finish_reason exactly once, and streamed logprobs'
  text_offset counts from the choice's start;
- /metrics labels requests by route template, so random paths add no series;
- GET /v1/models/{id}; stream_options without stream is a 400; the prompt's errors name the
  endpoint's own parameter.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator

import pytest

from .openai_server import MAIN, MODEL, LiveServer, assert_error, serving, sse

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
LIMIT = 8 << 20  # lowbit serve's default --max-request-bytes
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    yield from serving(MAIN)


def _chat_body(content: str, **fields) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}
    return json.dumps(body).encode()


def test_unauthorized_large_body_is_refused_before_it_is_read(server):
    """A body far over the limit without the key: 401 at once (the body is never read)."""
    with server.http(auth=False, timeout=30) as anonymous:
        started = time.perf_counter()
        response = anonymous.post(
            CHAT, content=b"x" * (3 * LIMIT), headers={"Content-Type": "application/json"}
        )
        assert_error(response, 401, code="invalid_api_key")
        assert time.perf_counter() - started < 5


def test_body_over_the_limit_is_413(server, http):
    declared = http.post(CHAT, content=_chat_body("a" * (LIMIT + 10)), headers=JSON)
    assert_error(declared, 413, code="request_too_large")

    def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to refuse it by
        body = _chat_body("b" * (LIMIT + 10))
        for i in range(0, len(body), 1 << 20):
            yield body[i : i + (1 << 20)]

    assert_error(http.post(CHAT, content=chunks(), headers=JSON), 413, code="request_too_large")
    assert http.post(CHAT, content=_chat_body("Hi"), headers=JSON).status_code == 200  # still serving


def test_health_answers_while_a_maximum_size_prompt_is_tokenized(server, http):
    body = _chat_body("word " * ((LIMIT - 1000) // 5))  # just under the limit; over the context
    result = {}

    def post() -> None:
        with server.http() as client:
            result["response"] = client.post(CHAT, content=body, headers=JSON)

    worker = threading.Thread(target=post)
    worker.start()
    time.sleep(1.0)  # the body is read and being tokenized (takes seconds)
    slowest = 0.0
    while worker.is_alive():
        started = time.perf_counter()
        assert http.get("/health").status_code == 200
        slowest = max(slowest, time.perf_counter() - started)
        time.sleep(0.2)
    worker.join()
    assert_error(result["response"], 400, "messages", "context_length_exceeded")
    assert slowest < 1.0, slowest


@pytest.mark.parametrize(
    ("endpoint", "fields", "param"),
    [
        (CHAT, {"n": 17}, "n"),
        (COMPLETIONS, {"prompt": ["a"] * 5, "n": 16}, "prompt"),
        (COMPLETIONS, {"prompt": "a", "n": 17}, "n"),
        (CHAT, {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (COMPLETIONS, {"prompt": "a", "stop": [str(i) for i in range(10_000)]}, "stop"),
    ],
)
def test_one_request_cannot_ask_for_too_much(http, endpoint, fields, param):
    base = {"model": MODEL, "max_tokens": 1}
    if endpoint == CHAT:
        base["messages"] = [{"role": "user", "content": "Hi"}]
    assert_error(http.post(endpoint, json={**base, **fields}), 400, param)


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS])
def test_streamed_choices_finish_once(http, endpoint):
    """Choices that end at different steps (a stop string each meets when its sampled text does):
    a finished choice is not sent again in later chunks."""
    body = {"model": MODEL, "n": 4, "max_tokens": 24, "temperature": 1.0, "seed": 7, "stream": True,
            "stop": ["e"]}  # fmt: skip
    if endpoint == CHAT:
        body["messages"] = [{"role": "user", "content": "Tell me a story."}]
    else:
        body["prompt"] = "Once upon a time"
    with http.stream("POST", endpoint, json=body) as response:
        events, done = sse(response)
    assert done
    ends = [(n, c["index"]) for n, e in enumerate(events) for c in e["choices"] if c.get("finish_reason")]
    assert sorted(index for _, index in ends) == [0, 1, 2, 3]
    assert len({n for n, _ in ends}) > 1, "guard: the choices must end in different chunks"


def test_streamed_text_offsets_count_from_the_choice_start(http):
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
            "logprobs": 1, "stream": True}  # fmt: skip
    with http.stream("POST", COMPLETIONS, json=body) as response:
        events, _ = sse(response)
    text, offsets, tokens = "", [], []
    for event in events:
        for choice in event["choices"]:
            if choice["logprobs"]:
                offsets += choice["logprobs"]["text_offset"]
                tokens += choice["logprobs"]["tokens"]
            text += choice["text"]
    assert len(offsets) == 8
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert offsets[-1] > 0


def test_metrics_are_labelled_by_route(server, http):
    for i in range(20):
        assert http.get(f"/no/such/path/{i}").status_code == 404
    http.get("/v1/models")
    samples = server.metrics().samples
    endpoints = {dict(labels)["endpoint"] for name, labels in samples if name == "lowbit_requests_total"}
    assert "/v1/models" in endpoints and "unmatched" in endpoints
    assert not any(e.startswith("/no/such") for e in endpoints)


def test_models_retrieve_and_small_refusals(server, http):
    with server.client() as client:
        assert client.models.retrieve(MODEL).id == MODEL
    assert_error(http.get("/v1/models/other-model"), 404, "model", "model_not_found")
    body = {"model": MODEL, "prompt": "a", "max_tokens": 1, "stream_options": {"include_usage": True}}
    assert_error(http.post(COMPLETIONS, json=body), 400, "stream_options")
    too_long = {"model": MODEL, "prompt": "word " * 5000, "max_tokens": 1}
    assert_error(http.post(COMPLETIONS, json=too_long), 400, "prompt", "context_length_exceeded")


def test_a_big_request_does_not_starve_others(server):
    """A request of 4 prompts x n=16 (64 sequences, four times the server's 16 running slots)
    while another stream runs: that stream keeps getting tokens (largest gap bounded) and a request
    arriving meanwhile gets its first token within a few steps, not after the big one's run."""
    times: list[float] = []
    first_token: dict = {}

    def running_stream() -> None:
        body = {
            "model": MODEL,
            "prompt": "Once upon a time",
            "max_tokens": 120,
            "ignore_eos": True,
            "stream": True,
        }
        with server.http() as http, http.stream("POST", COMPLETIONS, json=body) as response:
            times.extend(time.monotonic() for line in response.iter_lines() if line.startswith("data:"))

    def newcomer() -> None:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "stream": True}
        started = time.monotonic()
        with server.http() as http, http.stream("POST", COMPLETIONS, json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    first_token["seconds"] = time.monotonic() - started
                    break

    stream = threading.Thread(target=running_stream)
    stream.start()
    time.sleep(1.0)
    big = {"model": MODEL, "prompt": ["Tell me about dragons."] * 4, "n": 16, "max_tokens": 10,
           "ignore_eos": True, "temperature": 1.0}  # fmt: skip
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=server.http().post(COMPLETIONS, json=big)))
    started = time.monotonic()
    worker.start()
    time.sleep(2.0)  # the big request holds every running slot by now
    newcomer()
    worker.join(300)
    finished = time.monotonic()
    stream.join(300)
    assert result["r"].status_code == 200 and len(result["r"].json()["choices"]) == 64
    gaps = [b - a for a, b in itertools.pairwise(times) if started <= b <= finished]
    assert gaps and max(gaps) < 3.0, max(gaps)
    assert first_token["seconds"] < 3.0, first_token
