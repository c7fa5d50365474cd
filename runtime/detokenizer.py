"""Incremental detokenization and stop strings.

`tokenizers.decoders.DecodeStream` turns tokens into text without ever splitting a multi-byte
character. On top of it: stop strings that may span token boundaries, and streaming deltas that
hold back any tail which could still become a stop string, so a client never sees text that is
later taken back.
"""

from __future__ import annotations

from lowbit.loaders.tokenizer import Tokenizer
from lowbit.runtime.sampling_params import SamplingParams


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        self.tokenizer = tokenizer
        self.stream = tokenizer.decode_stream(params.skip_special_tokens)
        self.stops = params.stop
        self.keep_stop = params.include_stop_str_in_output
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.skip_special_tokens = params.skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0

    def add(self, token_id: int) -> str | None:
        """Append a token's text; returns the stop string if the text now contains one (the text is
        then cut at it, or just after it with include_stop_str_in_output)."""
        self.token_ids.append(token_id)
        piece = self.stream.step(self.tokenizer.backend, token_id)
        return self._extend(piece) if piece else None

    def flush(self) -> str | None:
        """The sequence ended: complete characters still held back with an unfinished one are
        added; the unfinished character's bytes are dropped (a max_tokens cut inside a multi-byte
        character ends the text before it, not in U+FFFD)."""
        full = self.tokenizer.decode(self.token_ids, self.skip_special_tokens)
        if not full.startswith(self.text):
            return None
        held = full[len(self.text) :].rstrip("\ufffd")
        return self._extend(held) if held else None

    def _extend(self, piece: str) -> str | None:
        searched_from = max(0, len(self.text) - self.longest_stop + 1)
        self.text += piece
        return self._cut_at_stop(searched_from)

    def _cut_at_stop(self, start: int) -> str | None:
        hits = [(self.text.find(s, start), s) for s in self.stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        self.text = self.text[: index + len(stop) if self.keep_stop else index]
        return stop

    def delta(self, finished: bool) -> str:
        """Text not handed out yet. While running, a tail that is a prefix of a stop string waits."""
        end = len(self.text) if finished else len(self.text) - self._pending_stop_prefix()
        end = max(end, self.emitted)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def _pending_stop_prefix(self) -> int:
        for length in range(min(self.longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-length:]
            if any(s.startswith(tail) for s in self.stops):
                return length
        return 0
