"""`LLM`: the embedded Python front door, shaped like vLLM's."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from lowbit.runtime.config import EngineConfig
from lowbit.runtime.engine import Engine
from lowbit.runtime.outputs import RequestOutput
from lowbit.runtime.sampling_params import SamplingParams

Prompt = str | list[int]
Conversation = Sequence[Mapping[str, Any]]


class LLM:
    """`LLM()` loads the default model; `LLM(path)` a GGUF file or an HF model directory.

    Keyword arguments are `EngineConfig` fields, e.g. `dtype="float32"`, `kv_cache_dtype="int8"`,
    `quantization="w4a16"` (round-to-nearest on load for dense HF checkpoints).
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        self.engine = Engine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); results come back in the order given."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt, as text or as token ids
        params = self._params_per_prompt(sampling_params, len(prompts))
        ids = [self._add(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[i] for i in ids]

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and generate the assistant's turn."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        prompts = [self.tokenizer.apply_chat_template(c) for c in conversations]
        return self.generate(prompts, sampling_params)

    def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that advanced it; closing the iterator
        early aborts the request and frees its KV blocks."""
        request_id = self._add(prompt, sampling_params or SamplingParams())
        done = False
        try:
            while not done:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        done = output.finished
                        yield output
        finally:
            if not done:
                self.engine.abort(request_id)

    def reset_prefix_cache(self) -> None:
        """Drop every cached prefix that no request is using (requests in flight keep theirs)."""
        self.engine.block_manager.reset_prefix_cache()

    def _add(self, prompt: Prompt, params: SamplingParams) -> str:
        request_id = str(next(self._ids))
        self.engine.add_request(request_id, prompt, params)
        return request_id

    @staticmethod
    def _params_per_prompt(
        params: SamplingParams | Sequence[SamplingParams] | None, count: int
    ) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            return [params or SamplingParams()] * count
        if len(params) != count:
            raise ValueError(f"got {len(params)} sampling_params for {count} prompts")
        return list(params)
