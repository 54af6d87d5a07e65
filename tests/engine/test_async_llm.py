"""engine/async_llm.py: concurrent streams, aborts that free KV, refusals, parity with LLM, metrics."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine import LLM, AsyncLLM, EngineConfig, RequestError, RequestOutput, SamplingParams
from engine.sampling import GuidedDecoding

if TYPE_CHECKING:
    from tests.conftest import Preemptions

MAX_MODEL_LEN = 64
KV_BLOCKS = 12  # 192 tokens of KV for 32 requests of up to 46 tokens: admission waits, preemption
_ids = itertools.count()
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
    """asyncio.run with a deadline, so a stream that never ends fails the test instead of hanging."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


@pytest.fixture(scope="module")
def engine(mixtral_checkpoint: Path) -> Iterator[AsyncLLM]:
    config = EngineConfig(
        model=str(mixtral_checkpoint), max_model_len=MAX_MODEL_LEN, kv_cache_blocks=KV_BLOCKS
    )
    llm = AsyncLLM(config, model_name="tiny")
    yield llm
    llm.shutdown()


def prompt(i: int) -> list[int]:
    """Prompts of 3..32 tokens, distinct per i."""
    return [1] + [(7 * i + 13 * j) % 370 + 10 for j in range(2 + (i * 5) % 30)]


async def collect(
    engine: AsyncLLM, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
) -> list[RequestOutput]:
    request_id = request_id or f"req-{next(_ids)}"
    return [out async for out in engine.generate(prompt_ids, params, request_id)]


async def settle(engine: AsyncLLM, timeout_s: float = 10.0) -> None:
    """Let the engine thread process pending aborts (and the event loop close abandoned streams)."""
    deadline = time.monotonic() + timeout_s
    while engine.stats()["num_running"] or engine.stats()["kv_blocks_used"]:
        assert time.monotonic() < deadline, f"engine did not settle: {engine.stats()}"
        await asyncio.sleep(0.01)


def metric_samples(engine: AsyncLLM) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(engine.metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(engine: AsyncLLM, name: str, **labels: str) -> float:
    key = (name, tuple(sorted({"model_name": "tiny", **labels}.items())))
    return metric_samples(engine).get(key, 0.0)


def check_stream(outs: list[RequestOutput]) -> None:
    assert outs and outs[-1].finished and not any(o.finished for o in outs[:-1])
    for earlier, later in itertools.pairwise(outs):  # cumulative outputs
        for a, b in zip(earlier.outputs, later.outputs, strict=True):
            assert b.token_ids[: len(a.token_ids)] == a.token_ids
            assert b.text.startswith(a.text)


def test_concurrent_requests_all_finish(engine: AsyncLLM) -> None:
    def params(i: int) -> SamplingParams:
        if i % 3 == 0:
            return SamplingParams(temperature=0.0, max_tokens=8 + i % 9)
        return SamplingParams(temperature=1.0, seed=i, max_tokens=8 + i % 9, stop=["\n"])

    peak = {"num_waiting": 0.0, "kv_blocks_used": 0.0}

    async def monitor() -> None:
        while True:
            stats = engine.stats()
            for key in peak:
                peak[key] = max(peak[key], stats[key])
            await asyncio.sleep(0.002)

    async def main() -> list[list[RequestOutput]]:
        watcher = asyncio.create_task(monitor())
        results = await asyncio.gather(*(collect(engine, prompt(i), params(i)) for i in range(32)))
        watcher.cancel()
        await settle(engine)
        return results

    results = run(main())
    assert peak["num_waiting"] > 0 and peak["kv_blocks_used"] > KV_BLOCKS // 2  # under pressure
    for i, outs in enumerate(results):
        check_stream(outs)
        final = outs[-1].outputs[0]
        assert final.finish_reason in ("stop", "length")
        assert 1 <= len(final.token_ids) <= 8 + i % 9
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0
    assert stats["num_waiting"] == 0


def test_aborted_requests_free_their_kv_blocks(engine: AsyncLLM) -> None:
    long = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)

    async def leave_after_first(i: int) -> RequestOutput:
        async for first in engine.generate(prompt(i), long, f"leave-{i}"):  # noqa: B007
            break  # the client goes away: closing the stream aborts the request
        return first

    async def abort_after_first(i: int) -> list[RequestOutput]:
        outs = []
        async for out in engine.generate(prompt(i), long, f"abort-{i}"):
            outs.append(out)
            if len(outs) == 1:
                await engine.abort(f"abort-{i}")
        return outs

    async def main() -> tuple[list[RequestOutput], list[list[RequestOutput]], list[RequestOutput]]:
        left = await asyncio.gather(*(leave_after_first(i) for i in range(4)))
        aborted = await asyncio.gather(*(abort_after_first(i) for i in range(4, 8)))
        await settle(engine)
        after = await collect(engine, prompt(9), SamplingParams(temperature=0.0, max_tokens=5))
        return left, aborted, after

    before = metric(engine, "expertflow_request_success_total", finished_reason="abort")
    left, aborted, after = run(main())
    assert all(not out.finished and len(out.outputs[0].token_ids) < 30 for out in left)
    for outs in aborted:  # the aborting client's stream ends with a final "abort" output
        final = outs[-1].outputs[0]
        assert outs[-1].finished and final.finish_reason == "abort" and len(final.token_ids) < 30
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0
    assert metric(engine, "expertflow_request_success_total", finished_reason="abort") == before + 8
    assert len(after[-1].outputs[0].token_ids) == 5  # still serving


