"""Which path the engine takes: Triton kernels on CUDA, the CPU kernels otherwise.

Selection is decided from the device alone (no tensors are made on it), so the CUDA choice is
checked here without a GPU; tests/model/test_triton_engine.py runs the chosen Triton path itself.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels import cpu_ops
from lowbit.kernels.triton_support import HAS_TRITON, use_triton
from lowbit.runtime.quant import W4A16Config, W8A8Config, W8A16Config, method_for

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


def kernel_name(config, device: torch.device, dtype: torch.dtype, shape=(64, 128)) -> str:
    return method_for(config).select_kernel(*shape, device, dtype).name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_takes_the_triton_gemms(dtype):
    assert kernel_name(W4A16Config(group_size=32), CUDA, dtype) == "triton-w4a16"
    assert kernel_name(W4A16Config(group_size=128, act_order=True), CUDA, dtype) == "triton-w4a16"
    assert kernel_name(W8A8Config(), CUDA, dtype) == "triton-w8a8"
    assert use_triton(CUDA)


def test_cpu_takes_the_cpu_kernels(monkeypatch):
    # The test session interprets Triton, yet a CPU engine must still take the CPU kernels.
    monkeypatch.delenv("LOWBIT_TRITON_ON_CPU", raising=False)
    compiled = cpu_ops.load() is not None  # else torch's packed kernels
    int4, int8 = ("cpu-group-int4", "cpu-group-int8") if compiled else ("cpu-int4pack", "cpu-int8pack")
    assert kernel_name(W4A16Config(group_size=32), CPU, torch.bfloat16) == int4
    fp32_int4 = int4 if compiled else "dequantized"  # int4pack is bf16-only
    assert kernel_name(W4A16Config(group_size=32), CPU, torch.float32) == fp32_int4
    assert kernel_name(W8A16Config(), CPU, torch.bfloat16) == int8
    assert kernel_name(W8A8Config(), CPU, torch.bfloat16) == "cpu-int-mm"
    assert not use_triton(CPU)


def test_cpu_opt_in_to_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LOWBIT_TRITON_ON_CPU", "1")
    assert use_triton(CPU)
    assert kernel_name(W4A16Config(group_size=32), CPU, torch.bfloat16) == "triton-w4a16"
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the opt-in alone never compiles for a CPU
    assert not use_triton(CPU)
