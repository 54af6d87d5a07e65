"""The engine core: requests in, one `step()` = schedule, execute, append tokens, report outputs."""

from __future__ import annotations

import logging
import time

import torch

from engine.config import EngineConfig
from engine.detokenizer import Detokenizer
from engine.guided import GrammarCompiler, Guide
from engine.kv_cache import KVCache, local_kv_blocks, num_kv_blocks
from engine.loader import load_model
from engine.memory import fit_expert_cache, memory_probe, provisional
from engine.metrics import EngineMetrics
from engine.model_config import ModelConfig, generation_eos_ids
from engine.offload.runtime import OffloadRuntime
from engine.outputs import RequestOutput, RequestTiming
from engine.routes import RouteTracker
from engine.runner import ModelRunner, context_windows
from engine.sampler import NO_TOKEN_ALLOWED
from engine.sampling import RequestError, SamplingParams, checked_max_tokens
from engine.sequence import Request, Sequence
from engine.settle import context_length, settled
from engine.tokenizer import load_tokenizer
from scheduler.batching import BatchingConfig, Scheduler
from scheduler.block_pools import WindowedBlocks, block_pools
from scheduler.step_selector import StepSelector

logger = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """A step failed; the requests it carried were aborted, every other request carries on."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"engine step failed: {cause!r}")
        self.request_ids = request_ids


class LLMEngine:
    def __init__(self, config: EngineConfig, model_name: str | None = None) -> None:
        self.model_config = mc = ModelConfig.from_pretrained(config.model)
        self.config = config = settled(mc, config)
        self.device = torch.device(config.device)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.max_model_len = context_length(mc, config)
        quantize = None if config.expert_quantization == "none" else config.expert_quantization
        model, host_experts = load_model(
            config.model, mc, config.torch_dtype, self.device, config.fp8_experts, quantize
        )
        self.model = model
        probe = memory_probe(config)  # on CUDA with no cache size given: one layer's slots first
        start = config if probe is None else provisional(config, mc.num_experts)
        self.offload = OffloadRuntime(start, host_experts, model, self.device)
        num_blocks = num_kv_blocks(mc, config, self.max_model_len)
        local_blocks = local_kv_blocks(mc, config, num_blocks, self.max_model_len)
        self.kv = KVCache.for_model(mc, config, num_blocks, local_blocks, self.device)
        self.routes = RouteTracker(mc.moe_layers, mc.num_experts, mc.top_k)
        self.runner = ModelRunner(
            model,
            self.offload.experts,
            self.offload.prefetcher,
            self.routes,
            self.kv,
            self.device,
            config.seed,
            config.max_num_seqs,
            config.max_num_seqs if config.enable_prefix_caching else 0,
        )
        states = self.runner.states  # linear attention resumes only where its state was kept
        self.blocks = block_pools(
            num_blocks,
            local_blocks,
            config,
            mc.local_attention,
            resumable=states.has if states is not None else None,
        )
        selector = None
        if config.step_group_size is not None:
            selector = StepSelector(
                config.token_scheduler,
                config.step_group_size,
                config.max_defer_steps,
                self._routes_for,
            )
        self.scheduler = Scheduler(
            BatchingConfig(config.max_num_seqs, config.max_num_batched_tokens),
            self.blocks,
            selector,
        )
        eos = set(mc.eos_token_ids) | set(generation_eos_ids(config.model))
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.detokenizer = Detokenizer(self.tokenizer, tuple(sorted(eos)), self.max_model_len)
        self.grammars = GrammarCompiler(self.tokenizer, mc.vocab_size, tuple(sorted(eos)))
        if probe is not None:
            self.config = config = fit_expert_cache(self, probe)
        self.offload.log_summary()
        self.metrics = EngineMetrics(model_name or config.model)
        self.metrics.record_offload(self.offload.stats(), None)
        self.requests: dict[str, Request] = {}
        logger.info(
            "engine ready: %d KV blocks of %d tokens (%s), max_model_len=%d",
            num_blocks,
            config.block_size,
            str(self.kv.cache_dtype).removeprefix("torch."),
            self.max_model_len,
        )

    def block_tables(self, seq_ids: list[int]) -> tuple[list[list[int]], list[list[int]] | None]:
        """Each sequence's KV blocks, and its local layers' own where they have a pool."""
        tables = [self.blocks.table(i) for i in seq_ids]
        if not isinstance(self.blocks, WindowedBlocks):
            return tables, None
        return tables, [self.blocks.local_table(i) for i in seq_ids]

    def _routes_for(self, seq_ids: list[int]) -> torch.Tensor:
        """Next-token routes of running sequences, for the token scheduler: bool [N, L, E]."""
        by_id = {s.seq_id: s for s in self.scheduler.running}
        seqs = [by_id[i] for i in seq_ids]
        prefetcher = self.offload.prefetcher
        predictor = prefetcher.predictor if prefetcher is not None else None
        window = predictor.context_window if predictor is not None else 0
        last = torch.tensor([s.token_ids[-1] for s in seqs], device=self.device)
        context = context_windows(seqs, [s.num_tokens - 1 for s in seqs], [1] * len(seqs), window)
        return self.routes.routes(seq_ids, predictor, last, context.to(self.device))

    # ---- requests -------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        fit_to_context: bool = False,
    ) -> Request:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running", param="request_id")
        vocab, context = self.model_config.vocab_size, self.max_model_len
        max_tokens = checked_max_tokens(prompt_token_ids, params, vocab, context, fit_to_context)
        num_prompt = len(prompt_token_ids)
        eos = () if params.ignore_eos else tuple(self.detokenizer.eos_token_ids)
        stop_ids = frozenset({*eos, *params.stop_token_ids})
        guides: list[Guide | None] = [None] * params.n
        if params.guided is not None:  # compiled here, so a bad schema is refused up front
            guides = [self.grammars.guide(params.guided) for _ in range(params.n)]
        seqs = [
            Sequence(
                request_id=request_id,
                index=i,
                token_ids=list(prompt_token_ids),
                num_prompt_tokens=num_prompt,
                params=params,
                max_tokens=max_tokens,
                generator=None
                if params.seed is None
                else torch.Generator().manual_seed(params.seed + i),
                guide=guides[i],
                stop_token_ids=stop_ids,
            )
            for i in range(params.n)
        ]
        for seq in seqs[1:]:  # they take the prompt's blocks from the first, once it has them
            seq.prompt_sibling = seqs[0]
        request = Request(
            request_id, list(prompt_token_ids), params, seqs, RequestTiming(time.monotonic())
        )
        self.requests[request_id] = request
        for seq in seqs:
            self.scheduler.add(seq)
        return request

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
            self.runner.forget(seq.seq_id)
        self._finish(request, time.monotonic())
        self._record_step(0, 0)
        return request.to_output()

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        now = time.monotonic()
        new_prompt_tokens, queued = 0, []
        for seq in batch.seqs:
            timing = self.requests[seq.request_id].timing
            if timing.first_scheduled_s is None:
                timing.first_scheduled_s = now
                new_prompt_tokens += seq.num_prompt_tokens
                queued.append(now - timing.arrival_s)
        self.metrics.record_schedule(len(batch.preempted), queued)
        for seq in batch.preempted:  # recomputed from position 0: linear states start afresh
            self.runner.release_state(seq.seq_id)
        if not batch.seqs:
            return []
        for seq, cached in batch.admitted:
            if self.blocks.prefix_caching and seq.prefix_cacheable:  # it looked
                self.metrics.record_prefix_cache(seq.num_tokens, cached)
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = min(cached, seq.num_prompt_tokens)
        tables, local_tables = self.block_tables([s.seq_id for s in batch.seqs])
        try:
            if self.runner.states is not None:  # linear state at a cached prefix's end
                for seq, cached in batch.admitted:
                    if cached:
                        name = self.blocks.name_of_prefix(seq.seq_id, cached)
                        self.runner.states.resume(seq.seq_id, name)
            result = self.runner.execute(batch.seqs, batch.num_new_tokens, tables, local_tables)
        except Exception as exc:
            ids = sorted({s.request_id for s in batch.seqs})
            logger.exception("step failed; aborting %d requests", len(ids))
            for request_id in ids:
                self.abort(request_id)
            raise EngineStepError(ids, exc) from exc
        states = self.runner.states if self.blocks.prefix_caching else None  # kept at boundaries
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            self.blocks.computed(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            done = seq.num_computed_tokens
            if states is not None and done % self.blocks.block_size == 0:
                name = self.blocks.name_of_prefix(seq.seq_id, done)
                states.keep(seq.seq_id, name, shared=done in self.blocks.divergence(seq.seq_id))
        for seq, first, scores in result.prompt_logprobs:
            entries = self.requests[seq.request_id].prompt_logprobs
            assert entries is not None
            for position, score in enumerate(scores, start=first):
                entries[position] = self.detokenizer.token_logprob(seq.token_ids[position], score)
        now = time.monotonic()
        changed: dict[str, Request] = {}
        blocked = {seq.request_id for seq in result.blocked}
        for seq, token, logprob in zip(result.sampled, result.tokens, result.logprobs, strict=True):
            if seq.request_id in blocked:
                continue
            self.detokenizer.append(seq, token, logprob)
            request = changed[seq.request_id] = self.requests[seq.request_id]
            if request.timing.first_token_s is None:
                request.timing.first_token_s = now
                self.metrics.record_first_token(request.timing)
            request.timing.last_token_s = now
            if seq.finished:
                self.scheduler.finish(seq)
                self.runner.forget(seq.seq_id)
        outputs = []
        for request in changed.values():
            if request.finished:
                self.requests.pop(request.request_id)
                self._finish(request, now)
            outputs.append(request.to_output())
        for request_id in sorted(blocked):  # the request's own fault: the others carry on
            output = self.abort(request_id)
            assert output is not None
            output.error = NO_TOKEN_ALLOWED
            outputs.append(output)
        # a blocked choice's siblings' tokens of this step go with their request
        kept = sum(seq.request_id not in blocked for seq in result.sampled)
        self._record_step(new_prompt_tokens, kept)
        self.metrics.record_offload(
            self.offload.stats(), self.offload.experts.activated_per_step[-1]
        )
        return outputs

    def _record_step(self, new_prompt_tokens: int, new_generation_tokens: int) -> None:
        stats = self.stats()
        self.metrics.record_step(
            int(stats["num_running"]),
            int(stats["num_waiting"]),
            stats["kv_usage"],
            new_prompt_tokens,
            new_generation_tokens,
        )

    def _finish(self, request: Request, now: float) -> None:
        request.timing.finished_s = now
        longest = max(len(s.output_token_ids) for s in request.seqs)
        self.metrics.record_finished(
            request.timing, request.seqs[0].finish_reason or "abort", longest
        )

    def stats(self) -> dict[str, float]:
        running = {s.request_id for s in self.scheduler.running}
        return {
            "num_running": len(running),
            "num_waiting": len(self.requests) - len(running),
            "kv_usage": self.blocks.usage,
            "kv_blocks_used": self.blocks.num_used,
            "kv_blocks_total": self.blocks.num_blocks,
        }
