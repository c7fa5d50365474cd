"""`AsyncEngine` on the real default model: streaming, concurrency, validation, cancellation,
external aborts, backpressure, engine failure and stop().

Every test body runs under `asyncio.run` with a deadline (see `run`), so a hang fails the test
instead of blocking the run. References come from the synchronous engine (`add_request` and
`step`), one request at a time, greedy. Tests share one engine per mode, so each one leaves it
idle with its KV pool full.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from lowbit.runtime.engine import Engine
from lowbit.runtime.outputs import CompletionOutput, RequestOutput
from lowbit.runtime.sampling_params import SamplingParams
from lowbit.server.async_engine import AsyncEngine, EngineDeadError

DEADLINE = 120.0  # seconds for one test body: a hang fails there (generous: shared CI CPUs)
PROMPT = "The capital of France is"
PROMPTS = [
    "The capital of France is",
    "Water boils at",
    "A short poem about the sea:\n",
    "List three prime numbers:",
    "The largest planet in the solar system is",
    "My favourite food is",
    "Once upon a time",
    "def fibonacci(n):",
]


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


_references: dict[tuple[int, str, str], CompletionOutput] = {}


def reference(engine: Engine, prompt: str, params: SamplingParams) -> CompletionOutput:
    """What the synchronous engine generates for `prompt` alone (cached per engine)."""
    key = (id(engine), prompt, repr(params))
    if key not in _references:
        assert not engine.has_unfinished()
        engine.add_request("sync-reference", prompt, params)
        final = None
        while engine.has_unfinished():
            for output in engine.step():
                final = output
        assert final is not None and final.finished
        _references[key] = final.outputs[0]
    return _references[key]


def run(body: Callable[[AsyncEngine], Awaitable[None]], engine: Engine, **kwargs) -> None:
    """Run `body` on a fresh AsyncEngine around `engine` under the deadline, then stop it."""

    async def main() -> None:
        async_engine = AsyncEngine(engine, **kwargs)
        try:
            await asyncio.wait_for(body(async_engine), DEADLINE)
        finally:
            await async_engine.stop()

    asyncio.run(main())


async def collect(stream: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    return [output async for output in stream]


async def collect_into(stream: AsyncIterator[RequestOutput], into: list[RequestOutput]) -> None:
    async for output in stream:
        into.append(output)


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


def check_stream(outputs: list[RequestOutput]) -> CompletionOutput:
    """One stream's invariants: one request id, only the last output finished, and the deltas add
    up to the final text and tokens. Returns the final completion."""
    assert outputs, "the stream yielded nothing"
    assert len({o.request_id for o in outputs}) == 1
    assert outputs[-1].finished
    assert not any(o.finished for o in outputs[:-1])
    final = outputs[-1].outputs[0]
    assert "".join(o.outputs[0].delta_text for o in outputs) == final.text
    assert [t for o in outputs for t in o.outputs[0].delta_token_ids] == final.token_ids
    return final


def assert_idle(engine: Engine) -> None:
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks
    assert stats.num_running == stats.num_waiting == 0
    assert not engine.has_unfinished()
    assert not engine.requests


class StepProbe:
    """Wraps `engine.step` (which runs in the worker thread) to record the requests every step
    starts with, and `admit`/`abort` to catch any engine mutation made while a step runs."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch, delay: float = 0.0):
        self.requests_per_step: list[frozenset[str]] = []
        self.seqs_per_step: list[int] = []  # running + waiting sequences as each step starts
        self.in_step = False
        self.mutations_during_step: list[str] = []
        step = engine.step

        def probed_step():
            self.in_step = True
            try:
                stats = engine.stats()
                self.requests_per_step.append(frozenset(engine.requests))
                self.seqs_per_step.append(stats.num_running + stats.num_waiting)
                time.sleep(delay)
                return step()
            finally:
                self.in_step = False

        def probed(name, method):
            def wrapper(*args):
                if self.in_step:
                    self.mutations_during_step.append(name)
                return method(*args)

            return wrapper

        monkeypatch.setattr(engine, "step", probed_step)
        monkeypatch.setattr(engine, "admit", probed("admit", engine.admit))
        monkeypatch.setattr(engine, "abort", probed("abort", engine.abort))

    def steps_with(self, request_id: str, since: int = 0) -> int:
        return sum(request_id in r for r in self.requests_per_step[since:])


