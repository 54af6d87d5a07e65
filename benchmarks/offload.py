"""Offloading benchmark on the demo model: hit rate, transfers, stall and tokens/s per policy/predictor.

The emulated link is set from the measured per-layer compute time T_l, in two regimes: one expert's
copy takes ~1x T_l (fine-grained experts over a 64 GB/s link, EF-25's setting) or ~20x T_l
(Mixtral-8x7B's 336 MiB experts over PCIe 4.0 at batch 1). Every system decodes the same held-out
prompts; misses are compared with Belady's optimum on the routing sequence actually looked up, and
stall with the least the link's capacity allows (`stall_bound.py`): given the run's own compute
times, and given the all-resident run's (a system with no host overhead).

    python benchmarks/offload.py --batch-sizes 1 8 --ratios 0.25 0.5
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from belady import belady_misses  # noqa: E402
from stall_bound import stall_lower_bound, stall_lower_bound_of  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.config import DEFAULT_MODEL  # noqa: E402
from engine.offload.cache import ExpertCache  # noqa: E402
from engine.runner import ModelRunner  # noqa: E402
from engine.sequence import Sequence  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# tokens traced to train the predictors: the RPP's held-out recall@2 one layer ahead rose from 0.853
# on 60k tokens to 0.892 on 400k (session 18); tracing takes ~20 s, training the hybrid ~9 min
TRACE_TOKENS = 400_000


@functools.cache
def demo_corpus():  # noqa: ANN201
    """The demo model's corpus split (train / held-out documents), from scripts/demo_data.py."""
    path = ROOT / "scripts" / "demo_data.py"
    spec = importlib.util.spec_from_file_location("demo_data", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["demo_data"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.build_corpus(module.TrainConfig())


def heldout_prompts(tokenizer, count: int, length: int) -> list[list[int]]:  # noqa: ANN001
    """The leading tokens of documents the demo model never trained on."""
    encoded = (tokenizer.encode(d) for d in demo_corpus().heldout)
    return [ids[:length] for ids in encoded if len(ids) >= length][:count]


def trained_predictor(model: str, kind: str, workdir: Path) -> Path:
    """Trace the training split and train an rpp/hybrid predictor once; cached under `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    out, traces = workdir / f"{kind}.safetensors", workdir / "traces.safetensors"
    corpus_dir = workdir / "corpus"  # one file per training document: traces split by document
    if not corpus_dir.exists():
        corpus_dir.mkdir()
        for i, doc in enumerate(demo_corpus().train):
            (corpus_dir / f"doc{i:04d}.txt").write_text(doc)
    corpus = sorted(str(p) for p in corpus_dir.glob("*.txt"))
    trace = ["trace", "--model", model, "--corpus", *corpus, "--max-tokens", str(TRACE_TOKENS)]
    train = ["train-predictor", "--kind", kind, "--model", model]
    if not traces.exists():
        _cli(*trace, "--out", str(traces))
    if not out.exists():
        _cli(*train, "--traces", str(traces), "--out", str(out))
    return out


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "server.cli", *args], check=True, cwd=ROOT)


def run(model: str, prompts: list[list[int]], new_tokens: int, batch: int, **flags: object) -> dict:
    llm = LLM(model=model, max_num_seqs=batch, **flags)
    lookups: list[tuple[int, list[int]]] = []
    clock: list[tuple[float, float]] = []  # (time, stall so far) at each lookup
    prompt_calls: list[bool] = []  # whether each lookup's layer call ran prompt tokens
    acquire, execute = ExpertCache.acquire, ModelRunner.execute
    prompt_step = False

    def recording(self: ExpertCache, layer: int, experts: list[int]):  # noqa: ANN202
        lookups.append((layer, list(experts)))
        clock.append((time.perf_counter(), self.transfers.resolve_stalls()))
        prompt_calls.append(prompt_step)
        return acquire(self, layer, experts)

    def executing(self: ModelRunner, seqs: list[Sequence], num_new: list[int], *args, **kw):  # noqa: ANN002, ANN003, ANN202
        nonlocal prompt_step
        prompt_step = has_prompt_tokens(seqs, num_new)
        return execute(self, seqs, num_new, *args, **kw)

    ExpertCache.acquire = recording  # type: ignore[method-assign]
    ModelRunner.execute = executing  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        outs = llm.generate(
            prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        )
        clock.append((time.perf_counter(), llm.engine.offload.cache.transfers.resolve_stalls()))
        elapsed = clock[-1][0] - start
    finally:
        ExpertCache.acquire, ModelRunner.execute = acquire, execute  # type: ignore[method-assign]
    stats = llm.offload_stats()
    cache = llm.engine.offload.cache
    stats["belady_misses"] = belady_misses(lookups, cache.num_slots, cache.warm_keys)
    stats["tokens_per_s"] = sum(len(o.token_ids) for o in outs) / elapsed
    stats["steps"] = len(llm.engine.offload.experts.activated_per_step)
    stats["layers"] = len(cache.store.layers)
    stats["expert_bytes"] = cache.store.expert_bytes
    stats["elapsed_s"] = elapsed
    stats["outputs"] = [o.token_ids for o in outs]
    stats["lookups"] = lookups
    # each layer call's compute up to the next one, its stall taken out
    stats["compute_s"] = [(t1 - t0) - (s1 - s0) for (t0, s0), (t1, s1) in itertools.pairwise(clock)]
    stats["prompt_calls"] = prompt_calls
    stats["decode_stall_s"] = sum(
        s1 - s0
        for ((_, s0), (_, s1)), prompt in zip(itertools.pairwise(clock), prompt_calls, strict=True)
        if not prompt
    )
    link = flags.get("link_gbps")
    stats["stall_bound"] = (
        stall_lower_bound(
            lookups, stats["compute_s"], cache.num_slots, cache.store.expert_bytes / link / 1e9
        )
        if isinstance(link, float)
        else 0.0
    )
    llm.engine.offload.close()
    return stats


def has_prompt_tokens(seqs: list[Sequence], num_new: list[int]) -> bool:
    """Whether a step runs prompt tokens: a decode runs one token of a sequence whose prompt is
    computed. Not a count of tokens: a prompt's last chunk (or a short prompt) may run no more
    tokens than the batch has sequences, and a preempted sequence recomputes its own."""
    return any(
        n > 1 or s.num_computed_tokens < s.num_prompt_tokens
        for s, n in zip(seqs, num_new, strict=True)
    )


def systems(ratio: float, rpp: Path | None, hybrid: Path | None) -> list[tuple[str, dict]]:
    rows = [
        ("lru on demand", {"cache_policy": "lru"}),
        ("lfu on demand", {"cache_policy": "lfu"}),
        (
            "pregate S=1 + lru",
            {"cache_policy": "lru", "predictor": "pregate", "prefetch_horizon": "1"},
        ),
        (
            "pregate auto + expertflow + RF",
            {"cache_policy": "expertflow", "predictor": "pregate", "resident_first": True},
        ),
    ]
    if hybrid:
        rows.append(
            (
                "hybrid auto + expertflow + RF",
                {
                    "cache_policy": "expertflow",
                    "predictor": "hybrid",
                    "predictor_path": str(hybrid),
                    "resident_first": True,
                },
            )
        )
    if rpp:
        rows.append(
            (
                "rpp auto + expertflow + RF",
                {
                    "cache_policy": "expertflow",
                    "predictor": "rpp",
                    "predictor_path": str(rpp),
                    "resident_first": True,
                },
            )
        )
    return [(name, {"expert_cache_ratio": ratio, **flags}) for name, flags in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument(
        "--regimes",
        type=float,
        nargs="+",
        default=[1.0, 20.0],
        help="one expert's copy time in units of one layer's compute time",
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument(
        "--predictors",
        choices=("none", "trained"),
        default="trained",
        help="also run rpp and hybrid (traces + trains them once under runs/)",
    )
    args = parser.parse_args()
    # One core computes, the other is the link's thread, as a GPU's copy engine takes none of
    # its compute: with torch's two threads the link's wake-ups stalled their barriers and an
    # offloaded layer took 2-2.5x the all-resident one, so a 1x link behaved as a 0.4x one.
    torch.set_num_threads(1)
    llm = LLM(model=args.model)
    prompts = heldout_prompts(llm.tokenizer, args.prompts, args.prompt_len)
    del llm
    rpp = hybrid = None
    if args.predictors == "trained":
        workdir = ROOT / "runs" / "predictors"
        rpp, hybrid = (
            trained_predictor(args.model, "rpp", workdir),
            trained_predictor(args.model, "hybrid", workdir),
        )
    print(f"command: {' '.join(sys.argv)}")
    header = (
        "| system | ratio | hit rate | misses | Belady | transfers | MiB moved | stall s | in decode "
        "| stall bound | tok/s | recall | S |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for batch in args.batch_sizes:
        # T_l from the fastest of three all-resident runs: a transient load on the machine while
        # calibrating would make every "1x" link a slower one.
        base = min(
            (
                run(args.model, prompts, args.new_tokens, batch, expert_cache_ratio=1.0)
                for _ in range(3)
            ),
            key=lambda s: s["elapsed_s"],
        )
        layer_s = base["elapsed_s"] / base["steps"] / base["layers"]
        for regime in args.regimes:
            gbps = base["expert_bytes"] / (regime * layer_s) / 1e9
            print(
                f"\n### batch {batch}, copy = {regime:g}x layer time "
                f"(T_l = {layer_s * 1e3:.2f} ms, expert = {base['expert_bytes'] / 2**10:.0f} KiB, "
                f"link = {gbps:.3f} GB/s)\n"
            )
            print(header)
            print(_row("all resident", 1.0, base))
            streaming = run(
                args.model, prompts, args.new_tokens, batch, expert_cache_size=1, link_gbps=gbps
            )
            held = streaming["expert_cache_slots"] * streaming["expert_bytes"]  # the store's bytes
            print(_row("streaming (1 slot)", held / streaming["total_expert_bytes"], streaming))
            baselines = []
            for ratio in args.ratios:
                for name, flags in systems(ratio, rpp, hybrid):
                    stats = run(
                        args.model, prompts, args.new_tokens, batch, link_gbps=gbps, **flags
                    )
                    print(_row(name, ratio, stats), flush=True)
                    if name == "lru on demand":
                        baselines.append((ratio, stats))
            copy_s, decode = regime * layer_s, [not p for p in base["prompt_calls"]]
            for ratio, lru in baselines:  # the same lookups: outputs never depend on the cache
                slots, calls, compute = (
                    lru["expert_cache_slots"],
                    base["lookups"],
                    base["compute_s"],
                )
                bound = stall_lower_bound(calls, compute, slots, copy_s)
                in_decode = stall_lower_bound_of(calls, compute, decode, slots, copy_s)
                print(f"\n{_bound_line(ratio, slots, bound, in_decode, lru['stall_seconds'])}")


def _bound_line(ratio: float, slots: int, bound: float, in_decode: float, lru_s: float) -> str:
    """The bound at the all-resident speed, against lru on demand's stall (which a ratio whose
    slots hold the working set brings to 0)."""
    share = f"{bound / lru_s:.1%} of lru on demand's stall" if lru_s else "lru on demand: 0 s"
    return (
        f"ratio {ratio:.2f} ({slots} slots): at the all-resident speed the link's capacity allows "
        f"no less stall than {bound:.3f} s ({in_decode:.3f} s in decode steps), {share}"
    )


def _row(name: str, ratio: float, s: dict) -> str:
    return (
        f"| {name} | {ratio:.2f} | {s['hit_rate']:.3f} | {s['misses']} | {s['belady_misses']} | "
        f"{s['transfers']} | {s['transfer_bytes'] / 2**20:.1f} | {s['stall_seconds']:.3f} | "
        f"{s['decode_stall_s']:.3f} | "
        f"{s['stall_bound']:.3f} | {s['tokens_per_s']:.1f} | {s['predictor_recall']:.3f} | {s['prefetch_horizon']} |"
    )


if __name__ == "__main__":
    main()
