"""The OpenAI-compatible server's happy paths, through the official `openai` client against a real
`lowbit serve` process (fp32, see openai_server.py): chat and completions, streamed and not,
usage, finish reasons, n, stop strings, logprobs, and the /v1/models, /health, /tokenize,
/detokenize and /metrics endpoints.

Token counts are checked against transformers' own tokenizer for the GGUF, never against the
server's; /metrics is read with prometheus_client's parser.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

from .openai_server import (
    MAIN,
    MAX_MODEL_LEN,
    MODEL,
    LiveServer,
    assert_error,
    chat_ids,
    hf_tokenizer,
    launch,
    serving,
    sse,
    text_ids,
)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    launch(MAIN)
    hf_tokenizer()  # loads (seconds: it parses the GGUF) while the server process loads
    yield from serving(MAIN)


@pytest.fixture(scope="session")
def tokenizer():
    return hf_tokenizer()


def stream_text(chunks, index: int = 0) -> str:
    return "".join(
        (c.delta.content or "") if hasattr(c, "delta") else c.text
        for chunk in chunks
        for c in chunk.choices
        if c.index == index
    )


def finish_reasons(chunks) -> dict[int, list[str]]:
    reasons: dict[int, list[str]] = {}
    for chunk in chunks:
        for c in chunk.choices:
            if c.finish_reason is not None:
                reasons.setdefault(c.index, []).append(c.finish_reason)
    return reasons


# ---------------------------------------------------------------------- chat and completions


def test_chat_answers_paris_streamed_and_not(client, tokenizer):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    assert reply.id.startswith("chatcmpl-")
    [choice] = reply.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"  # the model ends its answer well within 24 tokens
    assert choice.logprobs is None
    usage = reply.usage
    assert usage.prompt_tokens == len(chat_ids(QUESTION))
    assert 1 <= usage.completion_tokens < 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {c.model for c in chunks} == {MODEL}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    assert stream_text(chunks) == choice.message.content
    assert finish_reasons(chunks) == {0: ["stop"]}
    assert chunks[-1].choices == [] and chunks[-1].usage == usage
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_answers_paris_streamed_and_not(client, tokenizer):
    reply = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=3)
    assert reply.object == "text_completion"
    assert reply.id.startswith("cmpl-")
    [choice] = reply.choices
    assert choice.text.startswith(" Paris")
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(text_ids(PROMPT))
    assert reply.usage.completion_tokens == 3
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 3

    chunks = list(
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=3, stream=True)
    )
    assert {c.object for c in chunks} == {"text_completion"}
    assert stream_text(chunks) == choice.text
    assert finish_reasons(chunks) == {0: ["length"]}
    assert all(c.usage is None for c in chunks)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_equals_non_stream_for_same_seed(client, endpoint, temperature):
    """Greedy, and sampled with a fixed seed: streaming changes how text is delivered, not which."""
    kwargs = dict(model=MODEL, temperature=temperature, seed=1234, max_tokens=12)
    if endpoint == "chat":
        create, kwargs["messages"] = (
            client.chat.completions.create,
            [{"role": "user", "content": "Write one sentence about the sea."}],
        )
        text = create(**kwargs).choices[0].message.content
    else:
        create, kwargs["prompt"] = client.completions.create, "Once upon a time"
        text = create(**kwargs).choices[0].text
    assert text
    assert stream_text(list(create(**kwargs, stream=True))) == text


def test_seed_is_honoured(client):
    """Same seed, same text; different seeds give different samples (so sampling really happens)."""

    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], temperature=1.0,
            seed=seed, max_tokens=8,
        )  # fmt: skip
        return reply.choices[0].message.content

    first = sample(1)
    assert sample(1) == first
    assert len({first, sample(2), sample(3)}) > 1


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("include_usage", [None, False, True])
def test_usage_chunk_only_when_asked(http, endpoint, include_usage, tokenizer):
    body = {"model": MODEL, "temperature": 0, "max_tokens": 4, "stream": True}
    if endpoint == "/v1/chat/completions":
        body["messages"], prompt_tokens = QUESTION, len(chat_ids(QUESTION))
    else:
        body["prompt"], prompt_tokens = PROMPT, len(text_ids(PROMPT))
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    with http.stream("POST", endpoint, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events, done = sse(response)
    assert done, "the stream must end with data: [DONE]"
    with_usage = [e for e in events if e.get("usage") is not None]
    if not include_usage:
        assert with_usage == []
        return
    assert with_usage == [events[-1]], "exactly one usage chunk, the last one"
    assert all("usage" in e for e in events), "with include_usage every chunk has a usage key (null)"
    assert events[-1]["choices"] == []
    usage = events[-1]["usage"]
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["completion_tokens"] == 4 or events[-2]["choices"][0]["finish_reason"] == "stop"
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_usage_counts_match_streamed_logprobs(client, tokenizer):
    """completion_tokens == the number of tokens reported one by one in the stream's logprobs."""
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, max_tokens=20, stream=True, logprobs=True,
            top_logprobs=1, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    entries = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(chat_ids(QUESTION))
    assert usage.completion_tokens == len(entries) > 0

    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, temperature=0.7, seed=3, max_tokens=7, stream=True, logprobs=2,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    tokens = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    assert chunks[-1].usage.completion_tokens == len(tokens) == 7
    assert chunks[-1].usage.prompt_tokens == len(text_ids(PROMPT))
    assert "".join(tokens) == stream_text(chunks)


