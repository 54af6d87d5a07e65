"""benchmarks/offload.py's instrumentation on the tiny Mixtral: which layer calls ran prompt tokens,
and the link-capacity stall bound against the real engine's stall."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

from offload import _bound_line, has_prompt_tokens, run  # noqa: E402


def test_a_prompts_last_chunk_is_a_prompt_step(mixtral_checkpoint: Path) -> None:
    """9 prompt tokens at 8 a step: the second step runs the prompt's last token alone, as many
    tokens as the batch has sequences; it was counted with the decode steps."""
    stats = run(
        str(mixtral_checkpoint),
        [list(range(1, 10))],
        3,
        1,
        max_model_len=64,
        max_num_batched_tokens=8,
        expert_cache_ratio=1.0,  # one lookup a layer call: no streaming
    )
    layers = stats["layers"]
    assert stats["prompt_calls"] == [True] * 2 * layers + [False] * 2 * layers


def test_prompt_tokens_are_told_by_the_sequences_not_the_token_count() -> None:
    def seq(computed: int, prompt: int) -> SimpleNamespace:
        return SimpleNamespace(num_computed_tokens=computed, num_prompt_tokens=prompt)

    assert not has_prompt_tokens([seq(9, 9), seq(12, 4)], [1, 1])  # two decodes
    assert has_prompt_tokens([seq(8, 9)], [1])  # a prompt's one-token last chunk
    assert has_prompt_tokens([seq(12, 4), seq(0, 1)], [1, 1])  # a one-token prompt
    assert has_prompt_tokens([seq(4, 4)], [3])  # a preempted sequence recomputing its tokens


def test_the_bound_line_survives_an_lru_run_without_stall() -> None:
    """A ratio whose slots hold the working set (1.0, say) leaves lru on demand 0 s of stall: the
    share divided by it and the benchmark died after its runs."""
    line = _bound_line(1.0, 96, 0.0, 0.0, 0.0)
    assert line.endswith("(0.000 s in decode steps), lru on demand: 0 s")
    assert _bound_line(0.5, 48, 0.25, 0.0, 1.0).endswith("25.0% of lru on demand's stall")


def test_the_real_engine_never_stalls_less_than_its_own_bound(mixtral_checkpoint: Path) -> None:
    """On the emulated link, with the run's own compute times: resident-first and streaming (one
    slot, calls of several experts) included."""
    prompts = [list(range(1, 10)), [5, 6, 7]]
    for flags in ({"expert_cache_size": 1}, {"expert_cache_size": 3, "resident_first": True}):
        probe = run(str(mixtral_checkpoint), prompts, 4, 2, max_model_len=64, **flags)
        link_gbps = probe["expert_bytes"] / 2e-3 / 1e9  # 2 ms a copy
        stats = run(
            str(mixtral_checkpoint), prompts, 4, 2, max_model_len=64, link_gbps=link_gbps, **flags
        )
        assert 0 < stats["stall_bound"] <= stats["stall_seconds"]
        assert stats["decode_stall_s"] <= stats["stall_seconds"]


def test_the_gpu_benchmark_runs_its_systems_on_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """benchmarks/offload_gpu.py waits for a lent GPU: a tiny shape on the CPU checks that it
    builds its checkpoint, prints each system's row, and that no row's outputs differ from the
    all-resident run's."""
    import offload_gpu

    argv = "--device cpu --dtype float32 --layers 2 --hidden 32 --intermediate 64 --heads 2"
    argv += f" --kv-heads 1 --batch-sizes 2 --ratios 0.5 --prompts 2 --new-tokens 3 --workdir {tmp_path}"
    monkeypatch.setattr(sys, "argv", ["offload_gpu.py", *argv.split()])
    offload_gpu.main()
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "ratio" not in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| all resident",
        "| lru on demand",
        "| pregate auto + expertflow + RF",
    ]
    assert "outputs differ" not in out and "no link" in out
