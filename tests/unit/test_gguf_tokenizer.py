"""The GGUF tokenizer we build (natively for GPT-2-regex byte-level BPE, through transformers'
converter otherwise) against transformers' own GGUF tokenizer loading
(`AutoTokenizer.from_pretrained(dir, gguf_file=name)`, which parses the file itself), on small
files written with `gguf.GGUFWriter` whose vocabularies exercise each branch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGUFValueType as V

from lowbit.loaders.gguf_file import read_gguf
from lowbit.loaders.gguf_tokenizer import GPT2_REGEX_PRE_TOKENIZERS, bytes_to_unicode
from lowbit.loaders.tokenizer import tokenizer_from_gguf

from .gguf_fixtures import TinyLlama, tiny_vocab

TEXTS = [
    "the then thin",
    " the  the\tthe\n",
    "<|im_start|>the<|im_end|> the<|endoftext|>",
    "<think>the</think> <think",
    "€ 日本 naïve 🙂",
    "12345 6789 the,the;the",
    "",
]
RAW_TOKEN = "€"  # stored as text, not in GPT-2's byte spelling: looked up by its bytes' spelling


def _vocab(user_defined: bool = False, raw: bool = False) -> dict[str, tuple]:
    tokens, types, merges = tiny_vocab()
    tokens, types = list(tokens), list(types)
    if user_defined:  # llama.cpp's USER_DEFINED: whole in the text, not special
        tokens += ["<think>", "</think>"]
        types += [4, 4]
    if raw:
        tokens.append(RAW_TOKEN)
        types.append(1)
    return {
        "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": (merges, V.ARRAY, V.STRING),
    }


VARIANTS = {
    "plain": {},
    "add-bos": {"tokenizer.ggml.add_bos_token": (True, V.BOOL)},
    "add-bos-and-eos": {
        "tokenizer.ggml.add_bos_token": (True, V.BOOL),
        "tokenizer.ggml.add_eos_token": (True, V.BOOL),
    },
    "user-defined-tokens": _vocab(user_defined=True),
    "raw-text-token": _vocab(raw=True),
    "pre-smollm": {"tokenizer.ggml.pre": ("smollm", V.STRING)},
    # Not GPT-2's regex: goes through transformers' converter, with Llama 3's split.
    "pre-llama-bpe": {"tokenizer.ggml.pre": ("llama-bpe", V.STRING)},
}


def _write(tmp_path: Path, extra: dict[str, tuple]) -> Path:
    path = tmp_path / "tiny.gguf"
    TinyLlama(extra_metadata=extra, write_vocab_size=False, hidden=32, ffn=32, heads=2, kv_heads=1).write(
        path
    )
    return path


@pytest.fixture(params=VARIANTS.values(), ids=VARIANTS.keys())
def pair(request, tmp_path):
    from transformers import AutoTokenizer

    path = _write(tmp_path, request.param)
    ours = tokenizer_from_gguf(read_gguf(path).metadata)
    return ours, AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(pair, text):
    ours, hf = pair
    for special in (True, False):
        ids = hf.encode(text, add_special_tokens=special)
        assert ours.encode(text, add_special_tokens=special) == ids
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_vocabulary_and_stop_ids_match_transformers(pair):
    ours, hf = pair
    assert ours.vocab_size == len(hf)
    assert ours.backend.get_vocab(with_added_tokens=True) == hf.get_vocab()
    assert hf.eos_token_id in ours.eos_token_ids


def test_variants_are_not_trivial(tmp_path):
    """Each branch changes the encoding, so agreeing with transformers says something."""
    tokens = tiny_vocab()[0]

    def encode(extra: dict[str, tuple], text: str) -> list[int]:
        return tokenizer_from_gguf(read_gguf(_write(tmp_path, extra)).metadata).encode(text)

    bos, eos = tokens.index("<|im_start|>"), tokens.index("<|im_end|>")
    assert encode(VARIANTS["add-bos-and-eos"], " the") == [bos, tokens.index("Ġthe"), eos]
    assert encode(VARIANTS["plain"], " the") == [tokens.index("Ġthe")]
    think = encode(VARIANTS["user-defined-tokens"], "<think>")
    assert len(think) == 1 and think != encode(VARIANTS["plain"], "<think>")
    spelled = "".join(bytes_to_unicode()[b] for b in RAW_TOKEN.encode())
    raw = tokenizer_from_gguf(read_gguf(_write(tmp_path, VARIANTS["raw-text-token"])).metadata)
    raw_id = len(tokens)  # appended after the tiny vocabulary
    assert spelled != RAW_TOKEN and raw.backend.token_to_id(spelled) == raw_id
    assert raw.decode([raw_id]) == RAW_TOKEN
    llama3 = tokenizer_from_gguf(read_gguf(_write(tmp_path, VARIANTS["pre-llama-bpe"])).metadata)
    gpt2 = tokenizer_from_gguf(read_gguf(_write(tmp_path, VARIANTS["plain"])).metadata)
    pieces = [p for p, _ in llama3.backend.pre_tokenizer.pre_tokenize_str("12345")]
    assert pieces == ["123", "45"]  # Llama 3 splits numbers in threes; GPT-2's regex does not
    assert [p for p, _ in gpt2.backend.pre_tokenizer.pre_tokenize_str("12345")] == ["12345"]


def test_native_pre_tokenizers_use_gpt2_regex_in_transformers_too():
    """Names we build natively must be ones transformers' converter gives no split regex."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    assert not GPT2_REGEX_PRE_TOKENIZERS & set(GGUF_PRE_TOKENIZER_SPLITS)


def test_bytes_to_unicode_matches_transformers():
    from transformers.convert_slow_tokenizer import bytes_to_unicode as reference

    assert bytes_to_unicode() == reference()


def test_token_types_of_the_wrong_length_raise(tmp_path):
    tokens, types, _ = tiny_vocab()
    extra = {"tokenizer.ggml.token_type": (types[:-1], V.ARRAY, V.INT32)}
    with pytest.raises(
        ValueError, match=rf"token_type has {len(types) - 1} entries for {len(tokens)} tokens"
    ):
        tokenizer_from_gguf(read_gguf(_write(tmp_path, extra)).metadata)


def test_default_model_tokenizer_does_not_import_transformers(default_gguf):
    """The point of the native path: a plain completion never pays for transformers."""
    from transformers import AutoTokenizer

    text = "Hello, world! <|im_start|>"
    hf = AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    code = (
        "import sys\n"
        "from lowbit.loaders.gguf import load_gguf\n"
        f"ids = load_gguf({str(default_gguf)!r}).tokenizer.encode({text!r})\n"
        f"assert ids == {hf.encode(text)!r}, ids\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
