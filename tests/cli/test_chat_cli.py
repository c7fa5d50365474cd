"""`lowbit chat` driven through a pseudo-terminal, as a person would use it."""

from __future__ import annotations

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


def test_chat_answers_and_exits_on_ctrl_d():
    child = _spawn("--temperature", "0")
    child.sendline("What is the capital of France?")
    child.expect("Paris")
    child.expect(r"tok/s")
    child.expect_exact(">>> ")
    # The conversation is kept: the follow-up is answered in the context of the first question.
    child.sendline("Repeat the name of that city in one word.")
    child.expect("Paris")
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
