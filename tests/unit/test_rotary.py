"""RoPE frequencies: GGUF's precomputed `rope_freqs` factors must reproduce HF's llama3 scaling,
which is how Llama 3.1 GGUF files carry it (no scaling type in the metadata, a factor tensor)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lowbit.runtime.layers.rotary import inverse_frequencies
from lowbit.runtime.models.config import RopeScaling

LLAMA3 = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192, "rope_theta": 500000.0,
}  # fmt: skip
HEAD_DIM = 128


def _hf_llama3_inv_freq() -> torch.Tensor:
    config = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, rope_parameters=LLAMA3)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return inv_freq.float()


def test_llama3_scaling_matches_transformers():
    scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    torch.testing.assert_close(inverse_frequencies(HEAD_DIM, 500000.0, scaling), _hf_llama3_inv_freq())


def test_gguf_freq_factors_reproduce_llama3_scaling():
    base = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    factors = base / _hf_llama3_inv_freq()  # what llama.cpp's converter stores as rope_freqs
    ours = inverse_frequencies(HEAD_DIM, 500000.0, RopeScaling(), freq_factors=factors)
    torch.testing.assert_close(ours, _hf_llama3_inv_freq())
    assert not torch.allclose(ours, base)  # the factors really change something here


def test_tables_are_hf_cos_sin_of_each_position():
    """The per-step tables against transformers' LlamaRotaryEmbedding on the same positions, in an
    order no table would store them (decode steps of a batch), out to a long context."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from lowbit.runtime.layers.rotary import RotaryEmbedding

    config = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, rope_parameters=LLAMA3)
    positions = torch.tensor([8191, 0, 17, 4096, 3, 3])
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions[None])
    cos, sin = RotaryEmbedding(_hf_llama3_inv_freq(), torch.device("cpu")).tables(positions)
    assert cos.shape == sin.shape == (len(positions), 1, HEAD_DIM)
    torch.testing.assert_close(cos[:, 0], hf_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, 0], hf_sin[0], rtol=0, atol=1e-6)