# ---------------------------------------------------------------------- streaming


def test_one_request_streams_what_the_synchronous_engine_generates(engine):
    params = greedy(16)
    expected = reference(engine, PROMPT, params)

    async def body(ae: AsyncEngine) -> None:
        outputs = await collect(ae.generate(PROMPT, params, request_id="one"))
        final = check_stream(outputs)
        assert outputs[0].request_id == "one"
        assert outputs[0].prompt == PROMPT
        assert final.token_ids == expected.token_ids
        assert final.text == expected.text
        assert final.finish_reason == "length"
        assert len(outputs) == 16  # an output after every step, one token each
        assert ae.num_in_flight == 0
        assert_idle(engine)

    run(body, engine)
    assert_idle(engine)


def test_stop_string_deltas_add_up_to_the_cut_text(engine):
    free = reference(engine, PROMPT, greedy(24)).text
    stop = free.split()[2]  # a word the greedy continuation is known to contain
    params = SamplingParams(temperature=0, max_tokens=24, stop=[stop])
    expected = reference(engine, PROMPT, params)

    async def body(ae: AsyncEngine) -> None:
        final = check_stream(await collect(ae.generate(PROMPT, params)))
        assert final.text == expected.text == free[: free.index(stop)]
        assert final.token_ids == expected.token_ids
        assert (final.finish_reason, final.stop_reason) == ("stop", stop)

    run(body, engine)
    assert_idle(engine)


