"""The quantization algorithms on their own, in plain torch on tiny shapes:

- the int4 grid (asymmetric and symmetric) against hand-computed codes;
- GPTQ: reduces to round-to-nearest when the Hessian is diagonal (nothing to propagate), beats
  RTN on the layer objective ||X W^T - X Q^T||^2 on correlated inputs with outlier channels (held-out
  X), act-order's permutation and column order, the running Hessian, and its errors;
- AWQ: the searched scales never do worse than plain RTN (s = 1) and do better on outlier channels;
- SmoothQuant's factors against the formula, and the balance they strike;
- QuantizeOptions' validation messages;
- calibration windows (contiguous, seeded) and the input hooks.

Errors are measured with an independent dequantizer (codes, scales and mins read back here) and
plain matmuls; no expected value comes from the code under test.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from lowbit.kernels.w4a16_matmul import unpack_int4
from lowbit.loaders.tokenizer import Tokenizer
from lowbit.quantize.awq import fake_int4, scaled_error, search_scales
from lowbit.quantize.calibration import calibration_samples, watch_inputs
from lowbit.quantize.gptq import Hessian, gptq_quantize
from lowbit.quantize.pipeline import QuantizeOptions
from lowbit.quantize.smoothquant import search_alpha, smoothing_factors
from lowbit.runtime.quant import QuantizedWeight, method_for
from lowbit.runtime.quant.rtn import int4_grid, int4_round, quantize_w4a16_rtn

N_OUT, K_IN = 48, 128
# GPTQ's error on held-out inputs must be below this share of RTN's (measured on the data below:
# 0.48 to 0.55 in column order, 0.26 to 0.30 with act-order; a GPTQ that propagated no error would
# sit at 1.0).
GPTQ_VS_RTN = 0.75


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(qw: QuantizedWeight) -> torch.Tensor:
    """int64 [N, K] integer codes in the stored column order."""
    return unpack_int4(qw.tensors["qweight"]).to(torch.int64)


def _dequantize_ref(qw: QuantizedWeight) -> torch.Tensor:
    """w = q * scale + min per group, columns put back where `perm` says they came from."""
    group = qw.config.group_size
    scales = qw.tensors["scales"].repeat_interleave(group, dim=1)
    mins = qw.tensors["mins"].repeat_interleave(group, dim=1)
    stored = _codes(qw).float() * scales + mins
    if "perm" not in qw.tensors:
        return stored
    out = torch.empty_like(stored)
    out[:, qw.tensors["perm"]] = stored
    return out


def _dequantize(qw: QuantizedWeight) -> torch.Tensor:
    return method_for(qw.config).dequantize(qw.tensors)


def _correlated_inputs(tokens: int, seed: int) -> torch.Tensor:
    """X = Z @ A: inputs mixed by a fixed random matrix (so the Hessian is far from diagonal), four
    channels ten times larger than the rest. Same A for every seed: a new seed is held-out data."""
    mixing = torch.randn(K_IN, K_IN, generator=_gen(1)) / K_IN**0.5 + torch.eye(K_IN)
    scale = torch.ones(K_IN)
    scale[torch.randperm(K_IN, generator=_gen(2))[:4]] = 10.0
    return (torch.randn(tokens, K_IN, generator=_gen(seed)) @ mixing) * scale


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.double().T @ x.double() / x.shape[0]


def _output_error(x: torch.Tensor, weight: torch.Tensor, dequantized: torch.Tensor) -> float:
    return (x.double() @ (weight.double() - dequantized.double()).T).pow(2).sum().item()


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return torch.randn(N_OUT, K_IN, generator=_gen(0))


# ---------------------------------------------------------------------- the int4 grid


def test_int4_grid_asymmetric_by_hand():
    w = torch.tensor([[-1.0, 0.0, 0.75, 2.0]])
    scale, zero = int4_grid(w, symmetric=False)
    # range [-1, 2] over 15 steps: scale 0.2, zero point round(1 / 0.2) = 5
    torch.testing.assert_close(scale, torch.tensor([0.2]))
    assert zero.tolist() == [5.0]
    # w / 0.2 + 5 = 0, 5, 8.75, 15
    assert int4_round(w, scale, zero).tolist() == [[0, 5, 9, 15]]


def test_int4_grid_keeps_zero_exact_for_one_signed_groups():
    w = torch.tensor([[0.5, 1.0, 3.0, 1.5]])  # all positive: the grid still starts at 0
    scale, zero = int4_grid(w, symmetric=False)
    torch.testing.assert_close(scale, torch.tensor([0.2]))
    assert zero.tolist() == [0.0]
    assert int4_round(torch.tensor([[0.0]]), scale, zero).tolist() == [[0]]


def test_int4_grid_symmetric_by_hand():
    w = torch.tensor([[-1.0, 0.3, 2.0, -1.9]])
    scale, zero = int4_grid(w, symmetric=True)
    # scale 2 * 2 / 15, zero point 8: w * 15 / 4 + 8 = 4.25, 9.125, 15.5 (clamped), 0.875
    torch.testing.assert_close(scale, torch.tensor([4.0 / 15]))
    assert zero.tolist() == [8.0]
    assert int4_round(w, scale, zero).tolist() == [[4, 9, 15, 1]]


# ---------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("group", [32, -1])
def test_gptq_with_an_identity_hessian_is_rtn_asymmetric(weight, group):
    """No correlation between inputs: nothing to propagate, so GPTQ rounds exactly as RTN does."""
    gptq = gptq_quantize(weight, torch.eye(K_IN), group, symmetric=False)
    rtn = quantize_w4a16_rtn(weight, group, symmetric=False)
    assert gptq.config == rtn.config
    assert set(gptq.tensors) == set(rtn.tensors) == {"qweight", "scales", "mins"}
    for name, tensor in rtn.tensors.items():
        assert torch.equal(gptq.tensors[name], tensor), name


@pytest.mark.parametrize("group", [32, -1])
def test_gptq_with_an_identity_hessian_is_rtn_symmetric_up_to_ties(weight, group):
    """Symmetric grids put each group's -max|w| exactly half-way between two codes (w/s + 8 = 0.5),
    and now and then another value lands within float32 rounding of a half. GPTQ hands int4_round
    float64 scales and RTN float32 ones, so such ties may round either way (same error both ways);
    every other code must be equal."""
    gptq = gptq_quantize(weight, torch.eye(K_IN), group, symmetric=True)
    rtn = quantize_w4a16_rtn(weight, group, symmetric=True)
    assert torch.equal(gptq.tensors["scales"], rtn.tensors["scales"])
    assert torch.equal(gptq.tensors["mins"], rtn.tensors["mins"])
    size = K_IN if group == -1 else group
    scale = rtn.tensors["scales"].double().repeat_interleave(size, dim=1)
    exact = weight.double() / scale + 8
    tie = (exact - exact.floor() - 0.5).abs() < 1e-5
    differ = _codes(gptq) != _codes(rtn)
    assert not (differ & ~tie).any()
    assert ((_codes(gptq) - _codes(rtn)).abs() <= 1).all()
    assert tie.sum() <= weight.shape[0] * (K_IN // size) * 2  # about one tie per group, not more


@pytest.mark.parametrize("act_order", ["none", "weight", "group"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group", [32, -1], ids=["g32", "per-channel"])
def test_gptq_beats_rtn_on_the_layer_objective(weight, group, symmetric, act_order):
    calibration, held_out = _correlated_inputs(1024, seed=10), _correlated_inputs(1024, seed=11)
    gptq = gptq_quantize(weight, _hessian(calibration), group, symmetric, act_order)
    rtn = quantize_w4a16_rtn(weight, group, symmetric)
    assert ("perm" in gptq.tensors) == (act_order == "group")
    torch.testing.assert_close(_dequantize(gptq), _dequantize_ref(gptq), rtol=0, atol=1e-6)
    gptq_error = _output_error(held_out, weight, _dequantize(gptq))
    rtn_error = _output_error(held_out, weight, _dequantize(rtn))
    assert gptq_error < GPTQ_VS_RTN * rtn_error, (gptq_error, rtn_error)


def test_act_order_permutation_follows_the_hessian_diagonal(weight):
    x = _correlated_inputs(512, seed=12)
    hessian = _hessian(x)
    qw = gptq_quantize(weight, hessian, 32, act_order="group")
    perm = qw.tensors["perm"]
    assert qw.config.act_order and perm.dtype == torch.int64
    assert sorted(perm.tolist()) == list(range(K_IN))
    diagonal = torch.diag(hessian)[perm]
    assert (diagonal[:-1] >= diagonal[1:]).all()
    assert diagonal[0] == torch.diag(hessian).max()


def test_act_order_with_a_diagonal_hessian_is_rtn_in_that_column_order(weight):
    """A diagonal Hessian propagates nothing, so act-order GPTQ is RTN of the columns taken in order
    of decreasing diagonal (groups contiguous in that order); dequantize must put each column back."""
    diagonal = torch.rand(K_IN, generator=_gen(13), dtype=torch.float64) + 0.5
    qw = gptq_quantize(weight, torch.diag(diagonal), 32, symmetric=False, act_order="group")
    order = torch.argsort(diagonal, descending=True)
    assert torch.equal(qw.tensors["perm"], order)
    rtn = quantize_w4a16_rtn(weight[:, order], 32, symmetric=False)
    assert torch.equal(qw.tensors["qweight"], rtn.tensors["qweight"])
    expected = torch.empty_like(weight)
    expected[:, order] = _dequantize(rtn)
    torch.testing.assert_close(_dequantize(qw), expected, rtol=0, atol=0)
    # And the original column order: every weight within half a step of its own dequantized value.
    step = rtn.tensors["scales"].max()
    assert (_dequantize(qw) - weight).abs().max() <= step / 2 + 1e-6


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_weight_order_with_a_diagonal_hessian_is_rtn_in_the_original_groups(weight, symmetric):
    """ "weight" order visits columns by decreasing diagonal but keeps the original groups and their
    grids: with nothing to propagate, every code is RTN's and no `perm` is stored."""
    diagonal = torch.rand(K_IN, generator=_gen(16), dtype=torch.float64) + 0.5
    qw = gptq_quantize(weight, torch.diag(diagonal), 32, symmetric=symmetric, act_order="weight")
    rtn = quantize_w4a16_rtn(weight, 32, symmetric=symmetric)
    assert "perm" not in qw.tensors and not qw.config.act_order
    torch.testing.assert_close(qw.tensors["scales"], rtn.tensors["scales"], rtol=0, atol=0)
    # Codes may differ only at exact .5 ties (float64 against float32 rounding): symmetric grids put
    # each group's largest weight on one (max|w| / s = 7.5).
    differ = _codes(qw) != _codes(rtn)
    assert differ.sum() <= (N_OUT * K_IN // 32 if symmetric else 2), differ.sum()
    assert ((_codes(qw) - _codes(rtn)).abs() <= 1).all()


def test_weight_order_grids_come_from_the_original_weights(weight):
    """Static groups: whatever error GPTQ spreads, each group's scale is RTN's on the original
    weights (llm-compressor's observer, taken before the columns are updated)."""
    qw = gptq_quantize(weight, _hessian(_correlated_inputs(512, seed=17)), 32, act_order="weight")
    rtn = quantize_w4a16_rtn(weight, 32)
    torch.testing.assert_close(qw.tensors["scales"], rtn.tensors["scales"], rtol=0, atol=0)
    torch.testing.assert_close(qw.tensors["mins"], rtn.tensors["mins"], rtol=0, atol=0)


def test_gptq_rejects_an_unknown_column_order(weight):
    with pytest.raises(ValueError, match=r"act_order must be one of \('none', 'weight', 'group'\)"):
        gptq_quantize(weight, torch.eye(K_IN), 32, act_order="random")


def test_gptq_rejects_a_group_size_that_does_not_divide_the_inputs(weight):
    with pytest.raises(ValueError, match="in_features 96 is not a multiple of group size 64"):
        gptq_quantize(weight[:, :96], torch.eye(96), 64)


def test_dead_inputs_get_zero_weight_and_do_not_break_gptq(weight):
    """Inputs that were always zero make H singular; GPTQ must still run and quantize them to 0."""
    x = _correlated_inputs(512, seed=14)
    x[:, :3] = 0
    qw = gptq_quantize(weight, _hessian(x), 32)
    dequantized = _dequantize(qw)
    assert torch.isfinite(dequantized).all()
    assert (dequantized[:, :3] == 0).all()


def test_hessian_accumulates_chunks_like_one_matrix():
    x = torch.randn(300, 16, generator=_gen(15))
    hessian = Hessian(16)
    for chunk in x.split([7, 100, 1, 192]):
        hessian.add(chunk)
    assert hessian.count == 300
    assert hessian.matrix.dtype == torch.float64
    expected = 2 * x.double().T @ x.double() / 300
    torch.testing.assert_close(hessian.matrix, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- AWQ


OUTLIERS = torch.randperm(K_IN, generator=_gen(99))[:6]  # the same channels for every seed


def _outlier_inputs(outlier_scale: float, seed: int) -> torch.Tensor:
    x = torch.randn(2048, K_IN, generator=_gen(seed))
    x[:, OUTLIERS] *= outlier_scale
    return x


def _awq_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor) -> float:
    """||X W^T - (X / s) Q(W s)^T||^2 with Q the group-wise asymmetric RTN, dequantized here."""
    w = torch.cat(weights)
    dequantized = _dequantize_ref(quantize_w4a16_rtn(w * s, 32, symmetric=False))
    return (x.double() @ w.double().T - (x / s).double() @ dequantized.double().T).pow(2).sum().item()


@pytest.mark.parametrize("outlier_scale", [1.0, 3.0, 30.0])
def test_awq_scales_never_lose_to_rtn(outlier_scale):
    x = _outlier_inputs(outlier_scale, seed=20)
    weights = [torch.randn(32, K_IN, generator=_gen(21)), torch.randn(16, K_IN, generator=_gen(22))]
    s = search_scales(x, weights, 32, symmetric=False)
    assert s.shape == (K_IN,) and (s > 0).all()
    assert _awq_error(x, weights, s) <= _awq_error(x, weights, torch.ones(K_IN)) * (1 + 1e-6)


@pytest.mark.parametrize("unit", [True, False], ids=["s=1 (RTN)", "searched s"])
def test_awq_scaled_error_is_the_output_error_of_those_codes(unit):
    """The held-out check's measure: the same number as the output error computed here from RTN
    codes dequantized independently."""
    x = _outlier_inputs(30.0, seed=23)
    weights = [torch.randn(32, K_IN, generator=_gen(24)), torch.randn(16, K_IN, generator=_gen(25))]
    s = torch.ones(K_IN) if unit else search_scales(x, weights, 32, symmetric=False)
    got = scaled_error(x, weights, s, 32, symmetric=False)
    assert got == pytest.approx(_awq_error(x, weights, s), rel=1e-4)


def test_awq_scales_protect_strong_outlier_channels():
    x = _outlier_inputs(30.0, seed=23)
    weights = [torch.randn(64, K_IN, generator=_gen(24))]
    s = search_scales(x, weights, 32, symmetric=False)
    awq, rtn = _awq_error(x, weights, s), _awq_error(x, weights, torch.ones(K_IN))
    assert awq < 0.8 * rtn, (awq, rtn)  # measured: 0.32
    outliers = torch.zeros(K_IN, dtype=torch.bool)
    outliers[OUTLIERS] = True
    assert s[outliers].min() > s[~outliers].max()  # the outlier channels are the ones scaled up
    held_out = _outlier_inputs(30.0, seed=25)  # and the gain holds on inputs the search did not see
    assert _awq_error(held_out, weights, s) < 0.8 * _awq_error(held_out, weights, torch.ones(K_IN))


@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_int4_is_rtn_dequantized(weight, symmetric):
    expected = _dequantize_ref(quantize_w4a16_rtn(weight, 32, symmetric))
    torch.testing.assert_close(fake_int4(weight, 32, symmetric), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- SmoothQuant


def test_smoothing_factors_by_hand():
    act_absmax = torch.tensor([4.0, 1.0, 9.0])
    weights = [torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[-4.0, 1.0, 0.25], [0.5, 0.5, -0.1]])]
    w_absmax = torch.tensor([4.0, 2.0, 0.5])  # over every weight of the group
    torch.testing.assert_close(
        smoothing_factors(act_absmax, weights, 0.5), act_absmax.sqrt() / w_absmax.sqrt()
    )
    torch.testing.assert_close(smoothing_factors(act_absmax, weights, 1.0), act_absmax)
    torch.testing.assert_close(smoothing_factors(act_absmax, weights, 0.0), 1 / w_absmax)
    alpha = 0.8
    torch.testing.assert_close(
        smoothing_factors(act_absmax, weights, alpha), act_absmax**alpha / w_absmax ** (1 - alpha)
    )


