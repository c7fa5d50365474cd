"""Engine outputs -> OpenAI response bodies and streamed chunks."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from lowbit.loaders.tokenizer import Tokenizer
from lowbit.runtime.outputs import CompletionOutput, RequestOutput, TokenLogprob


@functools.cache
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


@dataclass(frozen=True)
class Header:
    """What every body and chunk of one response carries."""

    id: str
    created: int
    model: str
    system_fingerprint: str


class TokenStrings:
    """Token ids as the text and raw bytes OpenAI's logprobs report."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one instance per server, lives as long)
    def get(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.backend.id_to_token(token_id) or ""
        decoder = _byte_decoder()
        if piece and all(c in decoder for c in piece):  # byte-level BPE: exact bytes
            raw = bytes(decoder[c] for c in piece)
            return raw.decode("utf-8", errors="replace"), list(raw)
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text, list(text.encode("utf-8"))


def usage(output: RequestOutput) -> dict:
    completion = sum(len(c.token_ids) for c in output.outputs)
    prompt = len(output.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def merge_usage(usages: list[dict]) -> dict:
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {k: sum(u[k] for u in usages) for k in keys}


# ---------------------------------------------------------------------- chat


def chat_logprobs(entries: list[TokenLogprob], strings: TokenStrings) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text, raw = strings.get(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {
        "content": [
            {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top.items()]}
            for e in entries
        ]
    }


def chat_completion(header: Header, output: RequestOutput, strings: TokenStrings) -> dict:
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(c.logprobs, strings) if c.logprobs is not None else None,
            "finish_reason": finish_reason(c),
        }
        for c in output.outputs
    ]
    return {
        "id": header.id,
        "object": "chat.completion",
        "created": header.created,
        "model": header.model,
        "system_fingerprint": header.system_fingerprint,
        "choices": choices,
        "usage": usage(output),
    }


def chat_chunk(header: Header, choices: list[dict], usage_value=None, include_usage: bool = False) -> dict:
    chunk = {
        "id": header.id,
        "object": "chat.completion.chunk",
        "created": header.created,
        "model": header.model,
        "system_fingerprint": header.system_fingerprint,
        "choices": choices,
    }
    if include_usage:
        chunk["usage"] = usage_value
    return chunk


def chat_delta_choices(
    output: RequestOutput, started: set[int], strings: TokenStrings, ended: set[int]
) -> list[dict]:
    """The choices of one streamed chunk: a role delta the first time a choice speaks, its new
    text, its new tokens' logprobs, and its finish_reason when it ends (once: `ended` holds the
    choices whose end was sent)."""
    choices = []
    for c in output.outputs:
        if c.index in ended or not (c.delta_text or c.delta_token_ids or c.finished):
            continue
        if c.finished:
            ended.add(c.index)
        delta: dict = {}
        if c.index not in started:
            started.add(c.index)
            delta["role"] = "assistant"
        if c.delta_text or "role" in delta:
            delta["content"] = c.delta_text
        logprobs = None
        if c.logprobs is not None and c.delta_token_ids:
            logprobs = chat_logprobs(c.logprobs[-len(c.delta_token_ids) :], strings)
        choices.append(
            {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason(c)}
        )
    return choices


# ---------------------------------------------------------------------- completions


def completion_logprobs(entries: list[TokenLogprob], strings: TokenStrings, offset: int = 0) -> dict:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        text, _ = strings.get(e.token_id)
        tokens.append(text)
        token_logprobs.append(e.logprob)
        top.append({strings.get(t)[0]: lp for t, lp in e.top.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def completion_choice(
    index: int, c: CompletionOutput, text: str, strings: TokenStrings, entries=None, offset: int = 0
) -> dict:
    """One choice, or a streamed chunk's piece of one whose text starts at `offset` of the
    choice's whole text (the logprobs' text_offset counts from the choice's start)."""
    entries = c.logprobs if entries is None else entries
    logprobs = completion_logprobs(entries, strings, offset) if c.logprobs is not None else None
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(c)}


def completion_body(
    header: Header, choices: list[dict], usage_value: dict | None, with_usage: bool = True
) -> dict:
    """A completion, or a streamed chunk of one: chunks carry "usage" (null until the last one)
    only when the client asked for stream_options.include_usage, as OpenAI's do."""
    body = {
        "id": header.id,
        "object": "text_completion",
        "created": header.created,
        "model": header.model,
        "system_fingerprint": header.system_fingerprint,
        "choices": choices,
    }
    if with_usage:
        body["usage"] = usage_value
    return body


def finish_reason(c: CompletionOutput) -> str | None:
    """OpenAI knows "stop" and "length"; an aborted request reports "abort" like vLLM."""
    return c.finish_reason
