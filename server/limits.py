"""What one request may ask of the server: the size of its body, its sequences and stop strings.

Without them one request could monopolise the engine (20 prompts x n=128 held it for 85 s) or the
host (a 200 MB body). The defaults follow OpenAI where it has a limit (4 stop strings) and are
configurable on `lowbit serve`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import APIError


@dataclass(frozen=True)
class ServerLimits:
    max_request_bytes: int = 8 << 20  # a body; larger is a 413 before it is read
    max_n: int = 16  # choices per prompt
    max_sequences: int = 64  # prompts x n in one request
    max_stop: int = 4  # stop strings, as OpenAI

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_n", "max_sequences", "max_stop"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def check(self, prompts: int, n: int, stop: str | list[str] | None) -> None:
        """A 400 naming the parameter for a request over the limits."""
        if n > self.max_n:
            raise APIError(f"n must be <= {self.max_n} on this server, got {n}", 400, "n")
        if prompts * n > self.max_sequences:
            raise APIError(
                f"this request asks for {prompts} prompts x n={n} = {prompts * n} sequences; "
                f"this server allows {self.max_sequences} per request",
                400,
                "n" if prompts == 1 else "prompt",
            )
        if isinstance(stop, list) and len(stop) > self.max_stop:
            raise APIError(f"stop may hold at most {self.max_stop} strings, got {len(stop)}", 400, "stop")
