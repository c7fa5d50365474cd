"""`AsyncEngine`: the engine loop as an asyncio background task, for servers.

Steps run in one dedicated worker thread so the event loop keeps serving while the model computes.
One thread should do all of torch's CPU work: OpenMP keeps a thread team per calling thread, and
when the loading thread's team and the stepping thread's team both exist, decoding ran at half
speed (measured on 2 cores: 22 tok/s instead of 44). `from_config` loads the engine on the step
thread for that reason.
The engine is only mutated between steps, on the event loop: new requests and aborts
queue up and are applied, in the order they came, before the next step starts. Each request's
outputs flow through its own queue to the `generate` iterator; leaving that iterator early (client
gone, task cancelled) aborts the request and frees its KV blocks, and an `abort()` from outside
ends the stream with a final output whose finish_reason is "abort". At most `max_pending`
requests are in the engine; more callers wait for a slot (backpressure) instead of growing the
queue without bound.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lowbit.runtime.config import EngineConfig
from lowbit.runtime.engine import Engine, Request
from lowbit.runtime.engine_info import EngineInfo
from lowbit.runtime.outputs import RequestOutput
from lowbit.runtime.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop failed; every request in flight gets this."""


@dataclass(eq=False)
class _Stream:
    """One `generate` call: its request and the queue its outputs arrive on."""

    request: Request
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    in_engine: bool = False  # admitted to the engine (by the loop, between steps)


class AsyncEngine:
    def __init__(self, engine: Engine, max_pending: int = 256, worker: ThreadPoolExecutor | None = None):
        self.engine = engine
        self._worker = worker or ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowbit-step")
        self.slots = asyncio.Semaphore(max_pending)
        self._pending: list[_Stream | str] = []  # admissions and aborts (by id), applied in order
        # A request from its `generate` call until the engine is done with it (finished, or its
        # abort applied): its id is taken all that time, so one id never names two requests.
        self._streams: dict[str, _Stream] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self.error: BaseException | None = None

    @classmethod
    def from_config(cls, config: EngineConfig, max_pending: int = 256) -> AsyncEngine:
        """Build the engine on the step thread itself, so that one thread does all of torch's
        work (see the module docstring); servers should start this way."""
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowbit-step")
        return cls(worker.submit(Engine, config).result(), max_pending, worker)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="lowbit-engine")

    def abort_all(self) -> None:
        """Abort everything in flight: each stream ends with an "abort" output."""
        for request_id in list(self._streams):
            self.abort(request_id)

    async def stop(self) -> None:
        """Abort everything in flight (each stream ends with an "abort" output) and stop the loop,
        after the step that is running, if any, has finished."""
        self.abort_all()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        self._apply_pending()

    @property
    def info(self) -> EngineInfo:
        """The served engine's fixed facts (source, dtypes, context length, ...)."""
        return self.engine.info

    @property
    def num_in_flight(self) -> int:
        """Requests taken and not yet let go of, those waiting for a slot included."""
        return len(self._streams)

    # ------------------------------------------------------------------ requests

    def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """An iterator over the request's output after every step that advances it, the last one
        finished. Raises ValueError here, before anything is sent to a client, for a request that
        can never be served or whose id is in use."""
        self._check_usable(request_id)
        request = self.engine.prepare(request_id or f"req-{uuid.uuid4().hex}", prompt, params)
        return self._stream(_Stream(request))

    def _check_usable(self, request_id: str | None) -> None:
        if self.error is not None:
            raise EngineDeadError(f"engine loop failed earlier: {self.error!r}")
        if request_id is not None and request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")

    async def _stream(self, stream: _Stream) -> AsyncIterator[RequestOutput]:
        request_id = stream.request.request_id
        self._check_usable(request_id)
        self._streams[request_id] = stream
        self.start()
        finished = False
        try:
            async with self.slots:
                self._pending.append(stream)
                self._wake.set()
                while not finished:
                    item = await stream.queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    finished = item.finished
                    yield item
        finally:
            if self._streams.get(request_id) is stream:
                if finished:
                    del self._streams[request_id]
                else:
                    self.abort(request_id)  # the id stays taken until the abort is applied

    def abort(self, request_id: str) -> None:
        """Stop a request before its next step: its KV blocks are freed and its stream ends with a
        final output whose finish_reason is "abort". Unknown or finished ids are ignored."""
        self._pending.append(request_id)
        self._wake.set()

    # ------------------------------------------------------------------ the loop

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, []
        for item in pending:
            if isinstance(item, str):
                self._apply_abort(item)
            elif self._streams.get(item.request.request_id) is item:  # not aborted meanwhile
                self.engine.admit(item.request)
                item.in_engine = True

    def _apply_abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.in_engine:
            # Aborted before it was admitted (e.g. while waiting for a slot): it enters the engine
            # only to leave it, so that it ends like any aborted request, on a final output.
            self.engine.admit(stream.request)
        final = self.engine.abort(request_id)
        if stream is not None and final is not None:
            stream.queue.put_nowait(final)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.queue.put_nowait(output)

    def _fail(self, error: BaseException) -> None:
        """A bug in a step: fail every request loudly, never hang them."""
        self.error = error
        dead = EngineDeadError(f"engine loop failed: {error!r}")
        dead.__cause__ = error
        for stream in self._streams.values():
            stream.queue.put_nowait(dead)

    async def _step(self) -> list[RequestOutput]:
        """One step in the worker thread. The engine must not change under a running step, so when
        the loop is cancelled (`stop`) meanwhile, the step finishes and its outputs are delivered
        before the cancellation goes on."""
        step = asyncio.ensure_future(
            asyncio.get_running_loop().run_in_executor(self._worker, self.engine.step)
        )
        try:
            return await asyncio.shield(step)
        except asyncio.CancelledError:
            await asyncio.wait([step])
            if not step.cancelled():
                if step.exception() is not None:
                    self._fail(step.exception())
                else:
                    self._deliver(step.result())
            raise

    async def _run(self) -> None:
        try:
            while True:
                self._apply_pending()
                if not self.engine.has_unfinished():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._deliver(await self._step())
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._fail(e)
            raise