def test_finish_reason_stop_vs_length(client):
    # No max_tokens at all, as most OpenAI clients send it: the model ends its own answer.
    free = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
    assert free.choices[0].finish_reason == "stop"
    assert "Paris" in free.choices[0].message.content
    assert free.usage.completion_tokens < 64

    cut = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=3)
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage.completion_tokens == 3
    assert free.choices[0].message.content.startswith(cut.choices[0].message.content)

    # max_completion_tokens is the newer name of max_tokens.
    newer = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_completion_tokens=2
    )
    assert newer.choices[0].finish_reason == "length" and newer.usage.completion_tokens == 2


def test_n_gives_n_choices(client, tokenizer):
    kwargs = dict(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], temperature=1.0, seed=11,
        max_tokens=6, n=2, logprobs=True,
    )  # fmt: skip
    reply = client.chat.completions.create(**kwargs)
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)
    assert reply.usage.prompt_tokens == len(chat_ids(kwargs["messages"]))  # counted once, not n times

    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    by_index = {c.index: c.message.content for c in reply.choices}
    assert {i: stream_text(chunks, i) for i in (0, 1)} == by_index
    assert sorted(finish_reasons(chunks)) == [0, 1]

    # Legacy completions: n choices per prompt, indexed prompt-major.
    prompts = ["Roses are", "The sky is"]
    legacy = dict(model=MODEL, prompt=prompts, max_tokens=3, n=2, temperature=0.9, seed=2,
                  extra_body={"ignore_eos": True})  # fmt: skip
    reply = client.completions.create(**legacy)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
    assert reply.usage.prompt_tokens == sum(len(text_ids(p)) for p in prompts)
    assert reply.usage.completion_tokens == 4 * 3
    streamed = list(client.completions.create(**legacy, stream=True))
    assert {i: stream_text(streamed, i) for i in range(4)} == {c.index: c.text for c in reply.choices}


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_text(client, stream):
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    assert " Paris" in text
    kwargs = dict(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, stop=["zzz", " Paris"])
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        cut, reasons = stream_text(chunks), finish_reasons(chunks)
    else:
        reply = client.chat.completions.create(**kwargs)
        cut, reasons = reply.choices[0].message.content, {0: [reply.choices[0].finish_reason]}
    assert cut == text[: text.index(" Paris")]  # the stop string itself is not included
    assert reasons == {0: ["stop"]}

    reply = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8, stop="ris")
    assert reply.choices[0].text == " Pa" and reply.choices[0].finish_reason == "stop"


