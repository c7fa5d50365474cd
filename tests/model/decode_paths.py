"""The check both GGUF and family tests make of the compiled CPU decode layer: decode steps on it
give the eager layers' greedy tokens and logprobs (same kernels, same roundings)."""

from __future__ import annotations

from lowbit import LLM, SamplingParams

# The compiled layer's small ops round as the eager ones but sum in another order
# (tests/model/test_cpu_ops_engine.py allows 0.02 in bf16).
LOGPROB_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.02}


def assert_compiled_decode_equals_eager(llm: LLM, prompt: list[int], max_tokens: int, dtype: str) -> None:
    model = llm.engine.model
    assert model.decode_path.name == "compiled-cpu-layers"
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=1)
    compiled = llm.generate([prompt], params)[0].outputs[0]
    compiled_path, model.decode_path = model.decode_path, model.eager_layers
    try:
        eager = llm.generate([prompt], params)[0].outputs[0]
    finally:
        model.decode_path = compiled_path
    assert list(compiled.token_ids) == list(eager.token_ids)
    for ours, theirs in zip(compiled.logprobs, eager.logprobs, strict=True):
        assert abs(ours.logprob - theirs.logprob) <= LOGPROB_TOLERANCE[dtype]
