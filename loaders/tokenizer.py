"""Tokenizers from a GGUF's metadata or an HF directory, with the chat template and stop tokens.

`tokenizers` does the encoding and decoding. A GGUF's backend is built from metadata we already
parsed (`gguf_tokenizer`); an HF directory's comes from `AutoTokenizer`. transformers renders chat
templates: for a GGUF its tokenizer object is only built on the first chat, because importing
transformers and building that wrapper costs ~50 MiB resident that plain completions never need.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.decoders import DecodeStream

from .gguf_tokenizer import GGUFTokenizerConfig, backend_from_gguf, tokenizer_config

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
_BUILD_LOCK = threading.Lock()


class Tokenizer:
    """Encode/decode, chat templates and the set of token ids that end generation.

    Built from a transformers tokenizer (`Tokenizer(hf)`) or from a GGUF's backend and config
    (`Tokenizer.from_gguf_backend`), whose transformers object `hf` is then made when first asked for.
    """

    def __init__(self, hf_tokenizer: Any, extra_eos_ids: Iterable[int] = ()):
        self._hf = hf_tokenizer
        self._gguf: GGUFTokenizerConfig | None = None
        self.backend: BackendTokenizer = hf_tokenizer.backend_tokenizer
        self._set_eos(hf_tokenizer.eos_token_id, extra_eos_ids)

    @classmethod
    def from_gguf_backend(cls, backend: BackendTokenizer, config: GGUFTokenizerConfig) -> Tokenizer:
        self = cls.__new__(cls)
        self._hf, self._gguf, self.backend = None, config, backend
        eos = config.special_tokens.get("eos_token")
        self._set_eos(None if eos is None else backend.token_to_id(eos), ())
        return self

    def _set_eos(self, eos_token_id: int | None, extra_eos_ids: Iterable[int]) -> None:
        eos = {i for i in (eos_token_id, *extra_eos_ids) if i is not None}
        special = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        vocab = self.backend.get_vocab(with_added_tokens=True)
        eos.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and t in special)
        self.eos_token_ids = frozenset(eos)

    @property
    def hf(self) -> Any:
        """The transformers tokenizer (for chat templates and `save_pretrained`). Built once, under
        a lock: the server tokenizes in worker threads, and two threads importing transformers at
        once made one of them fail ("cannot import name 'PreTrainedTokenizerFast'")."""
        if self._hf is None:
            with _BUILD_LOCK:
                if self._hf is None:
                    assert self._gguf is not None
                    self._hf = _fast_tokenizer(self.backend, self._gguf)
        return self._hf

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self._gguf.chat_template if self._gguf is not None else self._hf.chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._gguf is None:
            return self._hf.encode(text, add_special_tokens=add_special_tokens)
        # encode_batch releases the GIL (encode does not): a long prompt tokenized in a worker
        # thread then leaves the server's event loop running (measured 7.6 s stall -> 0.15 s at 8 MB).
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._gguf is None:
            return self._hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template. Only the template's
        own markup becomes control tokens: special-token text inside a message's content (a user
        typing "<|im_end|><|im_start|>system") is encoded as the plain text it is, so it cannot
        forge a turn."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        text = self.hf.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        # The template writes BOS/role markers itself; adding special tokens again would double them.
        ids: list[int] = []
        for piece, plain in _split_contents(text, self._marked_contents(messages)):
            if plain:
                ids += self._plain_encoder.encode_batch([piece], add_special_tokens=False)[0].ids
            else:
                ids += self.encode(piece, add_special_tokens=False)
        return ids

    def _marked_contents(self, messages: Sequence[Message]) -> list[str]:
        """The message contents that hold special-token text, in order (usually none)."""
        special = self._special_texts
        contents = [m.get("content") for m in messages]
        return [c for c in contents if isinstance(c, str) and any(t in c for t in special)]

    @functools.cached_property
    def _special_texts(self) -> tuple[str, ...]:
        return tuple(t.content for t in self.backend.get_added_tokens_decoder().values() if t.special)

    @functools.cached_property
    def _plain_encoder(self) -> BackendTokenizer:
        """The backend with special tokens encoded as their text (a copy: the flag is global)."""
        plain = BackendTokenizer.from_str(self.backend.to_str())
        plain.encode_special_tokens = True
        return plain

    def decode_stream(self, skip_special_tokens: bool = True) -> DecodeStream:
        """An incremental decoder that holds back bytes of an unfinished UTF-8 character."""
        return DecodeStream(skip_special_tokens=skip_special_tokens)


def _split_contents(text: str, contents: Sequence[str]) -> list[tuple[str, bool]]:
    """The rendered conversation as (piece, is_content) in order: each given content where the
    template wrote it (verbatim, else stripped, as templates that `trim` do), the markup between.
    A content the template rewrote beyond that cannot be told from markup: refused."""
    pieces: list[tuple[str, bool]] = []
    at = 0
    for content in contents:
        for form in (content, content.strip()):
            found = text.find(form, at)
            if found >= 0 and form:
                break
        else:
            raise ValueError(
                "a message holds special-token text the chat template rewrote; "
                "it cannot be kept apart from the template's own markup"
            )
        pieces += [(text[at:found], False), (form, True)]
        at = found + len(form)
    pieces.append((text[at:], False))
    return [(piece, plain) for piece, plain in pieces if piece]


def _fast_tokenizer(backend: BackendTokenizer, config: GGUFTokenizerConfig) -> Any:
    from transformers import PreTrainedTokenizerFast

    # A copy: the wrapper rewrites its backend's post-processor, and ours must keep encoding as is.
    return PreTrainedTokenizerFast(
        tokenizer_object=BackendTokenizer.from_str(backend.to_str()),
        chat_template=config.chat_template,
        add_bos_token=config.add_bos_token,
        add_eos_token=config.add_eos_token,
        **config.special_tokens,
    )


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer a GGUF describes, as transformers' GGUF support builds it."""
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError("GGUF has no tokenizer (tokenizer.ggml.tokens is missing)")
    config = tokenizer_config(metadata)
    return Tokenizer.from_gguf_backend(backend_from_gguf(metadata, config), config)


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
