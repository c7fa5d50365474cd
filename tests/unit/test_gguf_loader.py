"""`load_gguf` on small llama GGUF files written with `gguf.GGUFWriter`, and malformed files.

References: the values and metadata given to the writer; `gguf.quants` for quantized values;
llama.cpp's q/k permutation re-implemented in gguf_fixtures.hf_to_gguf_permute.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from lowbit.loaders.gguf import load_gguf
from lowbit.loaders.gguf_file import read_gguf
from lowbit.loaders.registry import detect, load_checkpoint
from lowbit.runtime.models.config import RopeScaling
from lowbit.runtime.quant import QuantizedWeight, W4A16Config, W8A16Config, method_for

from .gguf_fixtures import HF_NAMES, TinyLlama, hf_to_gguf_permute, tiny_vocab, write_gguf

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
DOWN_PROJ = "model.layers.0.mlp.down_proj.weight"


def _dense(weight) -> np.ndarray:
    """A loaded weight as fp32 numpy (dequantized with the scheme's reference meaning)."""
    if isinstance(weight, torch.Tensor):
        assert weight.dtype == torch.float32
        return weight.numpy()
    return method_for(weight.config).dequantize(weight.tensors).numpy()


def _write(tmp_path: Path, spec: TinyLlama, name: str = "tiny.gguf") -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / name
    return path, spec.write(path)


# ---------------------------------------------------------------------------------------------
# ModelConfig from metadata.

CONFIGS = {
    "gqa": TinyLlama(),
    "mha-head_dim-from-key_length": TinyLlama(heads=2, kv_heads=2, head_dim=48, ffn=64),
    "no-vocab_size-key": TinyLlama(heads=8, kv_heads=1, write_vocab_size=False, layers=3, context=4096),
    "mistral": TinyLlama(arch="mistral", rope_theta=1e6, rms_eps=1e-5),
}


@pytest.mark.parametrize("spec", CONFIGS.values(), ids=CONFIGS.keys())
def test_model_config_equals_written_metadata(tmp_path, spec):
    path, _ = _write(tmp_path, spec)
    config = load_gguf(path).config
    assert config.architecture == spec.arch
    assert config.vocab_size == len(tiny_vocab()[0]) == 263
    assert config.hidden_size == spec.hidden
    assert config.intermediate_size == spec.ffn
    assert config.num_layers == spec.layers
    assert config.num_heads == spec.heads
    assert config.num_kv_heads == spec.kv_heads
    assert config.head_dim == (spec.head_dim or spec.hidden // spec.heads)
    assert config.rms_norm_eps == float(np.float32(spec.rms_eps))  # stored as f32
    assert config.rope_theta == float(np.float32(spec.rope_theta))
    assert config.max_position_embeddings == spec.context
    assert config.tie_word_embeddings is True
    assert config.rope_scaling == RopeScaling()


def test_vocab_size_key_wins_over_token_count(tmp_path):
    spec = TinyLlama(extra_metadata={"llama.vocab_size": (300, V.UINT32)})
    path, _ = _write(tmp_path, spec)
    assert load_gguf(path).config.vocab_size == 300


@pytest.mark.parametrize("with_output", [False, True])
def test_tie_word_embeddings_follows_output_weight(tmp_path, with_output):
    path, expected = _write(tmp_path, TinyLlama(with_output=with_output))
    checkpoint = load_gguf(path)
    assert checkpoint.config.tie_word_embeddings is (not with_output)
    assert ("lm_head.weight" in checkpoint.weights) is with_output
    if with_output:
        np.testing.assert_array_equal(_dense(checkpoint.weights["lm_head.weight"]), expected["output.weight"])


def test_linear_rope_scaling(tmp_path):
    spec = TinyLlama(
        extra_metadata={
            "llama.rope.scaling.type": ("linear", V.STRING),
            "llama.rope.scaling.factor": (4.0, V.FLOAT32),
        }
    )
    path, _ = _write(tmp_path, spec)
    assert load_gguf(path).config.rope_scaling == RopeScaling("linear", 4.0)


def test_unsupported_rope_scaling_raises(tmp_path):
    spec = TinyLlama(
        extra_metadata={
            "llama.rope.scaling.type": ("yarn", V.STRING),
            "llama.rope.scaling.factor": (4.0, V.FLOAT32),
        }
    )
    path, _ = _write(tmp_path, spec)
    with pytest.raises(ValueError, match=r"rope scaling 'yarn' is not supported"):
        load_gguf(path)


@pytest.mark.parametrize(
    "key",
    [
        "llama.embedding_length",
        "llama.attention.head_count",
        "llama.feed_forward_length",
        "llama.block_count",
        "llama.context_length",
    ],
)
def test_missing_required_metadata_raises_naming_the_key(tmp_path, key):
    path, _ = _write(tmp_path, TinyLlama(drop_metadata=(key,)))
    with pytest.raises(ValueError, match=rf"GGUF metadata lacks {re.escape(key)}$"):
        load_gguf(path)


def test_tokenizer_comes_from_the_file(tmp_path):
    path, _ = _write(tmp_path, TinyLlama())
    tokenizer = load_gguf(path).tokenizer
    tokens = tiny_vocab()[0]
    assert tokenizer.vocab_size == len(tokens)
    assert tokens.index("<|im_end|>") in tokenizer.eos_token_ids
    assert tokenizer.encode("<|im_start|><|im_end|>") == [
        tokens.index("<|im_start|>"),
        tokens.index("<|im_end|>"),
    ]
    assert tokenizer.encode(" the") == [tokens.index("Ġthe")]  # the merges were applied


# ---------------------------------------------------------------------------------------------
# Weights: names, values, q/k un-permutation.


def test_permutation_under_test_is_not_trivial():
    """Guard: for the shapes used below, llama.cpp's permutation really moves rows."""
    w = np.arange(4 * 16 * 2, dtype=np.float32).reshape(64, 2)
    assert not np.array_equal(hf_to_gguf_permute(w, 4), w)
    w = np.arange(2 * 48 * 2, dtype=np.float32).reshape(96, 2)
    assert not np.array_equal(hf_to_gguf_permute(w, 2), w)


@pytest.mark.parametrize("with_output", [False, True])
def test_f32_weights_have_hf_names_and_hf_row_order(tmp_path, with_output):
    path, expected = _write(tmp_path, TinyLlama(with_output=with_output))
    weights = load_gguf(path).weights
    names = {g: h for g, h in HF_NAMES.items() if with_output or g != "output.weight"}
    assert set(weights) == set(names.values())
    for gguf_name, hf in names.items():
        got = weights[hf]
        assert isinstance(got, torch.Tensor), hf
        np.testing.assert_array_equal(got.numpy(), expected[gguf_name], err_msg=hf)


ALL_LINEAR = [n for n in HF_NAMES if n.endswith(("_q.weight", "_k.weight", "_v.weight", "_output.weight"))]
ALL_LINEAR += ["blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "output.weight"]
QUANT_CASES = {
    "q8_0": {n: Q.Q8_0 for n in ALL_LINEAR} | {"token_embd.weight": Q.Q8_0},
    "q4_0": {n: Q.Q4_0 for n in ALL_LINEAR} | {"token_embd.weight": Q.Q4_0},
    "q4_1": {n: Q.Q4_1 for n in ALL_LINEAR} | {"token_embd.weight": Q.Q8_0},
    "mixed": {
        "blk.0.attn_q.weight": Q.Q8_0,
        "blk.0.attn_k.weight": Q.Q4_1,
        "blk.0.attn_v.weight": Q.Q4_0,
        "blk.0.ffn_gate.weight": Q.F16,
        "blk.0.ffn_up.weight": Q.BF16,
        "blk.0.ffn_norm.weight": Q.F16,
        "token_embd.weight": Q.Q8_0,
    },
}
SCHEME = {Q.Q8_0: W8A16Config(32), Q.Q4_0: W4A16Config(32), Q.Q4_1: W4A16Config(32)}


@pytest.mark.parametrize("qtypes", QUANT_CASES.values(), ids=QUANT_CASES.keys())
@pytest.mark.parametrize(
    "shape",
    [
        dict(heads=4, kv_heads=2),
        dict(hidden=64, heads=2, kv_heads=1, head_dim=64),  # head_dim from key_length, not hidden / heads
    ],
    ids=["gqa", "head_dim-64"],
)
def test_typed_weights_have_hf_row_order(tmp_path, qtypes, shape):
    path, expected = _write(tmp_path, TinyLlama(with_output=True, qtypes=qtypes, **shape))
    weights = load_gguf(path).weights
    for gguf_name, hf in HF_NAMES.items():
        got = weights[hf]
        qtype = qtypes.get(gguf_name, Q.F32)
        if qtype in SCHEME:  # stays packed
            assert isinstance(got, QuantizedWeight), hf
            assert got.config == SCHEME[qtype], hf
            method_for(got.config).check(got)
        else:
            assert isinstance(got, torch.Tensor), hf
        # Exact (Q4_0's all-zero blocks may give -0.0 on one side; the values are equal).
        np.testing.assert_array_equal(_dense(got), expected[gguf_name], err_msg=hf)


@pytest.mark.parametrize("qtype", [Q.Q8_1, Q.MXFP4], ids=lambda q: q.name)
def test_unsupported_tensor_type_raises_naming_tensor_and_type(tmp_path, qtype):
    path = tmp_path / "odd.gguf"
    spec = TinyLlama()
    weights = spec.hf_weights()
    tensors = []
    for name, w in weights.items():
        if name == "blk.0.ffn_down.weight":
            block, size = GGML_QUANT_SIZES[qtype]
            raw = np.zeros((w.shape[0], w.shape[1] // block * size), np.uint8)
            tensors.append((name, raw, qtype))
        else:
            tensors.append((name, w, None))
    write_gguf(path, "llama", spec.metadata(), tensors)
    checkpoint = load_gguf(path)  # lazy: the header is fine
    # Membership must not decode (it did: Mapping.__contains__ calls __getitem__).
    assert DOWN_PROJ in checkpoint.weights
    assert "model.layers.0.mlp.nonexistent.weight" not in checkpoint.weights
    with pytest.raises(
        ValueError,
        match=rf"tensor 'blk\.0\.ffn_down\.weight': GGUF tensor type {qtype.name} is not supported",
    ):
        checkpoint.weights[DOWN_PROJ]
    # The other weights still load.
    v_proj = HF_NAMES["blk.0.attn_v.weight"]
    np.testing.assert_array_equal(_dense(checkpoint.weights[v_proj]), weights["blk.0.attn_v.weight"])


def test_q_rows_disagreeing_with_header_raise(tmp_path):
    # Tensors shaped for head_dim 16, header says key_length 8: q needs 4 * 8 = 32 rows, has 64.
    spec = TinyLlama(extra_metadata={"llama.attention.key_length": (8, V.UINT32)})
    path, _ = _write(tmp_path, spec)
    weights = load_gguf(path).weights
    with pytest.raises(
        ValueError, match=r"tensor 'blk\.0\.attn_q\.weight' has 64 rows, the header implies 32"
    ):
        weights[Q_PROJ]


# ---------------------------------------------------------------------------------------------
# Malformed files.


@pytest.fixture
def valid(tmp_path) -> tuple[Path, bytes]:
    path, _ = _write(tmp_path, TinyLlama(qtypes={"blk.0.ffn_down.weight": Q.Q4_1}), "valid.gguf")
    return path, path.read_bytes()


def _variant(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_wrong_magic(tmp_path, valid):
    _, data = valid
    path = _variant(tmp_path, b"GGUX" + data[4:])
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: not a GGUF file (magic b'GGUX', expected b'GGUF')")
    ):
        load_gguf(path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a GGUF file (no GGUF magic)")):
        load_checkpoint(path)


@pytest.mark.parametrize("version", [1, 4, 0x03000000])
def test_unsupported_version(tmp_path, valid, version):
    _, data = valid
    path = _variant(tmp_path, data[:4] + struct.pack("<I", version) + data[8:])
    with pytest.raises(ValueError, match=rf"GGUF version {version} is not supported \(supported: \(2, 3\)\)"):
        load_gguf(path)


def _header_cuts(data: bytes) -> dict[str, int]:
    """File lengths that end inside the header, located from the format (not from our reader)."""
    tokens_key = data.index(b"tokenizer.ggml.tokens")
    last_info = data.index(b"blk.0.ffn_down.weight", data.index(b"blk.0.ffn_norm.weight"))
    return {
        "in-counts": 20,
        "in-first-key-length": 26,
        "in-first-key": 30,
        "in-token-strings": tokens_key + 200,
        "in-last-tensor-name": last_info + 5,
        "in-last-tensor-dims": last_info + len("blk.0.ffn_down.weight") + 4 + 3,
        "in-last-tensor-offset": last_info + len("blk.0.ffn_down.weight") + 4 + 16 + 4 + 2,
    }


@pytest.mark.parametrize(
    "cut",
    [
        "in-counts",
        "in-first-key-length",
        "in-first-key",
        "in-token-strings",
        "in-last-tensor-name",
        "in-last-tensor-dims",
        "in-last-tensor-offset",
    ],
)
def test_truncated_in_header(tmp_path, valid, cut):
    _, data = valid
    size = _header_cuts(data)[cut]
    path = _variant(tmp_path, data[:size])
    if size < 24:
        expected = re.escape(f"{path}: not a GGUF file (only {size} bytes)")
    else:
        expected = (
            re.escape(f"{path}: malformed GGUF: file ends inside a field needing ")
            + rf"\d+ bytes \(file is {size} bytes\)"
        )
    with pytest.raises(ValueError, match=expected):
        load_gguf(path)


@pytest.mark.parametrize("missing", [1, 10, 200])
def test_truncated_in_tensor_data(tmp_path, valid, missing):
    valid_path, data = valid
    last = max(GGUFReader(valid_path).tensors, key=lambda t: t.data_offset)
    end = int(last.data_offset + last.n_bytes)
    assert last.name == "blk.0.ffn_down.weight" and end <= len(data)
    size = end - missing
    path = _variant(tmp_path, data[:size])
    message = (
        f"{path}: truncated GGUF: tensor 'blk.0.ffn_down.weight' needs bytes "
        f"{last.data_offset}..{end} but the file is {size} bytes"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_gguf(path)


def test_all_tensor_data_missing_names_the_first_tensor(tmp_path, valid):
    valid_path, data = valid
    first = min(GGUFReader(valid_path).tensors, key=lambda t: t.data_offset)
    path = _variant(tmp_path, data[: int(first.data_offset)])
    with pytest.raises(ValueError, match=rf"truncated GGUF: tensor '{re.escape(first.name)}' needs bytes"):
        read_gguf(path)


def test_unknown_architecture(tmp_path):
    path, _ = _write(tmp_path, TinyLlama(arch="gpt2"))
    with pytest.raises(
        ValueError,
        match=r"GGUF architecture 'gpt2' is not supported "
        r"\(supported: \('llama', 'mistral', 'qwen2', 'qwen3', 'phi3', 'gemma2', 'gemma3'\)\)",
    ):
        load_gguf(path)


def test_empty_file(tmp_path):
    path = _variant(tmp_path, b"", "empty.gguf")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a GGUF file (only 0 bytes)")):
        load_gguf(path)
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: not a GGUF file (no GGUF magic) and not a model directory")
    ):
        load_checkpoint(path)


def test_nonexistent_path(tmp_path):
    path = tmp_path / "missing.gguf"
    with pytest.raises(ValueError, match=re.escape(f"{path}: no such file or directory")):
        load_checkpoint(path)


def test_directory_without_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    message = re.escape(
        f"{tmp_path}: a model directory needs config.json + *.safetensors, or exactly one .gguf"
    )
    with pytest.raises(ValueError, match=message):
        detect(tmp_path)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path)


def test_directory_with_two_ggufs_is_ambiguous(tmp_path, valid):
    _, data = valid
    model_dir = tmp_path / "two"
    model_dir.mkdir()
    _variant(model_dir, data, "a.gguf")
    _variant(model_dir, data, "b.gguf")
    with pytest.raises(ValueError, match=r"or exactly one \.gguf"):
        detect(model_dir)


def test_directory_with_one_gguf_loads_it(tmp_path, valid):
    _, data = valid
    model_dir = tmp_path / "one"
    model_dir.mkdir()
    _variant(model_dir, data, "model.gguf")
    assert detect(model_dir) == "gguf"
    assert detect(model_dir / "model.gguf") == "gguf"
    checkpoint = load_checkpoint(model_dir)
    assert checkpoint.config.hidden_size == 64
    assert checkpoint.source == str(model_dir / "model.gguf")


def test_quantization_argument_rejected_for_gguf(valid):
    path, _ = valid
    with pytest.raises(ValueError, match=r"quantization= applies to dense checkpoints"):
        load_checkpoint(path, quantization="w8a16")


def _patch(data: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def test_unknown_ggml_type_id(tmp_path, valid):
    _, data = valid
    name = b"output_norm.weight"  # 1-D: name, u32 n_dims, u64 dim, then u32 type
    at = data.index(name, data.index(b"tokenizer.ggml.eos_token_id")) + len(name) + 4 + 8
    assert struct.unpack_from("<I", data, at)[0] == Q.F32
    path = _variant(tmp_path, _patch(data, at, "<I", 9999))
    with pytest.raises(
        ValueError, match=r"malformed GGUF: tensor 'output_norm\.weight' has unknown ggml type 9999"
    ):
        read_gguf(path)


def test_unknown_metadata_value_type(tmp_path, valid):
    _, data = valid
    key = b"llama.context_length"
    at = data.index(key) + len(key)
    assert struct.unpack_from("<I", data, at)[0] == V.UINT32
    path = _variant(tmp_path, _patch(data, at, "<I", 99))
    with pytest.raises(ValueError, match=r"malformed GGUF: unknown metadata value type 99"):
        read_gguf(path)


def test_array_count_larger_than_file(tmp_path, valid):
    _, data = valid
    key = b"tokenizer.ggml.tokens"
    at = data.index(key) + len(key) + 4 + 4  # value type ARRAY, item type STRING, then u64 count
    assert struct.unpack_from("<Q", data, at)[0] == len(tiny_vocab()[0])
    path = _variant(tmp_path, _patch(data, at, "<Q", 2**50))
    with pytest.raises(ValueError, match=rf"malformed GGUF: array of {2**50} items is larger than the file"):
        read_gguf(path)


def test_impossible_tensor_count(tmp_path, valid):
    _, data = valid
    path = _variant(tmp_path, _patch(data, 8, "<Q", 2**40))
    with pytest.raises(ValueError, match=rf"malformed GGUF: impossible counts \({2**40} tensors"):
        read_gguf(path)


@pytest.mark.parametrize("alignment", [0, 12])
def test_invalid_alignment(tmp_path, alignment):
    path = write_gguf(
        tmp_path / "align.gguf",
        "llama",
        {"general.alignment": (alignment, V.UINT32)},
        [("x", np.ones(4, np.float32), None)],
    )
    with pytest.raises(ValueError, match=rf"malformed GGUF: invalid general\.alignment {alignment}"):
        read_gguf(path)


def test_row_length_not_a_multiple_of_the_block(tmp_path):
    # int8 data with raw_shape: GGUFWriter keeps the declared shape (2, 40) as is.
    path = tmp_path / "rows.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_tensor("bad", np.zeros(68, np.int8), raw_shape=(2, 40), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ValueError, match=r"tensor 'bad': row length 40 is not a multiple of the Q8_0 block size 32"
    ):
        read_gguf(path)


def test_duplicate_tensor_name(tmp_path):
    tensors = [("dup_a", np.ones(8, np.float32), None), ("dup_b", np.ones(8, np.float32), None)]
    data = write_gguf(tmp_path / "dup.gguf", "llama", {}, tensors).read_bytes()
    path = _variant(tmp_path, data.replace(b"dup_b", b"dup_a"))
    with pytest.raises(ValueError, match=r"malformed GGUF: tensor 'dup_a' appears twice"):
        read_gguf(path)
