"""The engine: requests in, incremental outputs out, one `step()` at a time.

add_request -> Scheduler.schedule() -> ModelRunner.run() -> sampled tokens -> stop checks,
detokenization -> RequestOutput deltas
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from lowbit.loaders.base import Checkpoint
from lowbit.loaders.default_model import default_model_path
from lowbit.loaders.registry import load_checkpoint
from lowbit.loaders.tokenizer import Tokenizer
from lowbit.runtime.block_manager import BlockManager
from lowbit.runtime.config import EngineConfig
from lowbit.runtime.detokenizer import Detokenizer
from lowbit.runtime.engine_info import EngineInfo
from lowbit.runtime.host_memory import after_step, loading_weights
from lowbit.runtime.kv_cache import KVCacheSpec, allocate_kv_cache, num_blocks_for
from lowbit.runtime.model_runner import ModelRunner
from lowbit.runtime.models.config import ModelConfig
from lowbit.runtime.models.registry import model_class
from lowbit.runtime.outputs import CompletionOutput, RequestOutput
from lowbit.runtime.sampler import SamplerOutput
from lowbit.runtime.sampling_params import SamplingParams
from lowbit.runtime.scheduler import ScheduledSequence, Scheduler, SchedulerConfig, SchedulerOutput
from lowbit.runtime.sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Counters since start, and the state of the queues and the KV pool now."""

    steps: int = 0
    prompt_tokens_computed: int = 0  # prompt tokens that ran through the model (cache misses)
    generated_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_preemptions: int = 0
    prefix_cache_hit_rate: float = 0.0


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]


def lm_head_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """bf16 logits are too coarse (spacing 0.125 at magnitude 20): fp16 is 8x finer. Where the vocab
    projection runs dense on CPU (no compiled ops) fp16 is also 2x faster than bf16; the compiled
    int8 kernel computes in fp32 from either. Elsewhere the compute dtype is fine."""
    return torch.float16 if device.type == "cpu" and dtype == torch.bfloat16 else dtype