def test_smoothing_with_alpha_half_balances_activation_and_weight_ranges():
    x = _outlier_inputs(30.0, seed=30)
    w = torch.randn(24, K_IN, generator=_gen(31))
    s = smoothing_factors(x.abs().amax(dim=0), [w], 0.5)
    torch.testing.assert_close((x / s).abs().amax(dim=0), (w * s).abs().amax(dim=0), rtol=1e-5, atol=0)
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_smoothing_alpha_outside_unit_interval_raises(alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        smoothing_factors(torch.ones(4), [torch.ones(2, 4)], alpha)


def _w8a8_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> float:
    """||X W^T - Qa(X / s) Qw(W s)^T||^2: int8 per token (activations), int8 per output channel
    (weights), both symmetric with scale max|.| / 127, written out here."""
    xs, ws = (x / s).double(), (w * s).double()
    x_step = xs.abs().amax(dim=1, keepdim=True) / 127
    w_step = ws.abs().amax(dim=1, keepdim=True) / 127
    xq, wq = torch.round(xs / x_step) * x_step, torch.round(ws / w_step) * w_step
    return (x.double() @ w.double().T - xq @ wq.T).pow(2).sum().item()


@pytest.mark.parametrize("outlier_scale", [1.0, 30.0])
def test_searched_smoothing_is_no_worse_than_alpha_half_or_none(outlier_scale):
    x = _outlier_inputs(outlier_scale, seed=26)
    weights = [torch.randn(32, K_IN, generator=_gen(27)), torch.randn(16, K_IN, generator=_gen(28))]
    w, absmax = torch.cat(weights), x.abs().amax(dim=0)
    s = search_alpha(x, absmax, weights)
    searched = _w8a8_error(x, w, s)
    assert searched <= _w8a8_error(x, w, smoothing_factors(absmax, weights, 0.5)) * (1 + 1e-6)
    assert searched <= _w8a8_error(x, w, torch.ones(K_IN)) * (1 + 1e-6)


# ---------------------------------------------------------------------- QuantizeOptions


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "foo"}, r"method must be one of .*'foo'"),
        ({"method": "gptq", "bits": 8}, r"gptq supports bits/activations \[\(4, 16\)\], got \(8, 16\)"),
        ({"method": "awq", "bits": 8, "activations": 8}, r"awq supports .* got \(8, 8\)"),
        ({"method": "smoothquant"}, r"smoothquant supports bits/activations \[\(8, 8\)\], got \(4, 16\)"),
        ({"method": "rtn", "bits": 3}, r"rtn supports .* got \(3, 16\)"),
        ({"method": "rtn", "bits": 4, "activations": 8}, r"rtn supports .* got \(4, 8\)"),
        ({"group_size": 0}, "group_size must be -1 or an even number >= 2, got 0"),
        ({"group_size": 33}, "group_size must be -1 or an even number >= 2, got 33"),
        ({"group_size": -2}, "group_size must be -1 or an even number >= 2, got -2"),
        ({"method": "rtn", "act_order": "group"}, "act_order is a GPTQ option"),
        ({"method": "awq", "act_order": "weight"}, "act_order is a GPTQ option"),
        ({"method": "gptq", "act_order": "desc"}, r"act_order must be one of \('none', 'weight', 'group'\)"),
        ({"method": "smoothquant", "bits": 8, "activations": 8, "alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"method": "gptq", "num_samples": 0}, "num_samples"),
        ({"method": "gptq", "seq_len": 1}, "seq_len"),
        ({"method": "gptq", "batch_size": 0}, "batch_size"),
    ],
)
def test_quantize_options_reject_bad_combinations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizeOptions(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "rtn", "bits": 8},
        {"method": "rtn", "bits": 8, "activations": 8},
        {"method": "gptq", "act_order": "group", "group_size": -1},
        {"method": "gptq", "act_order": "none", "guard": False},
        {"method": "awq", "symmetric": True, "group_size": 32},
        {"method": "smoothquant", "bits": 8, "activations": 8, "alpha": 0.8},
    ],
)
def test_quantize_options_accept_the_supported_schemes(kwargs):
    opts = QuantizeOptions(**kwargs)
    assert opts.needs_calibration == (kwargs["method"] != "rtn")