def test_refused_request_raises_and_engine_keeps_serving(engine: AsyncLLM) -> None:
    async def main() -> tuple[RequestError, RequestError, list[RequestOutput]]:
        with pytest.raises(RequestError) as too_long:
            await collect(engine, list(range(10, 60)), SamplingParams(max_tokens=20))
        with pytest.raises(RequestError) as bad_token:
            await collect(engine, [5, 10**6], SamplingParams(max_tokens=2))
        ok = await collect(engine, prompt(3), SamplingParams(temperature=0.0, max_tokens=6))
        return too_long.value, bad_token.value, ok

    too_long, bad_token, ok = run(main())
    assert str(MAX_MODEL_LEN) in str(too_long) and "70" in str(too_long)
    assert too_long.code == "context_length_exceeded" and bad_token.param == "prompt"
    assert ok[-1].finished and len(ok[-1].outputs[0].token_ids) == 6


def test_greedy_outputs_equal_offline_llm(engine: AsyncLLM, mixtral_checkpoint: Path) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [prompt(i) for i in range(8)]
    offline = LLM(model=str(mixtral_checkpoint), max_model_len=MAX_MODEL_LEN)
    expected = [(o.token_ids, o.text) for o in offline.generate(prompts, params)]

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(engine, p, params) for p in prompts))

    got = [(outs[-1].outputs[0].token_ids, outs[-1].outputs[0].text) for outs in run(main())]
    assert got == expected


def test_metrics_count_requests_and_tokens(engine: AsyncLLM) -> None:
    names = [
        "expertflow_prompt_tokens_total",
        "expertflow_generation_tokens_total",
        "expertflow_time_to_first_token_seconds_count",
        "expertflow_e2e_request_latency_seconds_count",
        "expertflow_request_queue_time_seconds_count",
    ]
    before: dict[str, float] = {n: metric(engine, n) for n in names}
    length_before = metric(engine, "expertflow_request_success_total", finished_reason="length")
    prompts = [prompt(i) for i in range(5)]

    async def main() -> list[list[RequestOutput]]:
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        return await asyncio.gather(*(collect(engine, p, params) for p in prompts))

    results = run(main())

    def delta(name: str) -> float:
        return metric(engine, name) - before[name]

    assert delta("expertflow_prompt_tokens_total") == sum(len(p) for p in prompts)
    assert delta("expertflow_generation_tokens_total") == sum(
        len(r[-1].outputs[0].token_ids) for r in results
    )
    assert delta("expertflow_time_to_first_token_seconds_count") == 5
    assert delta("expertflow_e2e_request_latency_seconds_count") == 5
    assert delta("expertflow_request_queue_time_seconds_count") == 5
    assert (
        metric(engine, "expertflow_request_success_total", finished_reason="length")
        == length_before + 5
    )
    assert metric(engine, "expertflow_num_requests_running") == 0
    assert metric(engine, "expertflow_kv_cache_usage_ratio") == 0
    text = generate_latest(engine.metrics.registry).decode()
    assert 'expertflow_request_success_total{finished_reason="length",model_name="tiny"}' in text


def test_preemptions_are_counted(
    mixtral_checkpoint: Path, preemptions: Callable[[LLM], Preemptions]
) -> None:
    llm = LLM(model=str(mixtral_checkpoint), max_model_len=MAX_MODEL_LEN, kv_cache_blocks=4)
    watched = preemptions(llm)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    llm.generate([prompt(i) for i in range(6)], params)
    text = generate_latest(llm.engine.metrics.registry).decode()
    counted = next(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "expertflow_num_preemptions_total"
    )
    assert watched.count > 0 and counted == watched.count


def test_a_shutdown_while_a_grammar_compiles_fails_the_request(
    mixtral_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request reaches the engine's inbox after its thread has gone: it fails, not hangs."""
    config = EngineConfig(model=str(mixtral_checkpoint), max_model_len=MAX_MODEL_LEN)
    llm = AsyncLLM(config, model_name="tiny")
    monkeypatch.setattr(llm.engine.grammars, "compile", lambda guided: llm.shutdown())
    params = SamplingParams(max_tokens=3, guided=GuidedDecoding(regex="[ab]+"))
    with pytest.raises(RuntimeError, match="shut down"):
        run(collect(llm, prompt(1), params), timeout_s=10)


def test_shutdown_returns_and_refuses_new_requests(mixtral_checkpoint: Path) -> None:
    config = EngineConfig(model=str(mixtral_checkpoint), max_model_len=MAX_MODEL_LEN)
    llm = AsyncLLM(config, model_name="tiny")
    params = SamplingParams(temperature=0.0, max_tokens=3)
    assert len(run(collect(llm, prompt(1), params))[-1].outputs[0].token_ids) == 3
    started = time.monotonic()
    llm.shutdown()
    assert time.monotonic() - started < 5
    assert not llm.engine.offload.transfers._link._thread.is_alive()  # the link stopped too
    llm.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        run(collect(llm, prompt(1), params))