def test_chat_logprobs_shapes(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=12, logprobs=True, top_logprobs=5
    )
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert entry.bytes is not None and bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        tops = entry.top_logprobs
        assert len(tops) == 5
        values = [t.logprob for t in tops]
        assert values == sorted(values, reverse=True), "top_logprobs must be sorted, most likely first"
        assert len({t.token for t in tops}) == 5
        assert entry.logprob <= values[0] + 1e-6
        assert sum(math.exp(v) for v in values) <= 1 + 1e-4
        # greedy: the chosen token is the most likely one
        assert entry.token == tops[0].token and entry.logprob == pytest.approx(values[0], abs=1e-6)
    text = "".join(e.token for e in content)
    assert text == choice.message.content or (
        choice.finish_reason == "stop" and text.startswith(choice.message.content)  # + the end-of-turn token
    )

    none = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0.5, seed=1, max_tokens=4, logprobs=True, top_logprobs=0
    )
    entries = none.choices[0].logprobs.content
    assert len(entries) == 4 and all(e.top_logprobs == [] for e in entries)


def test_completion_logprobs_shapes(client):
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, temperature=1.0, seed=5, max_tokens=8, logprobs=3
    )
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset[0] == 0
    for i, (logprob, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs, strict=True)):
        assert logprob <= 0
        assert 1 <= len(top) <= 3  # keyed by text: two tokens with the same text share a key
        assert logprob <= max(top.values()) + 1e-6
        if i:
            assert lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1])


# ---------------------------------------------------------------------- other endpoints


def test_models(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = models.data[0]
    assert card.object == "model" and card.owned_by == "lowbit" and card.created > 0
    body = http.get("/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["max_model_len"] == MAX_MODEL_LEN


def test_health_needs_no_key(server):
    with server.http(auth=False) as anonymous:
        response = anonymous.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.parametrize(
    "text", ["The capital of France is", "héllo wörld – 日本語 🙂", "  spaces\n\ttabs  ", "<|im_start|>user"]
)
def test_tokenize_matches_transformers(http, tokenizer, text):
    body = http.post("/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert body["tokens"] == text_ids(text)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN

    back = http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert back.status_code == 200
    assert back.json()["prompt"] == tokenizer.decode(body["tokens"]) == text


def test_tokenize_messages_matches_chat_template(http, tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
    ]
    body = http.post("/tokenize", json={"messages": messages}).json()
    flat = [
        {**m, "content": m["content"][0]["text"]} if isinstance(m["content"], list) else m for m in messages
    ]
    assert body["tokens"] == chat_ids(flat)


def test_tokenize_errors(http, server):
    assert_error(http.post("/tokenize", json={}), 400, "prompt")
    assert_error(
        http.post("/tokenize", json={"prompt": "x", "model": "nope"}), 404, "model", "model_not_found"
    )
    assert_error(http.post("/detokenize", json={"tokens": [0, 10**6]}), 400, "tokens")
    assert_error(http.post("/detokenize", json={"tokens": [-1]}), 400, "tokens")
    with server.http(auth=False) as anonymous:
        assert_error(anonymous.post("/tokenize", json={"prompt": "x"}), 401, code="invalid_api_key")


def test_metrics(server, client, http, tokenizer):
    before = server.metrics()
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=10)
    assert_error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": []}), 400)
    response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = server.metrics()

    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, 0.0, **labels)

    chat = "/v1/chat/completions"
    assert delta("lowbit_requests_total", endpoint=chat, status="200") == 1
    assert delta("lowbit_requests_total", endpoint=chat, status="400") == 1
    assert delta("lowbit_prompt_tokens_total") == reply.usage.prompt_tokens == len(chat_ids(QUESTION))
    assert delta("lowbit_generation_tokens_total") == reply.usage.completion_tokens
    assert after.families["lowbit_time_to_first_token_seconds"] == "histogram"
    assert delta("lowbit_time_to_first_token_seconds_count") == 1
    assert delta("lowbit_time_to_first_token_seconds_bucket", le="+Inf") == 1
    assert delta("lowbit_time_to_first_token_seconds_sum") > 0
    # one inter-token latency per token after the first
    assert delta("lowbit_inter_token_latency_seconds_count") == reply.usage.completion_tokens - 1
    assert after.get("lowbit_kv_blocks_total") > 0
    assert after.engine_gauges() == {
        "lowbit_kv_blocks_used": 0, "lowbit_num_requests_running": 0, "lowbit_num_requests_waiting": 0,
        "lowbit_http_requests_in_flight": 0,
    }  # fmt: skip
    for gauge in ("lowbit_prefix_cache_hit_rate", "lowbit_num_preemptions"):
        assert after.families[gauge] == "gauge"