def test_concurrent_requests_each_get_their_single_request_result(exact_engine, monkeypatch):
    engine = exact_engine
    params = [greedy(4 + i) for i in range(len(PROMPTS))]  # they finish at different steps
    expected = [reference(engine, p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
    # Steps of at least 50 ms: request 0 then lives >= 250 ms, so the staggered arrivals overlap
    # however fast the engine computes (with 10-20 ms steps it could finish before the 4th came).
    probe = StepProbe(engine, monkeypatch, delay=0.05)

    async def one(ae: AsyncEngine, i: int) -> list[RequestOutput]:
        await asyncio.sleep(0.04 * i)  # staggered: later requests join while earlier ones decode
        return await collect(ae.generate(PROMPTS[i], params[i], request_id=f"r{i}"))

    async def body(ae: AsyncEngine) -> None:
        results = await asyncio.gather(*(one(ae, i) for i in range(len(PROMPTS))))
        for i, outputs in enumerate(results):
            final = check_stream(outputs)
            assert outputs[0].request_id == f"r{i}"
            assert final.token_ids == expected[i].token_ids, PROMPTS[i]
            assert final.text == expected[i].text
            assert final.finish_reason == "length"
        assert max(len(r) for r in probe.requests_per_step) >= 4, "the requests never ran batched"
        assert_idle(engine)

    run(body, engine)
    assert_idle(engine)


# ---------------------------------------------------------------------- validation and ids


def test_invalid_requests_fail_at_the_call_and_the_engine_stays_usable(engine):
    vocab, context = engine.info.vocab_size, engine.info.max_model_len
    invalid = [
        ([], greedy(4), "prompt is empty"),
        ("", greedy(4), "prompt is empty"),
        ("Hello", greedy(context), "exceeds the context length"),
        ([1] * context, greedy(1), "leaves no room"),
        ([vocab], greedy(4), "outside the vocabulary"),
    ]
    expected = reference(engine, PROMPT, greedy(12))

    async def body(ae: AsyncEngine) -> None:
        running = asyncio.create_task(collect(ae.generate(PROMPT, greedy(12), request_id="ok")))
        await wait_until(lambda: "ok" in engine.requests, "the valid request to be admitted")
        for prompt, params, message in invalid:
            with pytest.raises(ValueError, match=message):
                ae.generate(prompt, params, request_id="bad")  # before any output can be sent
        assert ae.error is None
        final = check_stream(await running)  # undisturbed by the rejections around it
        assert final.token_ids == expected.token_ids
        # A rejected request never took its id, and the loop still serves.
        again = check_stream(await collect(ae.generate(PROMPT, greedy(12), request_id="bad")))
        assert again.token_ids == expected.token_ids
        assert ae.num_in_flight == 0
        assert_idle(engine)

    run(body, engine)
    assert_idle(engine)


def test_duplicate_request_id_in_flight_is_rejected(engine):
    expected = reference(engine, PROMPT, greedy(12))

    async def body(ae: AsyncEngine) -> None:
        first = ae.generate(PROMPT, greedy(12), request_id="dup")
        outputs = [await first.__anext__()]
        with pytest.raises(ValueError, match="already in use"):
            await ae.generate("Water boils at", greedy(4), request_id="dup").__anext__()
        outputs += await collect(first)
        assert check_stream(outputs).token_ids == expected.token_ids
        # Once it finished, the id is free again.
        again = check_stream(await collect(ae.generate(PROMPT, greedy(12), request_id="dup")))
        assert again.token_ids == expected.token_ids
        assert ae.error is None

    run(body, engine)
    assert_idle(engine)


def test_duplicate_of_a_request_waiting_for_a_slot_is_rejected(engine):
    async def body(ae: AsyncEngine) -> None:  # max_pending=2
        fillers = [
            asyncio.create_task(collect(ae.generate(PROMPT, greedy(6), request_id=f"f{i}"))) for i in range(2)
        ]
        waiting = asyncio.create_task(collect(ae.generate("Water boils at", greedy(6), request_id="w")))
        # (membership tests only: iterating engine.requests could race the step thread)
        await wait_until(lambda: "f0" in engine.requests and "f1" in engine.requests, "both fillers admitted")
        with pytest.raises(ValueError, match="already in use"):
            await asyncio.wait_for(ae.generate(PROMPT, greedy(6), request_id="w").__anext__(), 5)
        for outputs in await asyncio.gather(*fillers, waiting):
            final = check_stream(outputs)
            assert (final.finish_reason, len(final.token_ids)) == ("length", 6)
        assert ae.error is None

    run(body, engine, max_pending=2)
    assert_idle(engine)


def test_an_abandoned_request_id_is_busy_until_its_abort_is_applied_then_reusable(engine):
    expected = reference(engine, PROMPT, greedy(8))

    async def body(ae: AsyncEngine) -> None:
        async with contextlib.aclosing(ae.generate(PROMPT, greedy(400), request_id="r")) as stream:
            async for _ in stream:
                break
        # Closed, but the engine holds the request until the abort is applied before the next
        # step: reusing the id now is refused, not silently dropped (nor a hang).
        with pytest.raises(ValueError, match="already in use"):
            await asyncio.wait_for(ae.generate(PROMPT, greedy(8), request_id="r").__anext__(), 5)
        await wait_until(lambda: ae.num_in_flight == 0, "the abort to be applied")
        assert_idle(engine)
        final = check_stream(await collect(ae.generate(PROMPT, greedy(8), request_id="r")))
        assert final.token_ids == expected.token_ids

    run(body, engine)
    assert_idle(engine)


# ---------------------------------------------------------------------- cancellation and aborts


@pytest.mark.parametrize("how", ["break", "cancel"])
def test_leaving_a_stream_early_aborts_it_and_the_others_finish(exact_engine, monkeypatch, how):
    engine = exact_engine
    others = [(PROMPTS[i], greedy(10)) for i in (0, 1)]
    expected = [reference(engine, p, sp) for p, sp in others]
    probe = StepProbe(engine, monkeypatch)
    left_at_step: list[int] = []  # the step count when the consumer left

    async def leaver(ae: AsyncEngine) -> None:
        received = 0
        async for _ in ae.generate(PROMPTS[2], greedy(400), request_id="long"):
            received += 1
            if received == 2:
                left_at_step.append(len(probe.requests_per_step))
                break  # the iterator is dropped here; closing it aborts the request

    async def cancelled(ae: AsyncEngine) -> None:
        received: list[RequestOutput] = []
        task = asyncio.create_task(
            collect_into(ae.generate(PROMPTS[2], greedy(400), request_id="long"), received)
        )
        await wait_until(lambda: len(received) >= 2, "two outputs of the long request")
        left_at_step.append(len(probe.requests_per_step))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def body(ae: AsyncEngine) -> None:
        streams = [
            asyncio.create_task(collect(ae.generate(p, sp, request_id=f"other{i}")))
            for i, (p, sp) in enumerate(others)
        ]
        await (leaver(ae) if how == "break" else cancelled(ae))
        await wait_until(lambda: "long" not in engine.requests, "the long request to be aborted", 10)
        # Aborts apply before the next step: at most the step in flight when it left ran it.
        assert probe.steps_with("long", since=left_at_step[0]) <= 1
        for (prompt, _), outputs, ref in zip(others, await asyncio.gather(*streams), expected, strict=True):
            assert check_stream(outputs).token_ids == ref.token_ids, prompt
        await wait_until(lambda: ae.num_in_flight == 0, "every stream to be released")
        assert_idle(engine)

    run(body, engine)
    assert_idle(engine)


def test_external_abort_ends_the_stream_with_an_abort_output(engine):
    async def body(ae: AsyncEngine) -> None:
        other = asyncio.create_task(collect(ae.generate("Water boils at", greedy(8), request_id="other")))
        outputs: list[RequestOutput] = []

        async def consume() -> None:
            async for output in ae.generate(PROMPT, greedy(400), request_id="victim"):
                outputs.append(output)
                if len(outputs) == 2:
                    ae.abort("victim")

        await asyncio.wait_for(consume(), 30)  # the stream must end, not wait forever
        final = check_stream(outputs)
        assert final.finish_reason == "abort"
        assert 2 <= len(final.token_ids) < 10  # aborted within a step or two, not run to 400
        assert "victim" not in engine.requests
        ae.abort("no-such-request")  # unknown ids are ignored
        other_final = check_stream(await other)
        assert (other_final.finish_reason, len(other_final.token_ids)) == ("length", 8)
        await wait_until(lambda: ae.num_in_flight == 0, "every stream to be released")
        assert_idle(engine)

    run(body, engine)
    assert_idle(engine)


def test_external_abort_of_a_request_waiting_for_a_slot(engine, monkeypatch):
    probe = StepProbe(engine, monkeypatch)

    async def body(ae: AsyncEngine) -> None:  # max_pending=1
        running = asyncio.create_task(collect(ae.generate(PROMPT, greedy(8), request_id="running")))
        queued = asyncio.create_task(collect(ae.generate("Water boils at", greedy(8), request_id="queued")))
        await wait_until(lambda: "running" in engine.requests, "the first request to be admitted")
        ae.abort("queued")
        final = check_stream(await asyncio.wait_for(queued, 30))
        assert (final.finish_reason, final.token_ids, final.text) == ("abort", [], "")
        running_final = check_stream(await running)
        assert (running_final.finish_reason, len(running_final.token_ids)) == ("length", 8)
        assert probe.steps_with("queued") == 0  # it never ran
        assert_idle(engine)

    run(body, engine, max_pending=1)
    assert_idle(engine)


# ---------------------------------------------------------------------- backpressure


def test_max_pending_keeps_a_third_request_out_of_the_engine_until_a_slot_frees(engine, monkeypatch):
    probe = StepProbe(engine, monkeypatch)
    events: list[tuple[str, str]] = []
    lengths = {"a": 4, "b": 16, "c": 4}  # a finishes first and hands its slot to c

    async def consume(ae: AsyncEngine, request_id: str, prompt: str) -> list[RequestOutput]:
        outputs = []
        async for output in ae.generate(prompt, greedy(lengths[request_id]), request_id=request_id):
            if not outputs:
                events.append(("first", request_id))
            outputs.append(output)
        events.append(("done", request_id))
        return outputs

    async def body(ae: AsyncEngine) -> None:  # max_pending=2
        results = await asyncio.gather(
            *(consume(ae, rid, prompt) for rid, prompt in zip(lengths, PROMPTS, strict=False))
        )
        for rid, outputs in zip(lengths, results, strict=True):
            final = check_stream(outputs)
            assert (final.finish_reason, len(final.token_ids)) == ("length", lengths[rid])
        assert max(probe.seqs_per_step) == 2  # two ran together, never three
        assert all(len(r) <= 2 for r in probe.requests_per_step)
        assert not any({"a", "c"} <= r for r in probe.requests_per_step)  # c waited for a's slot
        assert events.index(("done", "a")) < events.index(("first", "c"))
        assert any({"b", "c"} <= r for r in probe.requests_per_step)  # c ran alongside b
        assert_idle(engine)

    run(body, engine, max_pending=2)
    assert_idle(engine)


# ---------------------------------------------------------------------- failure and stop


def test_a_failing_step_fails_every_request_with_engine_dead_error(engine, monkeypatch):
    boom = RuntimeError("injected model failure")
    run_model = engine.runner.run
    calls = 0

    def failing_run(batch):
        nonlocal calls
        calls += 1
        if calls > 3:
            raise boom
        return run_model(batch)

    monkeypatch.setattr(engine.runner, "run", failing_run)

    async def body(ae: AsyncEngine) -> None:  # max_pending=2: the third waits for a slot
        streams = [
            asyncio.create_task(collect(ae.generate(p, greedy(50), request_id=f"r{i}")))
            for i, p in enumerate(PROMPTS[:3])
        ]
        results = await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True), 60)
        for result in results:
            assert isinstance(result, EngineDeadError), result
            assert result.__cause__ is boom
        assert ae.error is boom
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(ae.generate(PROMPT, greedy(4)).__anext__(), 5)
        await ae.stop()  # releases what the dead loop left in the engine
        assert_idle(engine)

    run(body, engine, max_pending=2)
    assert_idle(engine)


