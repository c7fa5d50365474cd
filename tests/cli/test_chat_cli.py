"""`lowbit chat` driven through a pseudo-terminal, as a person would use it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import pexpect
import pytest

LOAD_TIMEOUT = 120


def _lowbit() -> list[str]:
    exe = shutil.which("lowbit")
    return [exe] if exe else [sys.executable, "-m", "lowbit.cli"]


def _spawn(*args: str) -> pexpect.spawn:
    cmd, *rest = _lowbit()
    child = pexpect.spawn(
        cmd, [*rest, "chat", *args], encoding="utf-8", timeout=LOAD_TIMEOUT, dimensions=(40, 200)
    )
    child.expect_exact(">>> ")
    return child


def test_help_lists_the_commands():
    out = subprocess.run([*_lowbit(), "--help"], capture_output=True, text=True, check=True).stdout
    assert "chat" in out


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_help_names_every_value_the_runtime_accepts(command):
    from lowbit.runtime.config import KV_CACHE_DTYPES
    from lowbit.runtime.quant.rtn import RTN_SCHEMES

    env = {**os.environ, "COLUMNS": "400"}  # one line per option
    out = subprocess.run(
        [*_lowbit(), command, "--help"], capture_output=True, text=True, check=True, env=env
    ).stdout
    for option, values in (("--kv-cache-dtype", KV_CACHE_DTYPES), ("--quantization", RTN_SCHEMES)):
        line = next(line for line in out.splitlines() if f" {option} " in line)
        help_text = line.split("<str>", 1)[1]
        missing = [v for v in values if not re.search(rf"\b{v}\b", help_text)]
        assert not missing, f"{option}'s help leaves out {missing}: {line.strip()}"


def test_loading_says_what_it_does_on_stderr_with_the_time_taken(default_gguf):
    result = subprocess.run(
        [*_lowbit(), "chat"], input="/exit\n", capture_output=True, text=True, timeout=LOAD_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    # stderr is a pipe: no spinner, but what is being loaded and then how long it took.
    loading = f"loading {default_gguf.name}..."
    loaded = rf"loaded {re.escape(str(default_gguf))} in (\d+\.\d) s"
    assert loading in lines, result.stderr
    found = [(i, float(m[1])) for i, line in enumerate(lines) if (m := re.fullmatch(loaded, line))]
    assert len(found) == 1, result.stderr
    ((index, seconds),) = found
    assert index > lines.index(loading) and 0 < seconds < LOAD_TIMEOUT, result.stderr
    assert "loaded" not in result.stdout  # stdout is the chat: the model's header line, then the prompt
    assert "KV cache" in result.stdout


def test_chat_answers_and_exits_on_ctrl_d():
    # The default bf16 mode, greedy. Questions whose fp32 greedy answers (transformers, the same GGUF)
    # have no near-tie on the way: HF's smallest top-2 margin is 2.55 up to "Tokyo" in the first
    # answer and 2.21 in the second, against fast mode's 0.25 (docs/accuracy.md). (France's first
    # token is a near-tie, 0.08, so which answer bf16 gives there is rounding luck.)
    child = _spawn("--temperature", "0")
    child.sendline("What is the capital of Japan?")
    child.expect("Tokyo")
    child.expect(r"tok/s")
    child.expect_exact(">>> ")
    # The conversation is kept: the follow-up is answered in the context of the first question.
    child.sendline("Repeat the name of that city.")
    child.expect("Tokyo")
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_an_answer_and_ctrl_c_at_the_prompt_quits():
    child = _spawn("--temperature", "0", "--max-tokens", "2000")
    child.sendline("Write a very long story about a dragon.")
    child.expect_exact("dragon.\r\n")  # the terminal's echo of our line
    child.expect(r"\w+ \w+ \w+")  # the answer is streaming
    child.kill(signal.SIGINT)
    child.expect("interrupted")
    child.expect_exact(">>> ")
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.expect_exact(">>> ")
    child.kill(signal.SIGINT)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_bad_model_path_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [*_lowbit(), "chat", str(tmp_path / "missing.gguf")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "no such file or directory" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("flag", "value", "field"), [("--temperature", "-1", "temperature"), ("--top-p", "0", "top_p")]
)
def test_invalid_sampling_flag_is_a_clear_error(flag, value, field):
    result = subprocess.run([*_lowbit(), "chat", flag, value], capture_output=True, text=True)
    assert result.returncode == 2
    assert field in result.stdout + result.stderr
