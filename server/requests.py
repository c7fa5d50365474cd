"""OpenAI request bodies -> (prompt token ids, SamplingParams), refusing what we do not serve."""

from __future__ import annotations

from lowbit.loaders.tokenizer import Tokenizer
from lowbit.runtime.sampling_params import SamplingParams

from .errors import APIError, from_value_error
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields

# Defaults where OpenAI and our engine differ: OpenAI's sampling defaults are 1.0, and a chat
# completion runs until the model stops (or the context is full), a legacy completion 16 tokens.
CHAT_MAX_TOKENS = None
COMPLETION_MAX_TOKENS = 16


def unsupported(feature: str, param: str) -> APIError:
    return APIError(f"{feature} is not supported by this server", 400, param, "unsupported_parameter")


def check_chat_features(body: ChatCompletionRequest) -> None:
    for param in ("tools", "functions"):
        if getattr(body, param):
            raise unsupported("Tool and function calling", param)
    for param in ("tool_choice", "function_call"):
        if getattr(body, param) not in (None, "none"):
            raise unsupported("Tool and function calling", param)
    if body.response_format and body.response_format.get("type") != "text":
        raise unsupported(f"response_format {body.response_format.get('type')!r}", "response_format")
    if body.audio is not None or (body.modalities and set(body.modalities) != {"text"}):
        raise unsupported("Audio output", "modalities")


def message_text(message: ChatMessage, index: int) -> str:
    if message.role in ("tool", "function") or message.tool_calls:
        raise unsupported("Tool messages", f"messages.{index}")
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text":
            raise unsupported(f"Content of type {part.type!r} (only text)", f"messages.{index}.content")
        texts.append(part.text)
    return "\n".join(texts)


def chat_prompt(body: ChatCompletionRequest, tokenizer: Tokenizer) -> list[int]:
    check_chat_features(body)
    messages = [
        # "developer" is the newer name OpenAI gives the system role.
        {"role": "system" if m.role == "developer" else m.role, "content": message_text(m, i)}
        for i, m in enumerate(body.messages)
    ]
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
    except ValueError as e:
        raise APIError(str(e), 400, "messages") from None
    except Exception as e:  # a template raising on an unexpected conversation shape
        raise APIError(f"the chat template rejected these messages: {e}", 400, "messages") from None


def _prompts(body: CompletionRequest) -> list[str | list[int]]:
    """A completions request's prompts: it holds a string, a token list, or a list of either."""
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
        return [prompt]
    if not prompt:
        raise APIError("prompt must not be an empty list", 400, "prompt")
    return list(prompt)


def prompt_count(body: CompletionRequest) -> int:
    return len(_prompts(body))


def check_completion_features(body: CompletionRequest) -> None:
    if body.echo:
        raise unsupported("echo", "echo")
    if body.suffix:
        raise unsupported("suffix", "suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise unsupported("best_of different from n", "best_of")


def completion_prompts(body: CompletionRequest, tokenizer: Tokenizer) -> list[list[int]]:
    check_completion_features(body)
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in _prompts(body)]


def sampling_params(body: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    if body.stream_options is not None and not body.stream:
        raise APIError("stream_options is only allowed when stream is true", 400, "stream_options")
    try:
        return SamplingParams(
            n=body.n or 1,
            temperature=1.0 if body.temperature is None else float(body.temperature),
            top_p=1.0 if body.top_p is None else float(body.top_p),
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=body.seed,
            stop=body.stop or (),
            stop_token_ids=body.stop_token_ids or (),
            max_tokens=max_tokens,
            logprobs=logprobs,
            logit_bias=body.logit_bias,
            ignore_eos=body.ignore_eos,
            skip_special_tokens=body.skip_special_tokens,
        )
    except ValueError as e:
        raise from_value_error(e) from None


def chat_sampling_params(body: ChatCompletionRequest) -> SamplingParams:
    max_tokens = body.max_completion_tokens or body.max_tokens or CHAT_MAX_TOKENS
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs and not body.logprobs:
        raise APIError("top_logprobs needs logprobs set to true", 400, "top_logprobs")
    return sampling_params(body, max_tokens, logprobs)


def completion_sampling_params(body: CompletionRequest) -> SamplingParams:
    return sampling_params(body, body.max_tokens or COMPLETION_MAX_TOKENS, body.logprobs)
