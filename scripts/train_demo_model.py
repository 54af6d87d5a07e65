"""Train the bundled demo MoE: a tiny Mixtral on text that ships with Python.

ExpertFlow needs a real MoE checkpoint to develop and test offloading on a CPU: random weights
spread tokens almost evenly over the experts, leaving caches, predictors and token scheduling little
to exploit. This script trains one deterministically (fixed seeds, file order, held-out split and
step budget) in about ten minutes on two idle CPU cores and writes a Hugging Face Mixtral folder
(hub per-expert keys, bfloat16), its own byte-level BPE tokenizer with a chat template, and a model
card with the held-out loss, expert load and pre-gate recall that `evaluate` measures.

    python scripts/train_demo_model.py --out models/expertflow-demo
    python scripts/train_demo_model.py --out models/expertflow-demo --eval-only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
)

from engine.progress import progress

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for the siblings, however loaded

from demo_card import evaluate, write_card  # noqa: E402
from demo_data import (  # noqa: E402
    REPORT,
    TrainConfig,
    build_corpus,
    encode_stream,
    save_tokenizer,
    train_tokenizer,
)

log = logging.getLogger("train_demo_model")


def build_model(cfg: TrainConfig, tok: PreTrainedTokenizerFast) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    return MixtralForCausalLM(config)


def train(model: MixtralForCausalLM, stream: torch.Tensor, cfg: TrainConfig) -> dict[str, float]:
    """AdamW with linear warmup and cosine decay over random windows of the training stream."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets = torch.arange(cfg.seq_len)
    model.train()
    lm_ema, start_s, cpu_start_s = float("nan"), time.perf_counter(), time.process_time()
    step_s: list[float] = []  # the fastest steps estimate an idle machine's speed
    bar = progress(range(cfg.steps), desc="train", unit="step")
    for step in bar:
        step_start_s = time.perf_counter()
        starts = torch.randint(0, len(stream) - cfg.seq_len, (cfg.batch_size,), generator=gen)
        batch = stream[starts[:, None] + offsets]  # [B, T]
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - step_start_s)
        lm = out.loss.item() - cfg.router_aux_loss_coef * out.aux_loss.item()
        lm_ema = lm if math.isnan(lm_ema) else 0.95 * lm_ema + 0.05 * lm
        bar.set_postfix(lm=f"{lm_ema:.3f}", aux=f"{out.aux_loss.item():.3f}")
        if step % 50 == 0 or step == cfg.steps - 1:
            log.info("step %d lm_loss %.3f aux %.3f lr %.2e", step, lm, out.aux_loss.item(),
                     sched.get_last_lr()[0])  # fmt: skip
    return {
        "train_wall_s": round(time.perf_counter() - start_s, 1),
        "train_cpu_s": round(time.process_time() - cpu_start_s, 1),
        "step_s_median": round(sorted(step_s)[len(step_s) // 2], 3),
        "step_s_p10": round(sorted(step_s)[len(step_s) // 10], 3),
        "final_train_lm_loss_ema": round(lm_ema, 4),
        "train_tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
    }


def hub_state_dict(model: MixtralForCausalLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """transformers>=5 keeps experts fused (gate_up_proj [E, 2I, H], down_proj [E, H, I]); hub
    Mixtral checkpoints, and so ExpertFlow's loader, use block_sparse_moe.experts.{e}.w1/w2/w3."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        key, value = key.replace(".mlp.", ".block_sparse_moe."), value.to(dtype)
        if key.endswith(".experts.gate_up_proj"):
            base = key.removesuffix("gate_up_proj")
            for e, w13 in enumerate(value.unbind(0)):  # w13 [2I, H] = [gate; up]
                w1, w3 = w13.chunk(2, dim=0)
                out[f"{base}{e}.w1.weight"] = w1.clone()
                out[f"{base}{e}.w3.weight"] = w3.clone()
        elif key.endswith(".experts.down_proj"):
            base = key.removesuffix("down_proj")
            for e, w2 in enumerate(value.unbind(0)):  # w2 [H, I]
                out[f"{base}{e}.w2.weight"] = w2.clone()
        else:
            out[key] = value.contiguous()
    return out


def save_model(model: MixtralForCausalLM, out: Path) -> None:
    """bfloat16 safetensors in the hub layout, a hub-style config.json, and a reload check."""
    save_file(
        hub_state_dict(model, torch.bfloat16), out / "model.safetensors", metadata={"format": "pt"}
    )
    config = model.config
    config.architectures, config.dtype = ["MixtralForCausalLM"], torch.bfloat16
    config.save_pretrained(out)
    cfg_path = out / "config.json"
    raw = json.loads(cfg_path.read_text())  # keys older readers (and hub configs) use
    raw.update(torch_dtype="bfloat16", rope_theta=raw["rope_parameters"]["rope_theta"])
    cfg_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(out)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for key, value in model.state_dict().items():
        if not torch.equal(loaded[key], value.to(torch.bfloat16).float()):
            raise RuntimeError(f"{key} did not survive the save/load round trip")


def main() -> None:
    parser = argparse.ArgumentParser(description="Train ExpertFlow's bundled demo MoE.")
    parser.add_argument("--out", type=Path, default=Path("models/expertflow-demo"))
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="training steps")
    parser.add_argument(
        "--eval-only", action="store_true", help="recompute the stats and card of --out"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    start_s = time.perf_counter()
    with logging_redirect_tqdm():
        if args.eval_only:
            report = json.loads((args.out / REPORT).read_text())
            cfg = TrainConfig(**report["config"])
            torch.set_num_threads(cfg.threads)
            corpus = build_corpus(cfg)
            tok = PreTrainedTokenizerFast.from_pretrained(args.out)
        else:
            cfg = TrainConfig(steps=args.steps)
            torch.set_num_threads(cfg.threads)
            corpus = build_corpus(cfg)
            tok = train_tokenizer(corpus, cfg)
            args.out.mkdir(parents=True, exist_ok=True)
            save_tokenizer(tok, args.out)
            stream = encode_stream(tok, corpus.train, corpus.train_chats)
            log.info("training stream: %d tokens", len(stream))
            model = build_model(cfg, tok)
            training = train(model, stream, cfg)
            save_model(model, args.out)
            report = {"config": dataclasses.asdict(cfg), "training": training}
        heldout = encode_stream(tok, corpus.heldout, corpus.heldout_chats)
        trained = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
        report["eval"] = evaluate(trained, heldout, cfg)  # the saved bfloat16 weights
        report["eval_random_init"] = evaluate(build_model(cfg, tok), heldout, cfg)
    if not args.eval_only:
        report["training"].update(
            command="python scripts/train_demo_model.py " + " ".join(sys.argv[1:]),
            total_wall_s=round(time.perf_counter() - start_s, 1),
            machine=f"a {os.cpu_count()}-core {platform.machine()} host",
        )
        report["versions"] = {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        report["heldout_files"] = corpus.heldout_files
    (args.out / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    write_card(args.out, report)
    log.info("held-out loss %.3f (ln V %.2f); wrote %s", report["eval"]["heldout_loss"],
             report["eval"]["uniform_loss"], args.out)  # fmt: skip


if __name__ == "__main__":
    main()
