"""`Engine.info`: the read-only facts the server, its metrics and the CLI use instead of the
engine's working parts, checked against those parts."""

from __future__ import annotations

import dataclasses

import pytest

from lowbit.runtime.engine import Engine
from lowbit.runtime.engine_info import EngineInfo
from lowbit.server.async_engine import AsyncEngine


def test_info_describes_the_loaded_engine(engine: Engine):
    info = engine.info
    assert isinstance(info, EngineInfo)
    assert info.source == engine.checkpoint_source
    assert info.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert info.architecture == engine.model_config.architecture == "llama"
    assert (info.device, info.dtype) == (engine.device, engine.dtype)
    assert info.kv_cache_dtype == engine.kv_spec.dtype == "bfloat16"  # auto follows the compute dtype
    assert info.max_model_len == engine.max_model_len == 8192
    assert info.vocab_size == engine.model_config.vocab_size == 49152
    assert (info.kv_num_blocks, info.kv_block_size) == (engine.kv_spec.num_blocks, engine.kv_spec.block_size)
    assert info.kv_tokens == engine.block_manager.num_blocks * engine.kv_spec.block_size
    assert info.load_seconds == engine.load_seconds > 0


def test_info_is_read_only_and_built_once(engine: Engine):
    with pytest.raises(dataclasses.FrozenInstanceError):
        engine.info.max_model_len = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        engine.info = engine.info  # type: ignore[misc]
    assert engine.info is engine.info


def test_the_async_engine_serves_the_same_info(engine: Engine):
    assert AsyncEngine(engine).info is engine.info


def test_the_default_pool_holds_every_sequence_at_full_context_and_no_more():
    """Without kv_cache_memory the pool is max_num_seqs x max_model_len tokens (within the
    free-memory share), as llama.cpp's n_ctx x n_parallel: not a fixed share of the host."""
    from lowbit.runtime.config import EngineConfig

    engine = Engine(EngineConfig(max_num_seqs=3, max_model_len=200))
    block = engine.kv_spec.block_size
    assert engine.kv_spec.num_blocks == 3 * -(-200 // block)
    assert engine.info.kv_tokens >= 3 * 200
