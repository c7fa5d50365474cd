"""OpenAI request and response bodies (the subset lowbit serves), as pydantic models.

Request fields use strict types, as OpenAI does: `"max_tokens": "5"` or `"n": true` is a 400
naming the field, not a silent coercion. Fields that OpenAI defines but we do not implement
(tools, images, ...) are declared so that using them is a clear 400 instead of being ignored.
Unknown extra fields are ignored, as OpenAI's own server does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

# Integers that reach torch (a generator seed, a top_k tensor, a penalty the logits are divided by)
# must fit int64: a larger one raises inside the engine step, which fails the engine loop and with
# it every request.
Int64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
Number = StrictFloat | Int64
TokenIds = list[StrictInt]


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(Request):
    include_usage: StrictBool = False


class TextPart(Request):
    type: Literal["text"]
    text: StrictStr


class OtherPart(Request):
    """Any non-text content part (image_url, input_audio, file...): rejected with a clear error."""

    type: StrictStr

    @field_validator("type")
    @classmethod
    def _not_text(cls, value: str) -> str:
        if value == "text":  # a text part that failed TextPart (no "text" string) must not pass here
            raise ValueError("a content part of type 'text' needs a 'text' string")
        return value


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[TextPart | OtherPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[Any] | None = None


class SamplingFields(Request):
    """Fields shared by both endpoints, with OpenAI's ranges and the common extensions."""

    model: StrictStr
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: Int64 | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[StrictStr, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    user: StrictStr | None = None
    # Extensions that vLLM and llama.cpp servers accept too.
    top_k: Int64 | None = None
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0)] | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    stop_token_ids: list[StrictInt] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    add_generation_prompt: StrictBool = True
    # Declared only to be refused clearly.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[StrictStr] | None = None


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None


class TokenizeRequest(Request):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(Request):
    model: StrictStr | None = None
    tokens: TokenIds


# ---------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]
