"""Tokenizers from a GGUF's metadata or an HF directory, with the chat template and stop tokens.

The heavy lifting is HF's: `tokenizers` does the encoding, transformers builds the backend from a
GGUF vocabulary (the same converter `AutoTokenizer.from_pretrained(gguf_file=...)` uses, fed with
metadata we already parsed instead of parsing the file a second time) and renders chat templates.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.decoders import DecodeStream

# Tokens that end a turn in common chat formats. llama.cpp treats these as end-of-generation when
# they are special tokens of the vocabulary, whatever `eos_token_id` says; so do we.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
)

Message = Mapping[str, Any]


class Tokenizer:
    """Encode/decode, chat templates and the set of token ids that end generation."""

    def __init__(self, hf_tokenizer: Any, extra_eos_ids: Iterable[int] = ()):
        self.hf = hf_tokenizer
        self.backend: BackendTokenizer = hf_tokenizer.backend_tokenizer
        eos = {i for i in extra_eos_ids if i is not None}
        if hf_tokenizer.eos_token_id is not None:
            eos.add(hf_tokenizer.eos_token_id)
        special = set(hf_tokenizer.all_special_tokens)
        vocab = self.backend.get_vocab(with_added_tokens=True)
        eos.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and t in special)
        self.eos_token_ids = frozenset(eos)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        if not self.hf.chat_template:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        text = self.hf.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        # The template writes BOS/role markers itself; adding special tokens again would double them.
        return self.encode(text, add_special_tokens=False)

    def decode_stream(self, skip_special_tokens: bool = True) -> DecodeStream:
        """An incremental decoder that holds back bytes of an unfinished UTF-8 character."""
        return DecodeStream(skip_special_tokens=skip_special_tokens)


def _fast_tokenizer(backend: BackendTokenizer, **config: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, **config)


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    """Build the tokenizer a GGUF describes, the way transformers' GGUF support does."""
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError("GGUF has no tokenizer (tokenizer.ggml.tokens is missing)")
    groups = {
        group: {
            name: metadata[f"tokenizer.{key}"]
            for key, name in renames.items()
            if f"tokenizer.{key}" in metadata
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, config = groups["tokenizer"], groups["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, key in (
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("unk_token", "unknown"),
        ("pad_token", "padding"),
    ):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            config[name] = tokens[token_id]
    try:
        backend, _ = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    except (KeyError, ValueError) as e:
        raise ValueError(f"cannot build the GGUF's tokenizer: {e}") from e
    return Tokenizer(_fast_tokenizer(backend, **config))


def tokenizer_from_pretrained(path: str | Path) -> Tokenizer:
    """An HF directory's tokenizer; stop ids also come from generation_config.json if present."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path))
    extra: list[int] = []
    generation_config = Path(path) / "generation_config.json"
    if generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        extra = eos if isinstance(eos, list) else [eos]
    return Tokenizer(hf, extra)
