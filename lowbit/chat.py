"""`lowbit chat`: an interactive terminal chat that streams tokens and keeps the conversation.

Ctrl-C while the model is answering stops that answer (what was said so far is kept); Ctrl-C or
Ctrl-D at the prompt, `/exit` or `/quit` leave. `/reset` starts the conversation again.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from dataclasses import dataclass

from rich.console import Console

from lowbit.runtime.llm import LLM
from lowbit.runtime.sampling_params import SamplingParams

PROMPT = ">>> "


@dataclass
class AnswerStats:
    tokens: int
    seconds: float
    first_token_seconds: float
    interrupted: bool

    def line(self) -> str:
        # Decode rate excludes the prompt's processing, which the first-token time reports.
        decode_time = self.seconds - self.first_token_seconds
        rate = (self.tokens - 1) / decode_time if self.tokens > 1 and decode_time > 0 else 0.0
        note = " · interrupted" if self.interrupted else ""
        first_ms = self.first_token_seconds * 1000
        return f"[{self.tokens} tokens · {rate:.1f} tok/s · first token {first_ms:.0f} ms{note}]"


class _Interrupt:
    """Turns Ctrl-C into a flag checked between engine steps, so no step is cut in half."""

    def __init__(self) -> None:
        self.hit = False

    def __enter__(self) -> _Interrupt:
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.hit = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)


class ChatSession:
    def __init__(self, llm: LLM, params: SamplingParams, system: str | None, console: Console):
        self.llm = llm
        self.params = params
        self.console = console
        self.system = [{"role": "system", "content": system}] if system else []
        self.messages: list[dict[str, str]] = list(self.system)

    def reset(self) -> None:
        self.messages = list(self.system)

    def prompt_ids(self) -> list[int]:
        """The conversation's tokens, dropping the oldest turns when it outgrows the context."""
        limit = self.llm.engine.info.max_model_len - 16
        ids = self.llm.tokenizer.apply_chat_template(self.messages)
        while len(ids) > limit and len(self.messages) > len(self.system) + 1:
            del self.messages[len(self.system)]
            ids = self.llm.tokenizer.apply_chat_template(self.messages)
            self.console.print("[dim](dropped the oldest turn to fit the context)[/dim]")
        return ids

    def answer(self, user_text: str) -> AnswerStats:
        with _Interrupt() as interrupt:
            return self._answer(user_text, interrupt)

    def _answer(self, user_text: str, interrupt: _Interrupt) -> AnswerStats:
        self.messages.append({"role": "user", "content": user_text})
        ids = self.prompt_ids()
        room = self.llm.engine.info.max_model_len - len(ids)
        max_tokens = min(self.params.max_tokens or room, room)
        params = dataclasses.replace(self.params, max_tokens=max_tokens)
        text, tokens, first = [], 0, None
        start = time.perf_counter()
        if not interrupt.hit:
            stream = self.llm.stream(ids, params)
            for output in stream:
                completion = output.outputs[0]
                first = first or time.perf_counter() - start
                tokens = len(completion.token_ids)
                text.append(completion.delta_text)
                sys.stdout.write(completion.delta_text)
                sys.stdout.flush()
                if interrupt.hit:
                    stream.close()  # aborts the request, freeing its KV blocks
                    break
        sys.stdout.write("\n")
        self.messages.append({"role": "assistant", "content": "".join(text)})
        return AnswerStats(tokens, time.perf_counter() - start, first or 0.0, interrupt.hit)


def run_chat(llm: LLM, params: SamplingParams, system: str | None, console: Console) -> None:
    session = ChatSession(llm, params, system, console)
    console.print("[dim]/reset starts over · /exit, Ctrl-D or Ctrl-C at the prompt quits · "
                  "Ctrl-C during an answer stops it[/dim]")  # fmt: skip
    while True:
        try:
            line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            console.print("[dim](conversation cleared)[/dim]")
            continue
        if not command:
            continue
        stats = session.answer(line)
        console.print(f"[dim]{stats.line()}[/dim]")
