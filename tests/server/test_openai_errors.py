"""Every refusal of the OpenAI-compatible server has the right status and OpenAI's error body,
{"error": {"message", "type", "param", "code"}}, with `param` naming the offending field; checked
with raw httpx requests and through the official client's exception types."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from .openai_server import (
    MAIN,
    MAX_MODEL_LEN,
    MODEL,
    LiveServer,
    assert_error,
    chat_ids,
    hf_tokenizer,
    serving,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    yield from serving(MAIN)


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **fields}


def test_malformed_json(http):
    for body in (b'{"model": "x", "messages": [', b"not json at all", b""):
        for endpoint in (CHAT, COMPLETIONS):
            response = http.post(endpoint, content=body, headers={"Content-Type": "application/json"})
            error = assert_error(response, 400)
            assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [[1, 2], "a string", 42, None])
def test_body_that_is_not_an_object(http, body):
    headers = {"Content-Type": "application/json"}
    assert_error(http.post(CHAT, content=json.dumps(body).encode(), headers=headers), 400)


WRONG_TYPES = [
    (CHAT, "max_tokens", "5"),
    (CHAT, "max_tokens", 2.0),
    (CHAT, "temperature", "hot"),
    (CHAT, "messages", "What is the capital of France?"),
    (CHAT, "messages", {"role": "user", "content": "Hi"}),
    (CHAT, "n", True),
    (CHAT, "stream", "yes"),
    (CHAT, "stop", 5),
    (CHAT, "seed", 1.5),
    (CHAT, "logprobs", "yes"),
    (CHAT, "top_logprobs", "3"),
    (CHAT, "stream_options", "usage"),
    (CHAT, "logit_bias", [1, 2]),
    (CHAT, "user", 7),
    (CHAT, "model", 7),
    (CHAT, "stop_token_ids", "2"),
    (COMPLETIONS, "prompt", 5),
    (COMPLETIONS, "prompt", [1, "two"]),
    (COMPLETIONS, "logprobs", True),
    (COMPLETIONS, "max_tokens", "16"),
    (COMPLETIONS, "echo", "no"),
]


@pytest.mark.parametrize(("endpoint", "field", "value"), WRONG_TYPES)
def test_wrong_type_names_the_field(http, endpoint, field, value):
    body = (chat if endpoint == CHAT else completion)(**{field: value})
    error = assert_error(http.post(endpoint, json=body), 400, param=field)
    assert field in error["message"]


def test_missing_required_fields(http):
    assert_error(http.post(CHAT, json={"messages": MESSAGES}), 400, param="model")
    assert_error(http.post(CHAT, json={"model": MODEL}), 400, param="messages")
    assert_error(http.post(COMPLETIONS, json={"model": MODEL}), 400, param="prompt")


INVALID_VALUES = [
    (CHAT, {"top_p": 1.5}, "top_p"),
    (CHAT, {"top_p": 0}, "top_p"),
    (CHAT, {"temperature": -1}, "temperature"),
    (CHAT, {"temperature": 2.5}, "temperature"),
    (CHAT, {"n": 0}, "n"),
    (CHAT, {"n": 129}, "n"),
    (CHAT, {"max_tokens": 0}, "max_tokens"),
    (CHAT, {"max_completion_tokens": -3}, "max_completion_tokens"),
    (CHAT, {"presence_penalty": 3}, "presence_penalty"),
    (CHAT, {"frequency_penalty": -2.5}, "frequency_penalty"),
    (CHAT, {"logit_bias": {"1": 200}}, "logit_bias"),
    (CHAT, {"logit_bias": {"not-a-token": 1}}, "logit_bias"),
    (CHAT, {"logit_bias": {"99999999": 1}}, "logit_bias"),
    (CHAT, {"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    (CHAT, {"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    (CHAT, {"min_p": 1.5}, "min_p"),
    (CHAT, {"repetition_penalty": 0}, "repetition_penalty"),
    (CHAT, {"top_k": -2}, "top_k"),
    (CHAT, {"top_k": 2**63}, "top_k"),  # once crashed the engine loop (int64 overflow in a step)
    (CHAT, {"seed": 2**64}, "seed"),
    (CHAT, {"stop": [""]}, "stop"),
    (CHAT, {"stop_token_ids": [-1]}, "stop_token_ids"),
    (CHAT, {"stop_token_ids": [10**9]}, "stop_token_ids"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages"),
    (COMPLETIONS, {"logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": ""}, "prompt"),
    (COMPLETIONS, {"prompt": [-1, 5]}, "prompt"),
    (COMPLETIONS, {"prompt": [[1, 2], [10**7]]}, "prompt"),
]


@pytest.mark.parametrize(("endpoint", "fields", "param"), INVALID_VALUES)
def test_invalid_value_names_the_parameter(http, server, endpoint, fields, param):
    body = (chat if endpoint == CHAT else completion)(**fields)
    assert_error(http.post(endpoint, json=body), 400, param=param)
    # refused before anything reached the engine, and without harming it
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_errors_come_before_the_stream(http, stream):
    """A streamed request that is refused gets a plain JSON error, not an event stream."""
    assert_error(http.post(CHAT, json=chat(top_p=7, stream=stream)), 400, param="top_p")
    assert_error(http.post(CHAT, json=chat(model="nope", stream=stream)), 404, "model", "model_not_found")


def test_unknown_model(http, client):
    error = assert_error(http.post(CHAT, json=chat(model="gpt-4o")), 404, "model", "model_not_found")
    assert "gpt-4o" in error["message"]
    assert_error(http.post(COMPLETIONS, json=completion(model="gpt-4o")), 404, "model", "model_not_found")
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"


def test_context_length_exceeded(http, client):
    prompt_tokens = len(chat_ids(MESSAGES))
    max_tokens = MAX_MODEL_LEN - prompt_tokens + 1
    error = assert_error(
        http.post(CHAT, json=chat(max_tokens=max_tokens)), 400, code="context_length_exceeded"
    )
    for number in (prompt_tokens, max_tokens, MAX_MODEL_LEN):
        assert str(number) in error["message"], error
    # exactly at the limit is served (a bias towards <|im_end|> ends it at once)
    end_of_turn = str(hf_tokenizer().convert_tokens_to_ids("<|im_end|>"))
    at_limit = chat(max_tokens=max_tokens - 1, temperature=0, logit_bias={end_of_turn: 100})
    response = http.post(CHAT, json=at_limit)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "stop"

    # a prompt that alone fills the context
    long_prompt = [100] * MAX_MODEL_LEN
    error = assert_error(http.post(COMPLETIONS, json=completion(prompt=long_prompt)), 400)
    assert str(MAX_MODEL_LEN) in error["message"]

    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=[100] * 2000, max_tokens=100)
    assert caught.value.code == "context_length_exceeded"
    assert "2000" in caught.value.message and "100" in caught.value.message


def test_api_key(server):
    body = chat()
    with server.http(auth=False) as anonymous:
        error = assert_error(anonymous.post(CHAT, json=body), 401, code="invalid_api_key")
        assert "API key" in error["message"]
        assert_error(anonymous.get("/v1/models"), 401)
        for header in ("Bearer wrong-key", "test-key", "Basic test-key", "Bearer"):
            response = anonymous.post(CHAT, json=body, headers={"Authorization": header})
            assert_error(response, 401, code="invalid_api_key")
        # the key is checked before the fields are: nothing about the body leaks without it
        assert_error(anonymous.post(CHAT, json={"model": 5, "top_p": 9}), 401)

    for key in ("wrong-key", "TEST-KEY", "test-key2"):
        with server.client(api_key=key) as c, pytest.raises(openai.AuthenticationError) as caught:
            c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    with server.client() as c, pytest.raises(openai.AuthenticationError):
        c.with_options(api_key="nope").models.list()


UNSUPPORTED = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
        "response_format",
    ),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}
            ]
        },
        "messages.0.content",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": ""}}]}]},
        "messages.0.content",
    ),
    ({"messages": [*MESSAGES, {"role": "tool", "content": "42", "tool_call_id": "1"}]}, "messages.1"),
]


@pytest.mark.parametrize(("fields", "param"), UNSUPPORTED)
def test_unsupported_features_are_refused_clearly(http, fields, param):
    error = assert_error(http.post(CHAT, json=chat(**fields)), 400, param=param, code="unsupported_parameter")
    assert "not supported" in error["message"]


@pytest.mark.parametrize(
    ("fields", "param"), [({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of")]
)
def test_unsupported_completion_features(http, fields, param):
    assert_error(
        http.post(COMPLETIONS, json=completion(**fields)), 400, param=param, code="unsupported_parameter"
    )


def test_supported_lookalikes_are_served(http):
    """The harmless values of the refused fields are accepted: no over-refusing."""
    for fields in ({"response_format": {"type": "text"}}, {"tool_choice": "none"}, {"modalities": ["text"]}):
        response = http.post(CHAT, json=chat(**fields))
        assert response.status_code == 200, (fields, response.text)


def test_client_exception_types(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, top_p=1.5)
    assert caught.value.status_code == 400 and caught.value.param == "top_p"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2, temperature=-1, stream=True
        )
    assert caught.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}]
        )
    assert caught.value.param == "tools" and caught.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=0)
    assert caught.value.param == "n"


def test_unknown_routes_and_methods(http):
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get(CHAT), 405)
