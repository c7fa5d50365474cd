"""The `tokenizers` backend a GGUF's vocabulary describes.

Byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`) whose pre-tokenizer is GPT-2's own
regex are built here directly: a `tokenizers.models.BPE` over the file's tokens and merges, GPT-2's
byte-level pre-tokenizer and decoder, the file's control tokens as special tokens. That is the
tokenizer transformers' GGUF converter builds for them (tests compare the two on the same file),
without importing transformers and its wrapper objects, which cost ~50 MiB resident and ~1.5 s per
load. Everything else (sentencepiece, unigram, the split regexes of Llama 3, Qwen 2 and the like)
goes to transformers' converter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

# llama.cpp's names for pre-tokenizers that split text with GPT-2's regex, which transformers'
# converter leaves to `ByteLevel(use_regex=True)` (a test checks its table has none of them).
GPT2_REGEX_PRE_TOKENIZERS = frozenset({"default", "gpt-2", "smollm", "starcoder", "refact"})

# llama.cpp's token types (gguf `tokenizer.ggml.token_type`).
CONTROL, USER_DEFINED = 3, 4

# GGUF special-token id keys and the name a tokenizer config gives each.
SPECIAL_TOKEN_KEYS = {
    "bos_token": "bos",
    "eos_token": "eos",
    "unk_token": "unknown",
    "pad_token": "padding",
}


@dataclass(frozen=True)
class GGUFTokenizerConfig:
    """What the file says beyond the vocabulary: special token strings, BOS/EOS and the template."""

    special_tokens: Mapping[str, str]  # "bos_token" -> "<|im_start|>", ... (only those present)
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None


def tokenizer_config(metadata: Mapping[str, Any]) -> GGUFTokenizerConfig:
    tokens = metadata["tokenizer.ggml.tokens"]
    special = {}
    for name, key in SPECIAL_TOKEN_KEYS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            special[name] = tokens[token_id]
    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
    default_bos = metadata.get("tokenizer.ggml.model") == "llama"
    return GGUFTokenizerConfig(
        special_tokens=special,
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def backend_from_gguf(metadata: Mapping[str, Any], config: GGUFTokenizerConfig) -> BackendTokenizer:
    """The backend for metadata that has `tokenizer.ggml.tokens` (tokenizer_from_gguf checks)."""
    native = (
        metadata.get("tokenizer.ggml.model") == "gpt2"
        and metadata.get("tokenizer.ggml.pre", "default") in GPT2_REGEX_PRE_TOKENIZERS
        and "tokenizer.ggml.merges" in metadata
    )
    backend = _byte_level_bpe(metadata, config) if native else _converted(metadata)
    backend.post_processor = _post_processor(backend, config)
    return backend


def _byte_level_bpe(metadata: Mapping[str, Any], config: GGUFTokenizerConfig) -> BackendTokenizer:
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token stored as raw text (not in the byte alphabet) is looked up by its bytes' spelling.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
    model = BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="")
    del vocab, merges
    backend = BackendTokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    # A control token outside the byte alphabet is a llama.cpp mislabel; adding it would grow the
    # vocabulary past the model's (transformers skips those too).
    control = [t for t, kind in zip(tokens, types, strict=True) if kind == CONTROL and set(t) <= alphabet]
    control += [t for t in config.special_tokens.values() if t not in control]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    # USER_DEFINED tokens (`<think>`) are matched whole in the text, as llama.cpp does, not special.
    user = [t for t, kind in zip(tokens, types, strict=True) if kind == USER_DEFINED and set(t) <= alphabet]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return backend


def _converted(metadata: Mapping[str, Any]) -> BackendTokenizer:
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    renames = GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {
        name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata
    }
    try:
        backend, _ = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    except (KeyError, ValueError) as e:
        raise ValueError(f"cannot build the GGUF's tokenizer: {e}") from e
    return backend


def _post_processor(backend: BackendTokenizer, config: GGUFTokenizerConfig) -> processors.PostProcessor:
    """BOS/EOS around an encoded text, as the file's add_bos/add_eos flags ask."""
    single, specials = "$A:0", []
    bos, eos = config.special_tokens.get("bos_token"), config.special_tokens.get("eos_token")
    if config.add_bos_token and bos is not None:
        single = f"{bos}:0 {single}"
        specials.append((bos, backend.token_to_id(bos)))
    if config.add_eos_token and eos is not None:
        single = f"{single} {eos}:0"
        specials.append((eos, backend.token_to_id(eos)))
    pair = f"{single} {single.replace('$A', '$B').replace(':0', ':1')}"
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values, which byte-level vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    spelling, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling
