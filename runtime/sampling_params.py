"""`SamplingParams`: how one request picks its tokens and when it stops. Validated on creation;
every error is a ValueError that names the field."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

MAX_LOGPROBS = 20
MAX_N = 128  # completions per request; seeds leave room for seed + index to stay in int64


def _check(ok: bool, name: str, requirement: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {requirement}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_tuple(value: object, name: str, requirement: str) -> tuple:
    try:
        return tuple(value or ())  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(f"{name} must be {requirement}, got {value!r}") from None


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_REAL_FIELDS = {
    "temperature": (lambda v: v >= 0, ">= 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "> 0"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
}


def _token_id(key: object) -> int:
    """logit_bias keys: ints, or the decimal strings OpenAI's JSON uses. 1.7 is not a token."""
    if _is_int(key):
        return key
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    raise ValueError(key)


@dataclass(frozen=True)
class SamplingParams:
    """Same names and meanings as vLLM's and OpenAI's.

    temperature 0 is greedy. top_k 0 (or -1) and top_p 1 and min_p 0 disable those filters.
    repetition_penalty (HF/CTRL style, over prompt and output) divides positive logits and multiplies
    negative ones; presence/frequency penalties (OpenAI style, over the output) subtract from logits.
    max_tokens None means "until the context is full". logprobs k returns the chosen token's
    log-probability and the k most likely alternatives, from the model's raw distribution.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    max_tokens: int | None = 16
    logprobs: int | None = None
    logit_bias: Mapping[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self._normalize()
        self._validate()

    def _normalize(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else _as_tuple(self.stop, "stop", "strings")
        object.__setattr__(self, "stop", stop)
        stop_token_ids = _as_tuple(self.stop_token_ids, "stop_token_ids", "a sequence of token ids")
        object.__setattr__(self, "stop_token_ids", stop_token_ids)
        if self.logit_bias is not None:
            _check(
                isinstance(self.logit_bias, Mapping),
                "logit_bias",
                "a mapping of token id to bias",
                self.logit_bias,
            )
            try:
                bias = {_token_id(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                bias = None
            _check(bias is not None, "logit_bias", "a mapping of integer token id to number", self.logit_bias)
            object.__setattr__(self, "logit_bias", MappingProxyType(bias))
        if _is_int(self.top_k) and self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        for name in _REAL_FIELDS:  # ints too (10**30 must not reach torch as an int)
            if _is_real(getattr(self, name)):
                object.__setattr__(self, name, float(getattr(self, name)))

    def _validate(self) -> None:
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"an integer in [1, {MAX_N}]", self.n)
        for name, (ok, requirement) in _REAL_FIELDS.items():
            value = getattr(self, name)
            _check(_is_real(value) and ok(value), name, f"a finite number {requirement}", value)
        _check(_is_int(self.top_k) and 0 <= self.top_k < 2**63, "top_k",
               "0 or -1 (disabled) or a positive integer", self.top_k)  # fmt: skip
        _check(self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**63 - MAX_N), "seed",
               "None or an integer that fits int64", self.seed)  # fmt: skip
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop)
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "non-negative integers", self.stop_token_ids)  # fmt: skip
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
               "an integer >= 1 or None", self.max_tokens)  # fmt: skip
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", f"an integer in [0, {MAX_LOGPROBS}] or None", self.logprobs)  # fmt: skip
        if self.logit_bias is not None:
            for token, bias in self.logit_bias.items():
                _check(token >= 0, "logit_bias", "keyed by non-negative token ids", token)
                _check(-100 <= bias <= 100, "logit_bias", "values in [-100, 100]", bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids that the model cannot produce are a request error, not a crash at sampling."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias or {})):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"{name} has token ids outside the vocabulary of {vocab_size}: {bad[:5]}")
