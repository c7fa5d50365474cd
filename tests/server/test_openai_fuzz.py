"""Fuzzing the OpenAI-compatible endpoints with hypothesis: random request bodies that mix valid
values, well-typed edge cases and junk for every field. Whatever comes in, the server never answers 5xx,
every refusal has OpenAI's error shape, every success the right object type, and the engine is
alive and idle afterwards.

Generation is kept short: max_tokens is always present, either a small valid int or something
invalid (never null, which would mean "until the context is full"), and n is at most 3 when valid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from .openai_server import MAIN, MODEL, LiveServer, assert_error_shape, serving, sse

EXAMPLES = 80  # per endpoint
EDGE_EXAMPLES = 8  # per field and endpoint


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    yield from serving(MAIN)


@pytest.fixture(scope="module")
def http(server):
    with server.http(timeout=60) as h:
        yield h


# ---------------------------------------------------------------------- strategies

BIG_INTS = st.sampled_from([-(2**63) - 1, -(2**63), 2**31, 2**63 - 1, 2**63, 2**64, 10**30, -(10**30)])
SPECIAL_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -5e-324, -0.0])
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    BIG_INTS,
    st.floats(-1e6, 1e6),
    SPECIAL_FLOATS,
    st.text(max_size=6),
)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@dataclass(frozen=True)
class Field:
    """A request field's values: valid ones, well-typed edge cases (limits, huge ints, tiny
    floats, the shapes we refuse: the ones most likely to slip past validation), and junk."""

    valid: st.SearchStrategy
    edge: st.SearchStrategy | None  # None: no value is both well-typed and odd (booleans, free text)
    junk: st.SearchStrategy = junk


INT64_EDGES = (2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30)


def ints(lo: int, hi: int, *edges: int) -> Field:
    return Field(st.integers(lo, hi), st.sampled_from([lo - 1, hi + 1, *edges, *INT64_EDGES]))


def numbers(lo: float, hi: float, *edges: float) -> Field:
    specials = (math.nan, math.inf, -math.inf, 5e-324)
    return Field(st.floats(lo, hi), st.sampled_from([lo, hi, *edges, *specials, *INT64_EDGES]))


def choice(valid: st.SearchStrategy, *edges) -> Field:
    return Field(valid, st.sampled_from(edges) if edges else None)


texts = st.text(max_size=30)
words = texts.filter(bool)
ids = st.integers(0, 49151)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": texts})
odd_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text")}),
    st.fixed_dictionaries({"type": st.just("text"), "text": junk}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.just({"url": "http://x/y.png"})}),
    st.fixed_dictionaries({"type": texts}),
)
role = st.sampled_from(["system", "developer", "user", "assistant"])
message = st.fixed_dictionaries(
    {"role": role},
    optional={"content": st.one_of(st.none(), texts, st.lists(text_part, max_size=2)), "name": texts},
)
odd_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["tool", "function", "wizard", ""]), "content": texts}),
    st.fixed_dictionaries(
        {"role": role, "content": st.lists(st.one_of(text_part, odd_part), min_size=1, max_size=2)}
    ),
    st.fixed_dictionaries(
        {"role": role, "content": st.sampled_from(["", "<|im_end|>", "<|im_start|>", "\x00"])}
    ),
    st.fixed_dictionaries({"role": role, "content": texts, "tool_calls": st.lists(junk, max_size=1)}),
    st.fixed_dictionaries({"role": role, "content": junk}),
    st.fixed_dictionaries({"content": texts}),
)
MESSAGES = Field(
    st.lists(message, min_size=1, max_size=3),
    st.one_of(
        st.tuples(st.lists(message, max_size=2), odd_message).map(lambda t: [*t[0], t[1]]),
        st.sampled_from([[], [{}]]),
    ),
)
PROMPT = Field(
    st.one_of(
        words,
        st.lists(words, min_size=1, max_size=2),
        st.lists(ids, min_size=1, max_size=5),
        st.lists(st.lists(ids, min_size=1, max_size=3), min_size=1, max_size=2),
    ),
    st.one_of(
        st.sampled_from(["", [], [[]], [""], [0], [49151], [49152], [-1], [[1], []], [1, "a"], "<|im_end|>"]),
        st.lists(BIG_INTS, min_size=1, max_size=2),
    ),
)
MODEL_FIELD = choice(st.just(MODEL), "nope", "", MODEL.lower(), MODEL + " ")
# max_tokens is always sent and never null (null means "until the context is full"): a valid
# request stays short. Junk ints are within [-5, 5] or huge, so they are short or refused too.
MAX_TOKENS = Field(
    st.integers(1, 4), st.one_of(st.sampled_from([0, -1]), BIG_INTS), junk.filter(lambda v: v is not None)
)

COMMON = {
    "temperature": numbers(0, 2, 1e-300, -0.1, 2.1),
    "top_p": numbers(0.01, 1, 1e-300, 0, 1.5),
    "n": ints(1, 3, 129),
    "stream": choice(st.booleans()),
    "stream_options": choice(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}), None, {}),
    "stop": choice(
        st.one_of(words, st.lists(words, max_size=3)), [""], "\x00", "<|im_end|>", ["a"] * 50, "x" * 500
    ),
    "seed": Field(st.integers(-(2**63), 2**63 - 1), BIG_INTS),
    "presence_penalty": numbers(-2, 2, 2.5),
    "frequency_penalty": numbers(-2, 2, -2.5),
    "logit_bias": choice(
        st.dictionaries(ids.map(str), st.floats(-100, 100), max_size=3),
        {"x": 1},
        {"-1": 1},
        {"1": 101},
        {"1.5": 1},
        {"49152": 1},
        {str(2**64): 1},
        {" 5": 1},
        {"\u0663": 1},
        {"2": 100},
        {"0": -100},
        {"1": math.nan},
    ),
    "user": choice(texts),
    "top_k": ints(-1, 100, -2, 49152),
    "min_p": numbers(0, 1, 1.1),
    "repetition_penalty": numbers(0.01, 3, 0, -1, 1e-300, 1e300),
    "ignore_eos": choice(st.booleans()),
    "skip_special_tokens": choice(st.booleans()),
    "stop_token_ids": Field(
        st.lists(ids, max_size=3),
        st.one_of(st.sampled_from([[-1], [49152], [0], [2]]), st.lists(BIG_INTS, max_size=2)),
    ),
    "unknown_extra_field": Field(junk, None),
}
CHAT_FIELDS = {
    **COMMON,
    "max_completion_tokens": ints(1, 4),
    "logprobs": choice(st.booleans()),
    "top_logprobs": ints(0, 20),
    "add_generation_prompt": choice(st.booleans()),
    "tools": choice(st.none(), [], [{"type": "function", "function": {"name": "f"}}]),
    "tool_choice": choice(st.sampled_from([None, "none"]), "auto", "required", {"type": "function"}),
    "response_format": choice(
        st.just({"type": "text"}), {"type": "json_object"}, {"type": "json_schema"}, {}
    ),
    "modalities": choice(st.just(["text"]), ["audio"], []),
}
COMPLETION_FIELDS = {
    **COMMON,
    "logprobs": ints(0, 5, 20, 21),
    "echo": choice(st.just(False), True),
    "best_of": choice(st.none(), 1, 2, 0),
    "suffix": choice(st.none(), "x", ""),
}


@st.composite
def bodies(draw, required: dict[str, Field], optional: dict[str, Field]):
    """A valid body (each optional field in or out), then a few of its fields set to edge cases
    and, less often, to junk; now and then a required field goes missing, or the body is not an
    object at all."""
    if draw(st.integers(0, 24)) == 0:
        return draw(junk)
    required = {**required, "model": MODEL_FIELD}
    body = {name: draw(f.valid) for name, f in required.items()} | {"max_tokens": draw(MAX_TOKENS.valid)}
    body |= {name: draw(f.valid) for name, f in optional.items() if draw(st.booleans())}
    fields = {**required, **optional, "max_tokens": MAX_TOKENS}
    names = sorted(fields)
    for kind, counts in (("edge", [0, 0, 1, 1, 1, 2]), ("junk", [0, 0, 0, 0, 1, 2])):
        count = draw(st.sampled_from(counts))
        for name in draw(st.lists(st.sampled_from(names), min_size=count, max_size=count, unique=True)):
            strategy = getattr(fields[name], kind)
            body[name] = draw(fields[name].junk if strategy is None else strategy)
    if draw(st.integers(0, 14)) == 0:
        del body[draw(st.sampled_from(sorted(required)))]
    return body


def encode(body) -> bytes:
    # NaN and Infinity are not JSON but Python's json (and so the server's parser) reads them.
    return json.dumps(body).encode()


# ---------------------------------------------------------------------- the property


def check(http: httpx.Client, endpoint: str, body, chunk_object: str, full_object: str) -> None:
    request = http.build_request(
        "POST", endpoint, content=encode(body), headers={"Content-Type": "application/json"}
    )
    response = http.send(request, stream=True)
    try:
        status = response.status_code
        event(f"status {status}")  # see --hypothesis-show-statistics
        assert status < 500, (status, response.read())
        if status != 200:
            assert status in (400, 404), (status, response.read())
            assert response.headers["content-type"].startswith("application/json")
            assert_error_shape(json.loads(response.read()))
            return
        if response.headers["content-type"].startswith("text/event-stream"):
            events, done = sse(response)
            assert done, events
            assert events, "a stream with no chunks"
            for chunk in events:
                assert "error" not in chunk, chunk
                assert chunk["object"] == chunk_object, chunk
            reasons = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
            assert reasons and set(reasons) <= {"stop", "length"}, events
        else:
            reply = json.loads(response.read())
            assert reply["object"] == full_object, reply
            assert reply["choices"], reply
            assert {c["finish_reason"] for c in reply["choices"]} <= {"stop", "length"}, reply
            usage = reply["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
            assert len(reply["choices"]) <= usage["completion_tokens"] <= 5 * len(reply["choices"]), usage
    finally:
        response.close()


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(body=bodies({"messages": MESSAGES}, CHAT_FIELDS))
def test_fuzz_chat_completions(http, body):
    check(http, "/v1/chat/completions", body, "chat.completion.chunk", "chat.completion")


@FUZZ
@given(body=bodies({"prompt": PROMPT}, COMPLETION_FIELDS))
def test_fuzz_completions(http, body):
    check(http, "/v1/completions", body, "text_completion", "text_completion")


ENDPOINTS = {
    "chat": ("/v1/chat/completions", {"messages": MESSAGES}, CHAT_FIELDS, "chat.completion"),
    "completions": ("/v1/completions", {"prompt": PROMPT}, COMPLETION_FIELDS, "text_completion"),
}
PER_FIELD = [
    (endpoint, name)
    for endpoint, (_, required, optional, _) in ENDPOINTS.items()
    for name in sorted({**required, **optional, "model": MODEL_FIELD, "max_tokens": MAX_TOKENS})
]


@settings(FUZZ, max_examples=EDGE_EXAMPLES)
@pytest.mark.parametrize(("endpoint", "name"), PER_FIELD)
@given(data=st.data())
def test_edge_values_field_by_field(http, endpoint, name, data):
    """Every field in turn, alone on a minimal valid request, takes edge-case values: the ones
    most likely to get past validation and break something further in."""
    path, required, optional, obj = ENDPOINTS[endpoint]
    fields = {**required, **optional, "model": MODEL_FIELD, "max_tokens": MAX_TOKENS}
    body = {key: data.draw(f.valid) for key, f in required.items()} | {"model": MODEL, "max_tokens": 1}
    edge, junk_ = fields[name].edge, fields[name].junk
    body[name] = data.draw(st.one_of(edge, edge, junk_) if edge is not None else junk_, label=name)
    chunk = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
    check(http, path, body, chunk, obj)


def test_server_survived_the_fuzz(server, http):
    """Runs after the fuzz tests (file order): the engine is alive, idle, and still right."""
    assert http.get("/health").status_code == 200
    server.wait_idle()
    reply = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
              "temperature": 0, "max_tokens": 12},
    )  # fmt: skip
    assert "Paris" in reply.json()["choices"][0]["message"]["content"]
