"""Detokenizer with the default model's real tokenizer (byte-level BPE: emoji and CJK characters are
split over several tokens). The references are the tokenizer's own `decode` of whole id lists."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.loaders.tokenizer import Tokenizer
from lowbit.runtime.detokenizer import Detokenizer
from lowbit.runtime.sampling_params import SamplingParams

REPLACEMENT = "\ufffd"

TEXTS = [
    "Hello 👋 world 🌍! 日本語のテキスト. Café naïve résumé 👨‍👩‍👧",
    "中文测试，汉字。🎉🎉 한국어 텍스트",
    "Ünïcödé — “quotes” … € ½ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🏳️‍🌈",
    "  leading spaces\n\n\ttabs and newlines  ",
    "🙂🙃😀😁😂🤣",
    "Привет, мир! Ελληνικά. עברית. العربية",
]

HYPOTHESIS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def tok(default_gguf) -> Tokenizer:
    from lowbit.loaders.gguf_file import read_gguf
    from lowbit.loaders.tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(read_gguf(default_gguf).metadata)


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def streamed_reference(tok: Tokenizer, ids: list[int], k: int, skip_special_tokens: bool = True) -> str:
    """The text a streaming decoder can show after ids[:k]: the full decode of the longest prefix
    ids[:j], j <= k, that does not end inside a character (in a U+FFFD)."""
    for j in range(k, 0, -1):
        text = tok.decode(ids[:j], skip_special_tokens=skip_special_tokens)
        if not text.endswith(REPLACEMENT):
            return text
    return ""


def held_back_reference(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    for length in range(len(text), 0, -1):
        tail = text[-length:]
        if any(len(tail) < len(s) and s.startswith(tail) for s in stops):
            return length
    return 0


def stream(
    tok: Tokenizer, ids: list[int], params: SamplingParams
) -> tuple[Detokenizer, list[str], str | None, int]:
    """Feed ids one at a time like the engine does (stop at a stop string); return the
    detokenizer, every delta (the last one with finished=True), the stop and its token index."""
    d = Detokenizer(tok, params)
    deltas, stop, at = [], None, -1
    for k, token in enumerate(ids):
        stop = d.add(token)
        if stop is not None:
            at = k
            break
        deltas.append(d.delta(finished=False))
    deltas.append(d.delta(finished=True))
    return d, deltas, stop, at


# --------------------------------------------------------------------------- plain decoding


def test_texts_do_split_characters_over_tokens(tok: Tokenizer) -> None:
    """Precondition of the tests below: single tokens of these texts decode to partial characters."""
    for text in TEXTS[:3]:
        assert any(REPLACEMENT in tok.decode([t]) for t in encode(tok, text)), text


@pytest.mark.parametrize("text", TEXTS)
def test_final_text_equals_full_decode(tok: Tokenizer, text: str) -> None:
    ids = encode(tok, text)
    d, deltas, stop, _ = stream(tok, ids, SamplingParams())
    assert stop is None
    assert d.text == tok.decode(ids) == text
    assert "".join(deltas) == d.text


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_never_split_a_character(tok: Tokenizer, text: str) -> None:
    ids = encode(tok, text)
    d = Detokenizer(tok, SamplingParams())
    deltas = []
    for k, token in enumerate(ids):
        d.add(token)
        assert d.text == streamed_reference(tok, ids, k + 1)
        deltas.append(d.delta(finished=False))
    deltas.append(d.delta(finished=True))
    assert not any(REPLACEMENT in delta for delta in deltas)
    assert "".join(deltas) == text
    assert deltas[-1] == ""  # without stop strings nothing is held back until the end


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_special_tokens(tok: Tokenizer, skip: bool) -> None:
    text = "<|im_start|>user\nhi 🎉<|im_end|>"
    ids = encode(tok, text)
    assert len(ids) < len(text) // 2  # the markers are single special tokens
    d, deltas, _, _ = stream(tok, ids, SamplingParams(skip_special_tokens=skip))
    assert d.text == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in d.text) is not skip
    assert "".join(deltas) == d.text


@HYPOTHESIS
@given(data=st.data())
def test_random_token_ids_never_contradict_the_full_decode(tok: Tokenizer, data: st.DataObject) -> None:
    """Arbitrary id sequences (many of them partial UTF-8 bytes): the text is always a prefix of the
    full decode, and whatever is missing ends in an incomplete character."""
    partial = _partial_tokens(tok)
    ids = data.draw(
        st.lists(
            st.one_of(st.sampled_from(partial), st.integers(0, tok.vocab_size - 1)), min_size=1, max_size=16
        )
    )
    d = Detokenizer(tok, SamplingParams())
    for k, token in enumerate(ids):
        d.add(token)
        full = tok.decode(ids[: k + 1])
        assert full.startswith(d.text)
        assert d.text == full or full.endswith(REPLACEMENT)


_PARTIAL: list[int] = []


def _partial_tokens(tok: Tokenizer) -> list[int]:
    if not _PARTIAL:
        _PARTIAL.extend(i for i in range(tok.vocab_size) if REPLACEMENT in tok.decode([i]))
        assert len(_PARTIAL) > 100
    return _PARTIAL


# ---------------------------------------------------------------------------- stop strings


def spans_a_token_boundary(tok: Tokenizer, ids: list[int], text: str, stop: str) -> bool:
    start = text.index(stop)
    boundaries = {len(tok.decode(ids[:k])) for k in range(1, len(ids))}
    return any(start < b < start + len(stop) for b in boundaries)


@pytest.mark.parametrize(
    ("text", "stop"),
    [
        ("The quick brown fox jumps over the lazy dog. The end.", "fox jumps"),
        ("The quick brown fox jumps over the lazy dog. The end.", "og. Th"),
        ("Hello 👋 world 🌍! 日本語のテキスト.", "🌍! 日本"),
        ("Hello 👋 world 🌍! 日本語のテキスト.", "語の"),
        ("中文测试，汉字。🎉🎉 end", "🎉🎉"),
    ],
)
@pytest.mark.parametrize("keep", [False, True])
def test_stop_string_across_token_boundaries(tok: Tokenizer, text: str, stop: str, keep: bool) -> None:
    ids = encode(tok, text)
    assert tok.decode(ids) == text
    assert spans_a_token_boundary(tok, ids, text, stop)
    params = SamplingParams(stop=[stop], include_stop_str_in_output=keep)
    d, deltas, found, at = stream(tok, ids, params)
    assert found == stop
    # Found at the first token after which the streamed text contains it, not before, not later.
    assert at == min(k for k in range(len(ids)) if stop in streamed_reference(tok, ids, k + 1))
    index = text.index(stop)
    expected = text[: index + len(stop)] if keep else text[:index]
    assert d.text == expected
    assert "".join(deltas) == expected
    assert not any(REPLACEMENT in delta for delta in deltas)


def test_stop_string_at_the_very_start(tok: Tokenizer) -> None:
    ids = encode(tok, "Hello world")
    d, deltas, found, at = stream(tok, ids, SamplingParams(stop="Hel"))
    assert (found, at, d.text, "".join(deltas)) == ("Hel", 0, "", "")


def test_earliest_of_several_stop_strings_wins(tok: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    ids = encode(tok, text)
    d, deltas, found, _ = stream(tok, ids, SamplingParams(stop=["lazy", "fox", "over"]))
    assert found == "fox"
    assert d.text == "".join(deltas) == "The quick brown "


@pytest.mark.parametrize("keep", [False, True])
def test_two_stops_completed_by_the_same_token_cut_at_the_earlier(tok: Tokenizer, keep: bool) -> None:
    text = "I like strawberries a lot"
    ids = encode(tok, text)
    assert tok.decode(ids[2:3]) == " strawberries"  # one token completes both stops below
    params = SamplingParams(stop=["berries", "straw"], include_stop_str_in_output=keep)
    d, deltas, found, at = stream(tok, ids, params)
    assert (found, at) == ("straw", 2)
    assert d.text == "".join(deltas) == ("I like straw" if keep else "I like ")


def test_text_after_the_stop_never_appears(tok: Tokenizer) -> None:
    text = "alpha beta STOP gamma delta"
    ids = encode(tok, text)
    d = Detokenizer(tok, SamplingParams(stop="STOP"))
    seen = ""
    for token in ids:
        stop = d.add(token)
        seen += d.delta(finished=stop is not None)
        if stop is not None:
            break
    else:
        pytest.fail("stop string not found")
    assert seen == "alpha beta "
    assert "gamma" not in d.text


def test_tail_that_may_become_a_stop_is_held_back_then_released(tok: Tokenizer) -> None:
    text = "Hello world war and world peace now"
    ids = encode(tok, text)
    pieces = [tok.decode(ids[: k + 1]) for k in range(len(ids))]
    d = Detokenizer(tok, SamplingParams(stop=" world peace"))
    emitted = ""
    for k, token in enumerate(ids):
        stop = d.add(token)
        if stop is not None:
            emitted += d.delta(finished=True)
            break
        emitted += d.delta(finished=False)
        if pieces[k] == "Hello world":
            assert emitted == "Hello"  # " world" could still become " world peace"
        if pieces[k] == "Hello world war":
            assert emitted == "Hello world war"  # it did not: released
        if pieces[k] == "Hello world war and world":
            assert emitted == "Hello world war and"
    assert stop == " world peace"
    assert emitted == d.text == "Hello world war and"


def test_held_back_tail_is_released_when_the_sequence_finishes(tok: Tokenizer) -> None:
    ids = encode(tok, "Hello world")
    d = Detokenizer(tok, SamplingParams(stop=" world peace"))
    emitted = ""
    for token in ids:
        assert d.add(token) is None
        emitted += d.delta(finished=False)
    assert emitted == "Hello"
    emitted += d.delta(finished=True)  # e.g. max_tokens reached
    assert emitted == "Hello world" == d.text
    assert d.delta(finished=True) == ""


def test_hold_back_uses_the_longest_matching_prefix(tok: Tokenizer) -> None:
    # Tail "ab" is a prefix of "abab!", and so is "abab": hold back the whole "abab".
    ids = encode(tok, "xx abab")
    d = Detokenizer(tok, SamplingParams(stop=["abab!", "b!"]))
    emitted = ""
    for token in ids:
        assert d.add(token) is None
        emitted += d.delta(finished=False)
    assert d.text == "xx abab"
    assert emitted == "xx "


ALPHABET = [*"abc xyz.,!\n", "é", "ñ", "日", "本", "語", "中", "🌍", "👋", "🏽", "😀", "—"]


@HYPOTHESIS
@given(data=st.data())
def test_streaming_with_stop_strings_matches_the_reference(tok: Tokenizer, data: st.DataObject) -> None:
    text = data.draw(st.text(alphabet=ALPHABET, min_size=1, max_size=40), label="text")
    ids = encode(tok, text)
    full = tok.decode(ids)
    stops = data.draw(
        st.lists(
            st.one_of(
                st.text(alphabet=ALPHABET, min_size=1, max_size=4),
                st.integers(0, max(0, len(full) - 1)).flatmap(
                    lambda i: st.integers(i + 1, len(full)).map(lambda j: full[i:j])
                ),
            ).filter(bool),
            min_size=1,
            max_size=3,
        ),
        label="stops",
    )
    keep = data.draw(st.booleans(), label="keep")
    stops_t = tuple(stops)
    d = Detokenizer(tok, SamplingParams(stop=stops, include_stop_str_in_output=keep))
    emitted = ""
    found = None
    for k, token in enumerate(ids):
        found = d.add(token)
        ref = streamed_reference(tok, ids, k + 1)
        if found is not None:
            hits = {s: ref.find(s) for s in stops_t if s in ref}
            assert found in hits
            index = min(hits.values())
            assert hits[found] == index
            assert d.text == (ref[: index + len(found)] if keep else ref[:index])
            break
        assert not any(s in ref for s in stops_t)
        assert d.text == ref
        emitted += d.delta(finished=False)
        assert emitted == ref[: len(ref) - held_back_reference(ref, stops_t)]
    else:
        assert d.text == full
    emitted += d.delta(finished=True)
    assert emitted == d.text
    assert REPLACEMENT not in emitted


def test_stop_string_matching_a_special_token_kept_in_the_text(tok: Tokenizer) -> None:
    ids = encode(tok, "answer: 42<|im_end|>junk")
    params = SamplingParams(stop="<|im_end|>", skip_special_tokens=False)
    d, deltas, found, at = stream(tok, ids, params)
    assert found == "<|im_end|>"
    assert ids[at] == tok.backend.token_to_id("<|im_end|>")
    assert d.text == "".join(deltas) == "answer: 42"


@pytest.mark.parametrize("text", [t for t in TEXTS if not t.isascii()])
def test_a_cut_inside_a_character_ends_before_it(tok, text):
    """max_tokens may stop a sequence inside a multi-byte character: the final text keeps every
    complete character (the tokenizer's decode of the whole ids, less the trailing U+FFFD) and
    no replacement character."""
    ids = encode(tok, text)
    cuts = [k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith(REPLACEMENT)]
    assert cuts, "guard: the text has characters split over tokens"
    for k in cuts:
        detok = Detokenizer(tok, SamplingParams())
        for token_id in ids[:k]:
            detok.add(token_id)
        detok.flush()
        assert detok.text == tok.decode(ids[:k]).rstrip(REPLACEMENT)
        assert detok.delta(finished=True) == detok.text
