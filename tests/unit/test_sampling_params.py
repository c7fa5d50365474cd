"""SamplingParams: validation (a ValueError naming the field), normalization and immutability."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lowbit.runtime.sampling_params import MAX_LOGPROBS, SamplingParams

INVALID = [
    # (field, bad value)
    ("temperature", -0.1),
    ("temperature", -1),
    ("temperature", math.nan),
    ("temperature", "1.0"),
    ("top_p", 0),
    ("top_p", 0.0),
    ("top_p", 1.0001),
    ("top_p", -0.5),
    ("top_p", math.nan),
    ("top_k", -2),
    ("top_k", 1.5),
    ("top_k", 2.0),
    ("top_k", -1.0),
    ("top_k", True),
    ("top_k", "3"),
    ("min_p", 1.01),
    ("min_p", -0.01),
    ("min_p", math.nan),
    ("repetition_penalty", 0),
    ("repetition_penalty", -1.0),
    ("presence_penalty", 2.01),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 2.5),
    ("frequency_penalty", -3),
    ("n", 0),
    ("n", -1),
    ("n", 1.0),
    ("n", True),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("max_tokens", 4.0),
    ("max_tokens", True),
    ("logprobs", MAX_LOGPROBS + 1),
    ("logprobs", -1),
    ("logprobs", 2.0),
    ("logprobs", True),
    ("seed", "x"),
    ("seed", 1.5),
    ("seed", False),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", ["ok", 3]),
    ("stop", 5),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1, -3]),
    ("stop_token_ids", [1.0]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", 7),
    ("logit_bias", {5: 101}),
    ("logit_bias", {5: -100.5}),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {5: math.nan}),
    ("logit_bias", {"x": 1.0}),
    ("logit_bias", {5: "strong"}),
    ("logit_bias", {5: None}),
    ("logit_bias", [(5, 1.0)]),
]


@pytest.mark.parametrize(("field", "value"), INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_raises_value_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


VALID_EDGES = [
    ("temperature", 0),
    ("temperature", 0.0),
    ("temperature", 2.5),
    ("top_p", 1),
    ("top_p", 1e-6),
    ("top_k", 0),
    ("top_k", 1),
    ("min_p", 0),
    ("min_p", 1),
    ("repetition_penalty", 1e-3),
    ("presence_penalty", -2),
    ("presence_penalty", 2),
    ("frequency_penalty", -2.0),
    ("frequency_penalty", 2.0),
    ("n", 1),
    ("max_tokens", 1),
    ("max_tokens", None),
    ("logprobs", 0),
    ("logprobs", MAX_LOGPROBS),
    ("logprobs", None),
    ("seed", 0),
    ("seed", -7),
    ("seed", None),
    ("stop_token_ids", [0]),
    ("logit_bias", {0: 100}),
    ("logit_bias", {0: -100}),
    ("logit_bias", {}),
]


@pytest.mark.parametrize(("field", "value"), VALID_EDGES, ids=[f"{f}={v!r}" for f, v in VALID_EDGES])
def test_boundary_values_are_accepted(field: str, value: object) -> None:
    SamplingParams(**{field: value})


def test_defaults() -> None:
    p = SamplingParams()
    assert p.n == 1
    assert p.temperature == 1.0
    assert p.top_k == 0
    assert p.top_p == 1.0
    assert p.stop == ()
    assert p.stop_token_ids == ()
    assert p.logit_bias is None
    assert not p.greedy
    assert not p.has_penalties


def test_stop_string_becomes_a_one_element_tuple() -> None:
    assert SamplingParams(stop="###").stop == ("###",)


def test_stop_sequence_is_copied_into_a_tuple() -> None:
    stops = ["a", "bc"]
    p = SamplingParams(stop=stops)
    stops.append("zzz")
    assert p.stop == ("a", "bc")


def test_stop_none_means_no_stops() -> None:
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop_token_ids=None).stop_token_ids == ()


def test_stop_token_ids_are_copied_into_a_tuple() -> None:
    ids = [3, 1]
    p = SamplingParams(stop_token_ids=ids)
    ids.append(9)
    assert p.stop_token_ids == (3, 1)


def test_top_k_minus_one_means_disabled() -> None:
    assert SamplingParams(top_k=-1).top_k == 0


def test_logit_bias_keys_are_coerced_to_int_and_values_to_float() -> None:
    p = SamplingParams(logit_bias={"12": 5, 3: -1.5})
    assert dict(p.logit_bias) == {12: 5.0, 3: -1.5}
    assert all(type(k) is int for k in p.logit_bias)
    assert all(type(v) is float for v in p.logit_bias.values())


def test_logit_bias_is_an_immutable_copy() -> None:
    source = {1: 2.0}
    p = SamplingParams(logit_bias=source)
    source[1] = 50.0
    source[7] = 1.0
    assert dict(p.logit_bias) == {1: 2.0}
    with pytest.raises(TypeError):
        p.logit_bias[1] = 3.0  # type: ignore[index]
    with pytest.raises(TypeError):
        p.logit_bias[99] = 3.0  # type: ignore[index]


def test_dataclass_is_frozen() -> None:
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.stop = ("x",)  # type: ignore[misc]
    assert p.temperature == 1.0


def test_greedy_is_temperature_zero() -> None:
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-6).greedy


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, False),
        ({"repetition_penalty": 1.1}, True),
        ({"presence_penalty": 0.5}, True),
        ({"frequency_penalty": -0.5}, True),
        ({"logit_bias": {1: 5.0}}, False),
    ],
)
def test_has_penalties(kwargs: dict, expected: bool) -> None:
    assert SamplingParams(**kwargs).has_penalties is expected


def test_check_vocab_rejects_ids_outside_the_vocabulary() -> None:
    SamplingParams(stop_token_ids=[99], logit_bias={99: 1.0}).check_vocab(100)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[5, 100]).check_vocab(100)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={100: 1.0}).check_vocab(100)
