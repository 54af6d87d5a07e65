"""KV memory of models with local attention layers: what the engine allocates, with the local
layers' own pool (sized for each sequence's window), against every layer at the full pool's size
(what they took before), on tiny random gpt-oss and Llama 4 checkpoints at real context lengths.

    .venv/bin/python benchmarks/local_kv_pool.py [--max-model-len 32768 --max-num-seqs 8]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import LLM  # noqa: E402
from tests.conftest import save_tiny_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-model-len", type=int, default=32768)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    args = ap.parse_args()
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        "| model | window | full pool blocks | local pool blocks | KV MiB | all layers at full | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for family, changes in (
        ("gpt_oss", {"sliding_window": 128}),
        ("llama4", {"attention_chunk_size": 8192}),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            path = save_tiny_checkpoint(family, Path(tmp))
            config = json.loads((path / "config.json").read_text())
            config |= {**changes, "max_position_embeddings": args.max_model_len}
            (path / "config.json").write_text(json.dumps(config))
            blocks = args.max_num_seqs * args.max_model_len // 16
            llm = LLM(
                model=str(path),
                max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs,
                kv_cache_blocks=blocks,
            )
            engine = llm.engine
            kv = engine.kv
            used = sum(t.nbytes for t in (*kv.k, *kv.v))
            per_layer = max(t.nbytes for t in kv.k) * (2 if kv.v else 1)
            full = per_layer * len(engine.model_config.attention_layers)
            window = engine.model_config.local_attention
            print(
                f"| {family} (tiny) | {window.size}{' chunked' if window.chunked else ''} | "
                f"{engine.blocks.full.num_blocks} | {engine.blocks.local.num_blocks} | "
                f"{used / 2**20:.0f} | {full / 2**20:.0f} | {used / full:.2f} |"
            )


if __name__ == "__main__":
    main()
