"""Progress lines for the slow steps before `lowbit serve` and `lowbit chat` can answer.

Building the compiled CPU ops (about 100 s on a fresh machine) and loading a model otherwise look
like a hang. Each step shows a spinner while it runs and then one line with the time it took. Both
go to stderr: stdout stays the command's own output (the chat, the serving address), so a pipe
reading it sees nothing new. On a non-terminal stderr (CI logs, a service's journal) rich animates
nothing, so there the step's description is printed as a plain line when it starts, and the final
line as on a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:
    import torch

BUILD_DOING = "building CPU kernels (first run on this machine, ~100 s)"


def stderr_console() -> Console:
    """A console on stderr. No highlighting: numbers and paths in the lines are not colored."""
    return Console(stderr=True, highlight=False)


@dataclass
class Step:
    """The outcome line of a `step`. The body may change `done`, e.g. to name what it loaded, which is
    known only afterwards, or to say that it fell back; `seconds` is set when the step ends."""

    done: str
    seconds: float = 0.0


@contextmanager
def step(doing: str, done: str, console: Console | None = None) -> Iterator[Step]:
    """Show `doing...` while the body runs, then `<done> in <seconds> s`. If the body raises, the
    spinner goes and no final line is printed: the caller reports the error."""
    console = console or stderr_console()
    result = Step(done)
    started = time.perf_counter()
    status: AbstractContextManager[object]
    if console.is_terminal and not console.is_dumb_terminal:
        status = console.status(Text(f"{doing}..."))  # Text: a path's brackets are not markup
    else:
        _line(console, f"{doing}...")
        status = nullcontext()
    with status:
        yield result
    result.seconds = time.perf_counter() - started
    _line(console, f"{result.done} in {result.seconds:.1f} s")


def _line(console: Console, text: str) -> None:
    # soft_wrap: a non-terminal console is 80 columns wide; a long path must stay on one line.
    console.print(text, markup=False, soft_wrap=True)


def build_cpu_kernels(device: torch.device, console: Console | None = None) -> None:
    """Build the compiled CPU ops now, under a progress line, when the engine will need them on
    `device` and no previous build is cached; otherwise do nothing (the engine loads a cached build
    in a moment, and a GPU engine never loads them)."""
    from lowbit.kernels.cpu import extension

    if device.type != "cpu" or not extension.build_needed():
        return
    with step(BUILD_DOING, "CPU kernels built", console) as s:
        if extension.load() is None:  # load() has logged why
            s.done = "CPU kernels unavailable, eager torch ops instead: build failed"
