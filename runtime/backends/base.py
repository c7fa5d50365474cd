"""What every op backend is (a name and a `can_implement` rule), and choosing one from a list."""

from __future__ import annotations

import logging
from abc import ABC
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import torch

from lowbit.kernels.cpu import extension

logger = logging.getLogger(__name__)


class Backend(ABC):
    """One way to run an op. Subclasses say which arguments `can_implement` and the constructor
    take (the same ones: usually the engine's device and compute dtype)."""

    name: ClassVar[str]

    @classmethod
    def can_implement(cls, *args: Any) -> str | None:
        """None if this backend can run the op for these arguments, else a short reason why not."""
        return None


class DeviceBackend(Backend):
    """A backend of a model's op: chosen for, and constructed with, the engine's device and compute
    dtype. Runs anywhere unless a subclass's rule says otherwise."""

    @classmethod
    def can_implement(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype


class CompiledCPU(DeviceBackend):
    """Mixin of the backends that run the compiled CPU extension (kernels/cpu/): on CPU tensors,
    where the extension could be built. Listed before the op's base class (`class
    CompiledCPUNorm(CompiledCPU, NormBackend)`), so its rule and `self.ops` come first."""

    @classmethod
    def can_implement(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return "CPU only"
        return None if extension.load() is not None else "compiled CPU ops unavailable"

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(device, dtype)
        self.ops = extension.load()


B = TypeVar("B", bound=Backend)


def choose(op: str, candidates: Sequence[type[B]], *args: Any) -> B:
    """The first of `candidates` that can run `op`, constructed with `args`; the choice and the
    reasons of those refused before it are logged once, here (debug level)."""
    refused = []
    for candidate in candidates:
        reason = candidate.can_implement(*args)
        if reason is None:
            logger.debug("%s: %s%s", op, candidate.name, "".join(f"; not {r}" for r in refused))
            return candidate(*args)
        refused.append(f"{candidate.name} ({reason})")
    raise ValueError(f"no backend can run {op}: " + "; ".join(refused))
