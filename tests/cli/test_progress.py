"""lowbit/progress.py: the progress lines of the slow steps before serve and chat can answer, and
kernels/cpu/extension.build_needed, which says whether the slowest of them (the CPU ops' build) is due."""

from __future__ import annotations

import functools
import io
import re
import time

import pytest
import torch
from rich.console import Console

from lowbit import progress
from lowbit.kernels.cpu import extension

TIME = r"in \d+\.\d s"


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=60, highlight=False), out


def test_step_on_a_non_terminal_says_what_it_does_and_then_what_it_did_in_how_long():
    console, out = _console(terminal=False)
    path = "/a/directory/deep/enough/that/the/line/is/longer/than/the/console/[is]/model.gguf"
    with progress.step("loading model.gguf", "loaded model.gguf", console) as s:
        time.sleep(0.15)
        s.done = f"loaded {path}"
    lines = out.getvalue().splitlines()
    # One line each: a long path is not wrapped at the console's width, brackets are not markup.
    assert len(lines) == 2, lines
    assert lines[0] == "loading model.gguf..."
    assert re.fullmatch(rf"loaded {re.escape(path)} {TIME}", lines[1]), lines[1]
    assert 0.15 <= s.seconds < 5
    assert f"{s.seconds:.1f} s" in lines[1]


def test_step_on_a_terminal_ends_with_the_final_line():
    console, out = _console(terminal=True)
    with progress.step("loading model.gguf", "loaded model.gguf", console):
        time.sleep(0.3)  # the spinner draws (and then erases) itself meanwhile
    text = out.getvalue()
    assert "\x1b[" in text  # the spinner's cursor movements: this console is a terminal
    assert re.search(rf"loaded model\.gguf {TIME}\n$", text), repr(text)


@pytest.mark.parametrize("terminal", [False, True])
def test_a_failed_step_prints_no_final_line(terminal):
    console, out = _console(terminal)
    with pytest.raises(ValueError, match="bad file"), progress.step("loading x", "loaded x", console):
        raise ValueError("bad file")
    assert "loaded" not in out.getvalue()


class _FakeOps:
    """Stands in for cpu_ops' build: records calls, takes a moment, succeeds or not."""

    def __init__(self, needed: bool, builds: bool) -> None:
        self.needed, self.builds, self.loads = needed, builds, 0

    def build_needed(self) -> bool:
        return self.needed

    def load(self) -> object | None:
        self.loads += 1
        time.sleep(0.1)
        return object() if self.builds else None


@pytest.fixture
def fake_ops(monkeypatch):
    def make(needed: bool = True, builds: bool = True) -> _FakeOps:
        fake = _FakeOps(needed, builds)
        monkeypatch.setattr(extension, "build_needed", fake.build_needed)
        monkeypatch.setattr(extension, "load", fake.load)
        return fake

    return make


def test_build_cpu_kernels_says_when_it_builds_and_how_long_it_took(fake_ops):
    fake = fake_ops()
    console, out = _console(terminal=False)
    progress.build_cpu_kernels(torch.device("cpu"), console)
    assert fake.loads == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == "building CPU kernels (first run on this machine, ~100 s)..."
    assert re.fullmatch(rf"CPU kernels built {TIME}", lines[1]), lines


def test_a_failed_build_is_not_reported_as_built(fake_ops):
    fake_ops(builds=False)
    console, out = _console(terminal=False)
    progress.build_cpu_kernels(torch.device("cpu"), console)
    assert "CPU kernels built" not in out.getvalue()
    failed = rf"CPU kernels unavailable, eager torch ops instead: build failed {TIME}"
    assert re.fullmatch(failed, out.getvalue().splitlines()[1]), out.getvalue()


@pytest.mark.parametrize(("needed", "device"), [(False, "cpu"), (True, "cuda")])
def test_build_cpu_kernels_is_silent_with_a_cached_build_or_on_a_gpu(fake_ops, needed, device):
    fake = fake_ops(needed=needed)
    console, out = _console(terminal=False)
    progress.build_cpu_kernels(torch.device(device), console)
    assert out.getvalue() == ""
    assert fake.loads == 0  # a cached build loads with the model; a GPU engine never loads one


def test_build_needed_is_false_once_loaded():
    extension.load()
    assert not extension.build_needed()


def test_build_needed_looks_for_a_previous_build(monkeypatch, tmp_path):
    if extension.load() is None:
        pytest.skip("the compiled CPU ops are unavailable here")
    # As in a fresh process: load() not called yet.
    monkeypatch.setattr(extension, "load", functools.cache(lambda: None))
    assert not extension.build_needed()  # this machine's build is noted in the cache directory
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert extension.build_needed()  # an empty cache directory: a fresh machine
    monkeypatch.setenv("LOWBIT_CPU_OPS", "0")
    assert not extension.build_needed()  # disabled: nothing will be built