# ---------------------------------------------------------------------- calibration


@pytest.fixture(scope="module")
def word_tokenizer() -> Tokenizer:
    """Word-level: "w<i>" is token i, so a text of consecutive words encodes to consecutive ids."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 1000)}}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return Tokenizer(hf)


def _words(first: int, last: int) -> str:
    return " ".join(f"w{i}" for i in range(first, last))


def test_calibration_windows_are_contiguous_slices_of_the_text(word_tokenizer):
    samples = calibration_samples(word_tokenizer, _words(3, 1000), num_samples=12, seq_len=40, seed=0)
    assert samples.shape == (12, 40) and samples.dtype == torch.int64
    for row in samples:
        start = int(row[0])
        assert row.tolist() == list(range(start, start + 40))
        assert start >= 3 and start + 40 <= 1000
    assert len({int(r[0]) for r in samples}) > 6  # random offsets, not one window repeated


def test_calibration_windows_are_seeded(word_tokenizer):
    text = _words(3, 1000)
    first = calibration_samples(word_tokenizer, text, 8, 16, seed=7)
    assert torch.equal(first, calibration_samples(word_tokenizer, text, 8, 16, seed=7))
    assert not torch.equal(first, calibration_samples(word_tokenizer, text, 8, 16, seed=8))


def test_a_text_of_exactly_one_window_gives_that_window(word_tokenizer):
    samples = calibration_samples(word_tokenizer, _words(3, 23), 2, 20)
    assert samples.tolist() == [list(range(3, 23))] * 2


def test_calibration_text_shorter_than_a_window_raises(word_tokenizer):
    with pytest.raises(ValueError, match="calibration text has 10 tokens, fewer than seq_len 20"):
        calibration_samples(word_tokenizer, _words(3, 13), 4, 20)


def test_watch_inputs_sees_every_input_flattened_and_unhooks():
    first, second = nn.Linear(6, 5), nn.Linear(5, 3)
    model = nn.Sequential(first, nn.ReLU(), second)
    seen: list[tuple[str, torch.Tensor]] = []
    x = torch.randn(2, 4, 6, generator=_gen(40))
    with torch.no_grad(), watch_inputs({"a": first, "b": second}, lambda n, t: seen.append((n, t))):
        model(x)
    assert [n for n, _ in seen] == ["a", "b"]
    torch.testing.assert_close(seen[0][1], x.reshape(8, 6))
    with torch.no_grad():
        torch.testing.assert_close(seen[1][1], torch.relu(first(x)).reshape(8, 5))
        model(x)
    assert len(seen) == 2  # the hooks are gone after the block