class Engine:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint | None = None):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        started = time.perf_counter()
        with loading_weights():
            self._load(config, checkpoint)
        self.load_seconds = time.perf_counter() - started
        self._info = self._describe()
        logger.info(
            "loaded %s in %.1f s: %s on %s, KV cache %s x %d blocks of %d tokens",
            self.checkpoint_source, self.load_seconds, self.dtype, self.device,
            self.kv_spec.dtype, self.kv_spec.num_blocks, self.kv_spec.block_size,
        )  # fmt: skip

    def _load(self, config: EngineConfig, checkpoint: Checkpoint | None) -> None:
        if checkpoint is None:
            checkpoint = load_checkpoint(config.model or default_model_path(), config.quantization)
        self.checkpoint_source = checkpoint.source
        self.model_config: ModelConfig = checkpoint.config
        self.tokenizer: Tokenizer = checkpoint.tokenizer
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        self.max_model_len = self._max_model_len()
        self.model_config = self._rope_for_context(self.model_config)
        self.model = model_class(self.model_config.architecture)(
            self.model_config,
            checkpoint.weights,
            self.device,
            self.dtype,
            lm_head_dtype=lm_head_dtype(self.dtype, self.device),
        )
        self.kv_spec = self._kv_spec()
        capacity = self.kv_spec.num_blocks * self.kv_spec.block_size
        if capacity < self.max_model_len:
            logger.warning(
                "the KV cache holds %d tokens, less than the context length %d: one request can use at "
                "most that many (raise kv_cache_memory to serve the full context)",
                capacity, self.max_model_len,
            )  # fmt: skip
        self.kv_caches = allocate_kv_cache(self.kv_spec, self.device)
        self.block_manager = BlockManager(
            self.kv_spec.num_blocks, self.kv_spec.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len),
            self.block_manager,
        )
        self.runner = ModelRunner(
            self.model, self.kv_caches, self.kv_spec.block_size, self.device, config.seed
        )
        self.requests: dict[str, Request] = {}
        self.counters = EngineStats()

    @property
    def info(self) -> EngineInfo:
        """What this engine is (source, dtypes, context length, vocabulary, KV pool size), fixed at
        load: what front doors and the server read instead of the engine's working parts."""
        return self._info

    def _describe(self) -> EngineInfo:
        spec = self.kv_spec
        return EngineInfo(
            source=self.checkpoint_source,
            architecture=self.model_config.architecture,
            device=self.device,
            dtype=self.dtype,
            kv_cache_dtype=spec.dtype,
            max_model_len=self.max_model_len,
            vocab_size=self.model_config.vocab_size,
            kv_num_blocks=spec.num_blocks,
            kv_block_size=spec.block_size,
            load_seconds=self.load_seconds,
        )

    def _rope_for_context(self, m: ModelConfig) -> ModelConfig:
        """LongRoPE's long factors when this engine's context passes the original one, for every
        position: keys in the cache were rotated once and cannot follow transformers' switch of all
        positions at that length (vLLM makes the same choice). Within it, the short factors: then
        the model computes exactly what transformers computes."""
        s = m.rope_scaling
        if s.kind != "longrope":
            return m
        long = self.max_model_len > s.original_max_position_embeddings
        return replace(m, rope_scaling=replace(s, use_long=long))

    def _max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        asked = self.config.max_model_len or limit
        if asked > limit:
            raise ValueError(f"max_model_len {asked} exceeds the model's context length of {limit}")
        return asked

    def _kv_spec(self) -> KVCacheSpec:
        c, m = self.config, self.model_config
        dtype = c.kv_cache_dtype if c.kv_cache_dtype != "auto" else str(self.dtype).removeprefix("torch.")
        spec = KVCacheSpec(dtype, c.block_size, 1, m.num_layers, m.num_kv_heads, m.head_dim)
        # By default no more than every sequence at full context needs (llama.cpp's n_ctx x
        # n_parallel): a 93 MB model got a 4 GB pool from the free-memory share alone.
        most = c.max_num_seqs * -(-self.max_model_len // c.block_size)
        blocks = c.num_kv_blocks or num_blocks_for(spec, c.kv_cache_memory, self.device, most)
        return spec.with_num_blocks(blocks)

    # ------------------------------------------------------------------ requests

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> None:
        """Queue a request. Raises ValueError for anything that could never be served."""
        self.admit(self.prepare(request_id, prompt, params))

    def prepare(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> Request:
        """Tokenize and validate without touching engine state (safe while a step runs in another
        thread). Raises ValueError for anything that could never be served."""
        params = params or SamplingParams()
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        max_tokens = self._validate(token_ids, params)
        seqs = [
            Sequence(request_id, i, token_ids, params, Detokenizer(self.tokenizer, params), max_tokens)
            for i in range(params.n)
        ]
        for seq in seqs[1:]:
            seq.leader = seqs[0]
        return Request(request_id, text, token_ids, seqs)

    def admit(self, request: Request) -> None:
        """Queue a prepared request."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

    def _validate(self, token_ids: list[int], params: SamplingParams) -> int:
        """The request's effective max_tokens, or a ValueError saying why it cannot run."""
        vocab = self.model_config.vocab_size
        if not token_ids:
            raise ValueError("prompt is empty")
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt has token ids outside the vocabulary of {vocab}")
        params.check_vocab(vocab)
        n, context = len(token_ids), self.max_model_len
        if n >= context:
            raise ValueError(f"prompt is {n} tokens, which leaves no room in the context length of {context}")
        # No max_tokens: run until the context, or a KV pool smaller than the context, is full.
        limit = min(context, self.kv_spec.num_blocks * self.kv_spec.block_size)
        if params.max_tokens is None and n >= limit:
            raise ValueError(f"prompt is {n} tokens, which leaves no room in the KV cache of {limit} tokens")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
        if n + max_tokens > context:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} exceeds the "
                f"context length of {context}"
            )
        needed = self.block_manager.blocks_for(n + max_tokens)
        if needed > self.kv_spec.num_blocks:
            raise ValueError(
                f"prompt + max_tokens needs {needed} KV blocks but the pool has {self.kv_spec.num_blocks}; "
                "raise kv_cache_memory or num_kv_blocks"
            )
        return max_tokens

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks. Returns its final output (finish_reason
        "abort"), so a stream can end on it; None for an unknown or already finished id."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.finished:
                seq.finish("abort")
                self.scheduler.finish(seq)
        return self._output(request)  # every sequence is finished now, so this forgets the request

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """fp32 logits [T, vocab] at every position of `token_ids` (teacher forcing), through the
        same paged cache as generation. Used for perplexity and parity checks."""
        params = SamplingParams(max_tokens=1)
        self._validate(token_ids, params)
        seq = Sequence("score", 0, token_ids, params, Detokenizer(self.tokenizer, params), 1)
        if not self.block_manager.can_grow(seq, len(token_ids)):
            raise ValueError(f"not enough free KV blocks to score {len(token_ids)} tokens now")
        self.block_manager.grow(seq, len(token_ids))
        try:
            batch = SchedulerOutput((ScheduledSequence.of(seq, len(token_ids)),), num_prefills=1)
            return self.runner.compute_logits(batch, all_logits=True)
        finally:
            self.block_manager.free(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        c, blocks = self.counters, self.block_manager
        return EngineStats(
            steps=c.steps,
            prompt_tokens_computed=c.prompt_tokens_computed,
            generated_tokens=c.generated_tokens,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_free_blocks=blocks.num_free_blocks,
            num_blocks=blocks.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_hit_rate=blocks.stats.hit_rate,
        )

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        """Run one batch and return an output for every request it advanced."""
        batch = self.scheduler.schedule()
        if batch.empty:
            return []
        sampled = self.runner.run(batch)
        after_step(batch.num_tokens)
        self._advance(batch, sampled)
        touched = dict.fromkeys(s.seq.request_id for s in batch.scheduled if s.samples)
        return [self._output(self.requests[r]) for r in touched]

    def _advance(self, batch: SchedulerOutput, sampled: SamplerOutput) -> None:
        samplers = [s.seq for s in batch.scheduled if s.samples]
        self.counters.steps += 1
        self.counters.generated_tokens += len(samplers)
        for item in batch.scheduled:
            prompt_end = len(item.seq.prompt_token_ids)
            self.counters.prompt_tokens_computed += max(
                0, min(prompt_end, item.start + item.num_tokens) - item.start
            )
            item.seq.num_computed_tokens += item.num_tokens
            self.block_manager.commit(item.seq)
        for seq, token, logprob in zip(samplers, sampled.token_ids, sampled.logprobs, strict=True):
            seq.append(token)
            if seq.logprobs is not None:
                seq.logprobs.append(logprob)
            self._check_stop(seq, token)
            if seq.finished:
                self.scheduler.finish(seq)

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params = seq.params
        detokenizer = seq.detokenizer
        if token in params.stop_token_ids or (
            token in self.tokenizer.eos_token_ids and not params.ignore_eos
        ):
            detokenizer.flush()
            seq.finish("stop", token)
            return
        stop = detokenizer.add(token)
        if stop is None and (
            len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            stop = detokenizer.flush()
            if stop is None:
                seq.finish("length")
        if stop is not None:
            seq.finish("stop", stop)

    def _output(self, request: Request) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=seq.index,
                text=seq.detokenizer.text,
                token_ids=list(seq.output_token_ids),
                finish_reason=seq.finish_reason,
                delta_text=seq.detokenizer.delta(seq.finished),
                delta_token_ids=seq.take_new_tokens(),
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                stop_reason=seq.stop_reason,
            )
            for seq in request.seqs
        ]
        if all(seq.finished for seq in request.seqs):
            del self.requests[request.request_id]
        cached = request.seqs[0].num_cached_tokens
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outputs, cached)
