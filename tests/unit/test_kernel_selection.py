"""Which path the engine takes: Triton kernels on CUDA, the CPU kernels otherwise, for the linear
kernels and for each op's backend (attention, norm, sampler) and the model's decode path.

Selection is decided from the device alone (no tensors are made on it), so the CUDA choice is
checked here without a GPU; tests/model/test_triton_engine.py runs the chosen Triton path itself.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from lowbit.kernels.cpu import extension
from lowbit.kernels.triton_support import HAS_TRITON, use_triton
from lowbit.runtime.backends.attention import ATTENTION_BACKENDS, TorchAttention, TritonAttention
from lowbit.runtime.backends.base import choose
from lowbit.runtime.backends.norm import NORM_BACKENDS
from lowbit.runtime.backends.sampler import SAMPLER_BACKENDS
from lowbit.runtime.layers.decode_layer import CompiledCPULayers
from lowbit.runtime.models.config import ModelConfig
from lowbit.runtime.models.llama import LlamaForCausalLM
from lowbit.runtime.quant import GGMLConfig, QuantizedWeight, W4A16Config, W8A8Config, W8A16Config, method_for
from lowbit.runtime.quant.rtn import quantize_w4a16_rtn

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


def kernel_name(config, device: torch.device, dtype: torch.dtype, shape=(64, 128)) -> str:
    return method_for(config).select_kernel(*shape, device, dtype).name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_takes_the_triton_gemms(dtype):
    assert kernel_name(W4A16Config(group_size=32), CUDA, dtype) == "triton-w4a16"
    assert kernel_name(W4A16Config(group_size=128, act_order=True), CUDA, dtype) == "triton-w4a16"
    assert kernel_name(W8A8Config(), CUDA, dtype) == "triton-w8a8"
    assert kernel_name(W8A16Config(group_size=32), CUDA, dtype) == "triton-ggml-int8"
    for qtype in ("Q4_K", "Q6_K", "IQ4_XS", "Q5_0"):
        assert kernel_name(GGMLConfig(qtype), CUDA, dtype, shape=(64, 256)) == "triton-ggml"
    assert use_triton(CUDA)


def test_cpu_takes_the_cpu_kernels(monkeypatch):
    # The test session interprets Triton, yet a CPU engine must still take the CPU kernels.
    monkeypatch.delenv("LOWBIT_TRITON_ON_CPU", raising=False)
    compiled = extension.load() is not None  # else torch's packed kernels
    int4, int8 = ("cpu-group-int4", "cpu-group-int8") if compiled else ("cpu-int4pack", "cpu-int8pack")
    # Groups of 32 (GGUF Q4_0/Q4_1/Q8_0) run as GGUF blocks where the CPU lacks AVX-512.
    blocks = compiled and not extension.load().has_avx512()
    int4_g32, int8_g32 = ("cpu-ggml-int4", "cpu-ggml-int8") if blocks else (int4, int8)
    assert kernel_name(W4A16Config(group_size=32), CPU, torch.bfloat16) == int4_g32
    assert kernel_name(W4A16Config(group_size=128), CPU, torch.bfloat16) == int4
    assert kernel_name(W4A16Config(group_size=32, act_order=True), CPU, torch.bfloat16) == int4
    fp32_int4 = int4_g32 if compiled else "dequantized"  # int4pack is bf16-only
    assert kernel_name(W4A16Config(group_size=32), CPU, torch.float32) == fp32_int4
    assert kernel_name(W8A16Config(), CPU, torch.bfloat16) == int8
    assert kernel_name(W8A16Config(group_size=32), CPU, torch.bfloat16) == (
        int8_g32 if compiled else "dequantized"
    )
    assert kernel_name(W8A8Config(), CPU, torch.bfloat16) == "cpu-int-mm"
    ggml = "cpu-ggml" if compiled else "dequantized"
    assert kernel_name(GGMLConfig("Q4_K"), CPU, torch.bfloat16, shape=(64, 256)) == ggml
    assert not use_triton(CPU)


@pytest.mark.skipif(
    extension.load() is None or extension.load().has_avx512(),
    reason="GGUF-block kernels are chosen without AVX-512",
)
def test_values_the_block_layout_cannot_hold_take_the_next_kernel():
    """GGUF blocks store fp16 scales: group-32 weights whose scales are not fp16 values (RTN or
    GPTQ output in fp32) load onto the group GEMM instead, with the same results."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (32, 64), generator=gen, dtype=torch.uint8)
    qweight = q[:, 0::2] | (q[:, 1::2] << 4)
    fp16_scales = torch.rand(32, 2, generator=gen).half().float()
    for scales, expected in ((fp16_scales, "cpu-ggml-int4"), (fp16_scales + 1e-6, "cpu-group-int4")):
        weight = QuantizedWeight(
            W4A16Config(32), 32, 64, {"qweight": qweight, "scales": scales, "mins": -8 * scales}
        )
        method = method_for(weight.config)
        packed = method.load(weight, CPU, torch.float32)
        assert packed.kernel.name == expected
        x = torch.randn(3, 64, generator=gen)
        torch.testing.assert_close(packed(x), x @ method.dequantize(weight.tensors).T, rtol=1e-5, atol=1e-5)