def test_stop_aborts_everything_in_flight_without_touching_a_running_step(engine, monkeypatch):
    probe = StepProbe(engine, monkeypatch, delay=0.1)  # long steps, so stop() lands in one
    received: dict[str, list[RequestOutput]] = {f"r{i}": [] for i in range(3)}

    async def body(ae: AsyncEngine) -> None:  # max_pending=2: r2 waits for a slot
        tasks = [
            asyncio.create_task(collect_into(ae.generate(p, greedy(300), request_id=rid), received[rid]))
            for rid, p in zip(received, PROMPTS, strict=False)
        ]
        await wait_until(lambda: len(received["r0"]) >= 2 and len(received["r1"]) >= 2, "outputs")
        await wait_until(lambda: probe.in_step, "a step to be running")
        await ae.stop()
        assert probe.mutations_during_step == []
        assert_idle(engine)  # at once: stop() has applied the aborts
        await asyncio.wait_for(asyncio.gather(*tasks), 30)  # and every stream ends
        for rid in ("r0", "r1"):
            final = check_stream(received[rid])
            assert final.finish_reason == "abort"
            assert 2 <= len(final.token_ids) < 300
        final = check_stream(received["r2"])
        assert (final.finish_reason, final.token_ids) == ("abort", [])
        assert probe.steps_with("r2") == 0
        assert ae.num_in_flight == 0

    run(body, engine, max_pending=2)
    assert_idle(engine)


def test_engine_abort_returns_the_final_output(engine):
    """The engine half of external aborts: `Engine.abort` hands back the request's last output."""
    engine.add_request("x", PROMPT, greedy(50))
    streamed = [t for _ in range(3) for o in engine.step() for t in o.outputs[0].delta_token_ids]
    final = engine.abort("x")
    assert final is not None and final.finished
    completion = final.outputs[0]
    assert completion.finish_reason == "abort"
    assert completion.token_ids == streamed and completion.delta_token_ids == []
    assert engine.abort("x") is None  # already gone
    assert engine.abort("never-seen") is None
    assert_idle(engine)
