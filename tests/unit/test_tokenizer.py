"""`tokenizer_from_gguf` on the default model against transformers' own GGUF tokenizer loading
(`AutoTokenizer.from_pretrained(dir, gguf_file=name)`), which parses the file itself."""

from __future__ import annotations

import pytest

from lowbit.loaders.gguf_file import read_gguf
from lowbit.loaders.tokenizer import tokenizer_from_gguf

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "   three leading spaces and trailing   ",
    "\n\nnewlines\tand\ttabs\r\n",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, العربية",
    "emoji 🤖🎉👍🏽 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { x[i] = y[i] * 2.5e-3; }",
    "1234567890 3.14159 -42 1e10 0x1F",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more<|endoftext|>",
    "<|im_start|>",
    "not special: <|im_start and im_end|>",
    "a" * 300,
    "",
    " ",
]

CONVERSATIONS = {
    "single-user": [{"role": "user", "content": "What is the capital of France?"}],
    "with-system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three primes. 🙂"},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write `print(1)` in Python.\n"},
    ],
}


@pytest.fixture(scope="module")
def tokenizers(default_gguf):
    from transformers import AutoTokenizer

    ours = tokenizer_from_gguf(read_gguf(default_gguf).metadata)
    hf = AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    return ours, hf


def _hf_ids(encoding) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template; 4.x a list."""
    return list(encoding["input_ids"] if not isinstance(encoding, list) else encoding)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tokenizers, text):
    ours, hf = tokenizers
    expected = hf.encode(text)
    assert ours.encode(text) == expected
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


def test_encode_is_not_trivial(tokenizers):
    """Guard against comparing two empty or byte-wise outputs: a known SmolLM2 segmentation."""
    ours, hf = tokenizers
    assert len(hf.encode("Hello, world!")) == 4
    ids = ours.encode("<|im_start|>user")
    assert ids[0] == hf.convert_tokens_to_ids("<|im_start|>") and len(ids) == 2


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(tokenizers, text, skip_special_tokens):
    ours, hf = tokenizers
    ids = hf.encode(text)
    expected = hf.decode(ids, skip_special_tokens=skip_special_tokens)
    assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == expected


def test_decode_arbitrary_ids_matches_transformers(tokenizers):
    """Ids no encoder would produce in this order, including byte tokens that split characters."""
    ours, hf = tokenizers
    ids = [*range(0, 49152, 997), 1, 2, 0, 49151]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("messages", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_chat_template_matches_transformers(tokenizers, messages):
    ours, hf = tokenizers
    expected = _hf_ids(hf.apply_chat_template(messages, add_generation_prompt=True))
    assert ours.apply_chat_template(messages) == expected
    prompt = hf.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert expected[-len(prompt) :] == prompt  # the generation prompt is there


def test_chat_template_without_generation_prompt(tokenizers):
    ours, hf = tokenizers
    messages = CONVERSATIONS["multi-turn"]
    expected = _hf_ids(hf.apply_chat_template(messages, add_generation_prompt=False))
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == expected


def test_chat_template_is_the_files(tokenizers):
    ours, hf = tokenizers
    assert ours.chat_template == hf.chat_template
    assert ours.chat_template.startswith("{% for message in messages %}")


def test_special_ids_and_vocab_size(tokenizers):
    ours, hf = tokenizers
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    assert im_end == 2  # SmolLM2's id, to be sure the lookup found the token
    assert im_end in ours.eos_token_ids
    assert hf.eos_token_id in ours.eos_token_ids
    # Like llama.cpp, every special end-of-text/turn token of the vocabulary stops generation:
    # here <|im_end|> (the eos) and <|endoftext|>; <|im_start|> and ordinary tokens do not.
    endoftext = hf.convert_tokens_to_ids("<|endoftext|>")
    assert "<|endoftext|>" in hf.all_special_tokens
    assert ours.eos_token_ids == {im_end, endoftext}
    assert ours.vocab_size == len(hf) == 49152


@pytest.mark.parametrize("corpus", ["wiki", "c4"])
def test_whole_corpus_encodes_like_transformers(tokenizers, corpus):
    """Hundreds of thousands of tokens of real text, beyond the hand-picked cases above."""
    from lowbit.quantize.text_data import standard_text

    ours, hf = tokenizers
    text = standard_text(corpus)
    expected = hf.encode(text)
    assert len(expected) > 50_000
    assert ours.encode(text) == expected
    assert ours.decode(expected) == hf.decode(expected)


def test_first_chats_from_many_threads_at_once(default_gguf):
    """The server tokenizes in worker threads: the first chats of a fresh process, at once, each
    get their prompt (the lazy transformers import is built once, not raced; a race failed some
    with "cannot import name 'PreTrainedTokenizerFast'"). In a new process, where transformers is
    not imported yet."""
    import subprocess
    import sys

    script = f"""
import threading
from lowbit.loaders.gguf_file import read_gguf
from lowbit.loaders.tokenizer import tokenizer_from_gguf
tok = tokenizer_from_gguf(read_gguf({str(default_gguf)!r}).metadata)
barrier, results, errors = threading.Barrier(16), [], []
def chat():
    barrier.wait()
    try:
        results.append(tok.apply_chat_template([{{"role": "user", "content": "Hi " * 300}}]))
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=chat) for _ in range(16)]
[t.start() for t in threads]
[t.join() for t in threads]
assert not errors and len(results) == 16 and all(r == results[0] for r in results), errors
"""
    for _ in range(3):  # the race without the lock failed about one run in three
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