def test_cpu_opt_in_to_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LOWBIT_TRITON_ON_CPU", "1")
    assert use_triton(CPU)
    assert kernel_name(W4A16Config(group_size=32), CPU, torch.bfloat16) == "triton-w4a16"
    assert kernel_name(GGMLConfig("Q3_K"), CPU, torch.bfloat16, shape=(64, 256)) == "triton-ggml"
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the opt-in alone never compiles for a CPU
    assert not use_triton(CPU)


# ----------------------------------------------------------------------------- op backends


def _chosen(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    return {
        "attention": choose("attention", ATTENTION_BACKENDS, device, dtype).name,
        "norm": choose("norm", NORM_BACKENDS, device, dtype).name,
        "sampler": choose("sampler", SAMPLER_BACKENDS).name,
    }


def test_each_op_chooses_one_backend_and_logs_why(monkeypatch, caplog):
    monkeypatch.delenv("LOWBIT_TRITON_ON_CPU", raising=False)
    expected = "compiled-cpu" if extension.load() is not None else "torch"
    with caplog.at_level(logging.DEBUG, logger="lowbit"):
        assert _chosen(CPU) == {"attention": expected, "norm": expected, "sampler": expected}
    assert f"attention: {expected}; not triton (Triton kernels run on CUDA" in caplog.text
    assert f"sampler: {expected}" in caplog.text


def test_without_the_compiled_ops_the_torch_backends_say_why(monkeypatch, caplog):
    monkeypatch.delenv("LOWBIT_TRITON_ON_CPU", raising=False)
    monkeypatch.setattr(extension, "load", lambda: None)
    with caplog.at_level(logging.DEBUG, logger="lowbit"):
        assert _chosen(CPU) == {"attention": "torch", "norm": "torch", "sampler": "torch"}
    assert "norm: torch; not triton (" in caplog.text
    assert "; not compiled-cpu (compiled CPU ops unavailable)" in caplog.text
    assert "sampler: torch; not compiled-cpu (compiled CPU ops unavailable)" in caplog.text


def test_cuda_takes_the_triton_backends():
    assert _chosen(CUDA, torch.float16) == {
        "attention": "triton",
        "norm": "triton",
        "sampler": _chosen(CPU)["sampler"],
    }
    assert CompiledCPULayers.can_implement([], CUDA, torch.float16) == "CPU only"


def test_cpu_opt_in_to_the_interpreter_takes_the_triton_backends(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LOWBIT_TRITON_ON_CPU", "1")
    assert _chosen(CPU)["attention"] == _chosen(CPU)["norm"] == "triton"


def test_no_backend_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no backend can run attention: triton \(.*\); torch \(refused\)"):

        class Refused(TorchAttention):
            name = "torch"

            @classmethod
            def can_implement(cls, device, dtype):
                return "refused"

        choose("attention", (TritonAttention, Refused), CPU, torch.float32)


def _tiny_model(quantized: bool, dtype: torch.dtype) -> LlamaForCausalLM:
    """Two random layers, dense or RTN-quantized at group size 32 (what cpu_gemm takes)."""
    config = ModelConfig(
        architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    weights = {
        "model.embed_tokens.weight": torch.randn(64, 64, generator=g),
        "model.norm.weight": torch.ones(64),
    }
    shapes = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
              "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
              "mlp.down_proj": (64, 128)}  # fmt: skip
    for i in range(2):
        weights[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(64)
        weights[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(64)
        for name, shape in shapes.items():
            w = torch.randn(*shape, generator=g) * 0.1
            weights[f"model.layers.{i}.{name}.weight"] = quantize_w4a16_rtn(w, 32) if quantized else w
    return LlamaForCausalLM(config, weights, CPU, dtype)


def test_the_decode_path_is_a_named_choice_of_the_model(monkeypatch, caplog):
    monkeypatch.delenv("LOWBIT_TRITON_ON_CPU", raising=False)
    if extension.load() is None:
        pytest.skip("no C++ compiler: the compiled decode layers are unavailable")
    assert _tiny_model(True, torch.bfloat16).decode_path.name == "compiled-cpu-layers"
    with caplog.at_level(logging.DEBUG, logger="lowbit"):
        dense = _tiny_model(False, torch.float32)
    assert dense.decode_path.name == "eager-layers"
    assert (
        "decode path: eager-layers; not compiled-cpu-layers (layer 0's qkv cannot run in the compiled layer"
        in (caplog.text)
    )


def test_lowbit_log_prints_the_choices():
    code = (
        "from lowbit.runtime.backends.base import choose\n"
        "from lowbit.runtime.backends.sampler import SAMPLER_BACKENDS\n"
        "choose('sampler', SAMPLER_BACKENDS)\n"
    )
    env = {**os.environ, "LOWBIT_LOG": "debug"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "DEBUG lowbit.runtime.backends.base: sampler: " in done.stderr
    env["LOWBIT_LOG"] = "warning"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "sampler" not in done.stderr
