"""`AsyncEngine`: the engine loop as an asyncio background task, for servers.

Steps run in a worker thread (`asyncio.to_thread`) so the event loop keeps serving while the model
computes. The engine is only mutated between steps, on the event loop: new requests and aborts
queue up and are applied before the next step starts. Each request's outputs flow through its
own queue to the `generate` iterator; leaving that iterator early (client gone, task cancelled)
aborts the request and frees its KV blocks. At most `max_pending` requests are in flight; more
callers wait for a slot (backpressure) instead of growing the queue without bound.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

from lowbit.runtime.engine import Engine, Request
from lowbit.runtime.outputs import RequestOutput
from lowbit.runtime.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop failed; every request in flight gets this."""


class AsyncEngine:
    def __init__(self, engine: Engine, max_pending: int = 256):
        self.engine = engine
        self.slots = asyncio.Semaphore(max_pending)
        self._to_admit: list[Request] = []
        self._to_abort: list[str] = []
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._ids = itertools.count()
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="lowbit-engine")

    async def stop(self) -> None:
        """Abort everything in flight and stop the loop."""
        for request_id in list(self._streams):
            self.abort(request_id)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        self._apply_pending()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ requests

    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that advances it, the last one finished.
        Raises ValueError at once for a request that can never be served."""
        if self.error is not None:
            raise EngineDeadError(f"engine loop failed earlier: {self.error!r}")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.engine.prepare(request_id, prompt, params)  # validation errors surface here
        self.start()
        async with self.slots:
            queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
            self._streams[request_id] = queue
            self._to_admit.append(request)
            self._wake.set()
            finished = False
            try:
                while not finished:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    finished = item.finished
                    yield item
            finally:
                if not finished:
                    self.abort(request_id)
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Stop a request before its next step; its KV blocks are freed."""
        self._to_abort.append(request_id)
        self._wake.set()

    # ------------------------------------------------------------------ the loop

    def _apply_pending(self) -> None:
        admit, self._to_admit = self._to_admit, []
        abort, self._to_abort = self._to_abort, []
        aborted = set(abort)
        for request in admit:
            if request.request_id not in aborted:
                self.engine.admit(request)
        for request_id in abort:
            self.engine.abort(request_id)

    async def _run(self) -> None:
        try:
            while True:
                self._apply_pending()
                if not self.engine.has_unfinished():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                for output in await asyncio.to_thread(self.engine.step):
                    queue = self._streams.get(output.request_id)
                    if queue is not None:
                        queue.put_nowait(output)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in a step: fail every request loudly, never hang them
            self.error = e
            dead = EngineDeadError(f"engine loop failed: {e!r}")
            dead.__cause__ = e
            for queue in self._streams.values():
                queue.put_nowait(dead)
            raise
