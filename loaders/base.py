"""What every loader returns."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from lowbit.runtime.models.config import ModelConfig
from lowbit.runtime.quant import WeightLike

from .tokenizer import Tokenizer


class LazyWeights(Mapping[str, WeightLike]):
    """name -> weight, decoded from the file only when asked for, so the whole checkpoint is never
    held twice (once raw, once packed) and a model larger than half of memory still loads."""

    def __init__(self, names: list[str], fetch: Callable[[str], WeightLike]):
        self._names = names
        self._index = set(names)
        self._fetch = fetch

    def __getitem__(self, name: str) -> WeightLike:
        if name not in self._index:
            raise KeyError(name)
        return self._fetch(name)

    def __contains__(self, name: object) -> bool:
        # Mapping's default would call __getitem__, decoding the whole tensor (or raising its error).
        return name in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A model as a loader found it: its shape, its weights (HF names), its tokenizer."""

    config: ModelConfig
    weights: Mapping[str, WeightLike]
    tokenizer: Tokenizer
    source: str
