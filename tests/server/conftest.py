"""The real default model behind `AsyncEngine`, loaded once per test session.

Two engines: the default bf16 mode, and fp32 for tests that compare concurrent requests with
one-at-a-time references. In bf16 a request's greedy tokens can depend on what else is in its
batch (the packed CPU kernels round differently at other batch shapes; measured: one of eight
prompts diverges within 16 tokens), which is numerics, not cross-talk; fp32 is batch-invariant.
"""

from __future__ import annotations

import pytest

from lowbit.runtime.config import EngineConfig
from lowbit.runtime.engine import Engine

KV_MEMORY = 64 << 20


@pytest.fixture(scope="session")
def _bf16_engine() -> Engine:
    return Engine(EngineConfig(kv_cache_memory=KV_MEMORY, max_num_seqs=16))


@pytest.fixture(scope="session")
def _fp32_engine() -> Engine:
    return Engine(EngineConfig(dtype="float32", kv_cache_memory=KV_MEMORY, max_num_seqs=16))


def _reset(engine: Engine) -> None:
    """A failed test must not take the others down with it: drop whatever it left behind. (Each
    test asserts on its own that it left the engine idle; this only stops the cascade.)"""
    for request_id in list(engine.requests):
        engine.abort(request_id)
    for seq in [*engine.scheduler.running, *engine.scheduler.waiting]:
        seq.finish("abort")
        engine.scheduler.finish(seq)


@pytest.fixture
def engine(_bf16_engine) -> Engine:
    yield _bf16_engine
    _reset(_bf16_engine)


@pytest.fixture
def exact_engine(_fp32_engine) -> Engine:
    yield _fp32_engine
    _reset(_fp32_engine)


# Each server test module declares its own `server` fixture (the configuration it needs); these
# clients resolve it from the requesting module.
@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with server.http() as h:
        yield h
