"""`read_gguf` (our GGUF header parser) against the `gguf` package's GGUFReader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from lowbit.loaders.gguf_file import read_gguf

from .gguf_fixtures import reference_reader, write_gguf


@pytest.fixture(scope="module")
def real(default_gguf):
    return read_gguf(default_gguf), reference_reader(default_gguf)


def _same_value(ours, ref) -> bool:
    """Equal with the same Python types all the way down (so True != 1 and 1.0 != 1)."""
    if isinstance(ref, list):
        return isinstance(ours, list) and len(ours) == len(ref) and all(map(_same_value, ours, ref))
    return type(ours) is type(ref) and ours == ref


def _reference_metadata(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_real_model_metadata_matches_gguf_reader(real):
    ours, ref = real
    expected = _reference_metadata(ref)
    assert len(expected) == 33  # the default model's key count: guards against an empty comparison
    assert set(ours.metadata) == set(expected)
    for key, value in expected.items():
        assert _same_value(ours.metadata[key], value), key
    assert ours.version == ref.fields["GGUF.version"].contents() == 3


def test_real_model_tensor_directory_matches_gguf_reader(real):
    ours, ref = real
    assert len(ours.tensors) == len(ref.tensors) == 272
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.name == t.name
        assert info.shape == tuple(int(d) for d in reversed(t.shape)), t.name
        assert info.qtype == t.tensor_type, t.name
        assert info.offset == t.data_offset, t.name
        assert info.nbytes == t.n_bytes, t.name
    counts = {q: sum(i.qtype == q for i in ours.tensors.values()) for q in (Q.Q4_1, Q.Q8_0, Q.F32)}
    assert counts == {Q.Q4_1: 210, Q.Q8_0: 1, Q.F32: 61}


@pytest.mark.parametrize(
    "name",
    [
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "blk.29.ffn_down.weight",
        "blk.7.attn_norm.weight",
        "output_norm.weight",
    ],
)
def test_real_model_tensor_bytes_match_gguf_reader(real, name):
    ours, ref = real
    t = next(t for t in ref.tensors if t.name == name)
    expected = np.asarray(t.data)
    expected = expected.view(np.uint8).reshape(*expected.shape[:-1], -1)  # F32 tensors come as floats
    got = ours.tensor_bytes(name)
    assert got.dtype == np.uint8
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


def _file_backed_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("RssFile:")).split()[1])


def test_release_keeps_the_bytes_readable(default_gguf):
    """release() only drops resident pages: the tensor reads back the same afterwards."""
    gguf = read_gguf(default_gguf)
    for name in ("token_embd.weight", "blk.3.ffn_up.weight", "blk.3.attn_norm.weight"):
        before = gguf.tensor_bytes(name).copy()
        gguf.release(name)
        assert np.array_equal(gguf.tensor_bytes(name), before), name


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssFile from /proc")
def test_release_drops_the_pages_from_the_resident_set(default_gguf):
    gguf = read_gguf(default_gguf)
    table = gguf.tensor_bytes("token_embd.weight")  # 30 MiB of Q8_0 blocks
    assert int(table.sum(dtype=np.uint64)) > 0  # touch every page
    before = _file_backed_rss_kib()
    gguf.release("token_embd.weight")
    assert before - _file_backed_rss_kib() > 0.9 * table.nbytes / 1024


# ---------------------------------------------------------------------------------------------
# Synthetic files: every metadata value type, custom alignment, version 2.

ALL_TYPES = {
    "t.u8": (200, V.UINT8),
    "t.i8": (-100, V.INT8),
    "t.u16": (60000, V.UINT16),
    "t.i16": (-30000, V.INT16),
    "t.u32": (4_000_000_000, V.UINT32),
    "t.i32": (-2_000_000_000, V.INT32),
    "t.u64": (2**63 + 5, V.UINT64),
    "t.i64": (-(2**62), V.INT64),
    "t.f32": (0.1, V.FLOAT32),
    "t.f64": (0.1, V.FLOAT64),
    "t.bool_true": (True, V.BOOL),
    "t.bool_false": (False, V.BOOL),
    "t.str": ("héllo ✓ 🦙", V.STRING),
    "t.str_empty": ("", V.STRING),
    "t.arr_u8": ([0, 255, 7], V.ARRAY, V.UINT8),
    "t.arr_i16": ([-1, 2, -3], V.ARRAY, V.INT16),
    "t.arr_u64": ([1, 2**64 - 1], V.ARRAY, V.UINT64),
    "t.arr_f32": ([0.5, -1.25, 3.1], V.ARRAY, V.FLOAT32),
    "t.arr_f64": ([1e300, -2.5], V.ARRAY, V.FLOAT64),
    "t.arr_bool": ([True, False, True], V.ARRAY, V.BOOL),
    "t.arr_str": (["a", "", "日本"], V.ARRAY, V.STRING),
}


def _synthetic(path, alignment=None):
    rng = np.random.default_rng(1)
    tensors = [
        ("dense.f32", rng.standard_normal((3, 5)).astype(np.float32), None),
        ("vec.f16", rng.standard_normal(7).astype(np.float16), None),
        ("cube.f32", rng.standard_normal((2, 3, 4)).astype(np.float32), None),
        ("q8", np.zeros((4, 2 * 34), np.uint8) + 3, Q.Q8_0),
        ("q4_1", np.arange(2 * 40, dtype=np.uint8).reshape(2, 40), Q.Q4_1),
    ]
    return write_gguf(path, "llama", ALL_TYPES, tensors, alignment=alignment)


@pytest.mark.parametrize("alignment", [None, 64, 256])
def test_synthetic_metadata_and_tensors_match_gguf_reader(tmp_path, alignment):
    from gguf import GGUFReader

    path = _synthetic(tmp_path / "all.gguf", alignment)
    ours, ref = read_gguf(path), GGUFReader(path)
    expected = _reference_metadata(ref)
    assert (
        set(ours.metadata)
        == set(expected)
        == set(ALL_TYPES) | {"general.architecture"} | ({"general.alignment"} if alignment else set())
    )
    for key, value in expected.items():
        assert _same_value(ours.metadata[key], value), key
    assert len(ours.tensors) == len(ref.tensors) == 5
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert (info.shape, info.qtype, info.offset, info.nbytes) == (
            tuple(int(d) for d in reversed(t.shape)),
            t.tensor_type,
            t.data_offset,
            t.n_bytes,
        ), t.name
        if alignment:
            assert info.offset % alignment == 0
        raw = np.asarray(t.data)
        assert np.array_equal(ours.tensor_bytes(t.name), raw.view(np.uint8).reshape(*raw.shape[:-1], -1))


def test_values_match_what_was_written(tmp_path):
    """Straight against the values given to GGUFWriter: big integers, unicode, f32 rounding."""
    path = _synthetic(tmp_path / "all.gguf")
    meta = read_gguf(path).metadata
    assert meta["t.str"] == "héllo ✓ 🦙"
    assert meta["t.arr_str"] == ["a", "", "日本"]
    assert meta["t.u64"] == 2**63 + 5
    assert meta["t.arr_u64"] == [1, 2**64 - 1]
    assert meta["t.f64"] == 0.1
    assert meta["t.f32"] == float(np.float32(0.1))


def test_nested_arrays(tmp_path):
    # GGUFReader.contents() flattens nested arrays, so the reference is the value written.
    path = write_gguf(tmp_path / "n.gguf", "llama", {"t.nested": ([[1, 2], [3, 4, 5]], V.ARRAY)}, [])
    assert read_gguf(path).metadata["t.nested"] == [[1, 2], [3, 4, 5]]


def test_version_2_reads_like_version_3(tmp_path):
    from gguf import GGUFReader

    path = _synthetic(tmp_path / "v3.gguf")
    data = bytearray(path.read_bytes())
    assert data[4:8] == (3).to_bytes(4, "little")
    data[4:8] = (2).to_bytes(4, "little")  # v2 and v3 share the layout
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(bytes(data))
    ours, ref = read_gguf(v2), GGUFReader(v2)
    assert ours.version == 2
    assert {n: i.offset for n, i in ours.tensors.items()} == {t.name: t.data_offset for t in ref.tensors}
