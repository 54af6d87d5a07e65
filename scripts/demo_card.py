"""The demo model's evaluation and model card: what `--eval-only` recomputes and writes.

Split out of train_demo_model.py so the measuring and reporting live apart from the training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from demo_data import BOS, EOS, PAD, REPORT, SPECIAL_TOKENS, TrainConfig
from transformers import MixtralForCausalLM

from engine.progress import progress


@torch.no_grad()
def evaluate(model: MixtralForCausalLM, stream: torch.Tensor, cfg: TrainConfig) -> dict[str, Any]:
    """Held-out loss, expert load and pre-gate recall@k.

    Pre-gate, as ExpertFlow's `pregate` predictor does it: the residual stream entering layer j's
    MoE block (before its post_attention_layernorm) goes through layer l's post_attention_layernorm
    and router, for l = j + s; its top-k is scored against layer l's actual top-k.
    """
    model.eval()
    layers, c = model.model.layers, model.config
    n_layers, n_experts, k = c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok

    def forward(batch: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
        """Loss and each layer's MoE input before its norm ([B*T, H] per layer). The hooks come
        off before `topk` reuses the norms, or they would record its inputs too."""
        residuals: list[torch.Tensor] = []
        hooks = [
            layer.post_attention_layernorm.register_forward_pre_hook(
                lambda _m, args: residuals.append(args[0].reshape(-1, c.hidden_size))
            )
            for layer in layers
        ]
        try:
            return model(input_ids=batch, labels=batch).loss.item(), residuals
        finally:
            for hook in hooks:
                hook.remove()

    def topk(target: int, residual: torch.Tensor) -> torch.Tensor:
        norm, gate = layers[target].post_attention_layernorm, layers[target].mlp.gate
        return F.linear(norm(residual), gate.weight).topk(k, dim=-1).indices  # [T, k]

    starts = torch.linspace(0, len(stream) - cfg.seq_len - 1, cfg.eval_windows).long()
    losses: list[float] = []
    routes: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    hits = torch.zeros(n_layers, n_layers)  # [target layer, horizon]
    for chunk in progress(starts.split(8), desc="eval", unit="batch"):
        batch = stream[chunk[:, None] + torch.arange(cfg.seq_len)]  # [B, T]
        loss, residuals = forward(batch)
        losses.append(loss)
        actual = [topk(layer, residuals[layer]) for layer in range(n_layers)]
        for layer in range(n_layers):
            routes[layer].append(actual[layer])
            for s in range(1, layer + 1):
                pred = topk(layer, residuals[layer - s])
                hits[layer, s] += (pred[:, :, None] == actual[layer][:, None, :]).any(1).sum()
    ids = [torch.cat(r) for r in routes]  # each [N, k]
    n_tokens = ids[0].shape[0]
    load = torch.stack([torch.bincount(r.flatten(), minlength=n_experts) for r in ids]) / (
        n_tokens * k
    )  # [L, E], rows sum to 1
    entropy = -(load * load.clamp_min(1e-12).log()).sum(1) / math.log(n_experts)
    static = [
        torch.isin(r, load[i].topk(k).indices).float().mean().item() for i, r in enumerate(ids)
    ]
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total_params = sum(p.numel() for p in model.parameters())
    loss = sum(losses) / len(losses)
    return {
        "total_params": total_params,
        "active_params": int(total_params - expert_params * (1 - k / n_experts)),
        "heldout_tokens": n_tokens,
        "heldout_loss": round(loss, 4),
        "heldout_ppl": round(math.exp(loss), 2),
        "uniform_loss": round(math.log(c.vocab_size), 4),
        "expert_load": [[round(x, 4) for x in row] for row in load.tolist()],
        "load_max_over_uniform": [round(x * n_experts, 2) for x in load.max(1).values.tolist()],
        "load_entropy_ratio": [round(x, 3) for x in entropy.tolist()],
        "pregate_recall": [
            [round(hits[t, s].item() / (n_tokens * k), 4) if s else None for s in range(t + 1)]
            for t in range(n_layers)
        ],  # [target layer][horizon]; horizon 0 is the layer itself
        "static_topk_recall": [round(x, 4) for x in static],
        "chance_recall": k / n_experts,
    }


def write_card(out: Path, report: dict[str, Any]) -> None:
    """README.md: what the model is, how it was made, and the routing numbers that justify it."""
    cfg, tr = report["config"], report["training"]
    ev, rnd = report["eval"], report["eval_random_init"]
    n_layers, n_experts, k = cfg["num_layers"], cfg["num_experts"], cfg["top_k"]
    pct = "{:.1f}".format
    stats = zip(
        ev["expert_load"], ev["load_max_over_uniform"], ev["load_entropy_ratio"], strict=True
    )
    load_rows = "\n".join(
        f"| {i} | " + " | ".join(pct(100 * x) for x in row) + f" | {mx:.2f} | {h:.3f} |"
        for i, (row, mx, h) in enumerate(stats)
    )
    recall_rows = "\n".join(
        f"| {t} | "
        + " | ".join(pct(100 * r[s]) if s < len(r) else "" for s in range(1, n_layers))
        + f" | {pct(100 * ev['static_topk_recall'][t])}"
        + f" | {pct(100 * rnd['pregate_recall'][t][1])} |"
        for t, r in enumerate(ev["pregate_recall"])
        if t > 0
    )
    size_mib = sum(f.stat().st_size for f in out.iterdir() if f.name != "README.md") / 2**20
    idle_min = tr["step_s_p10"] * cfg["steps"] / 60
    card = f"""# expertflow-demo

A tiny Mixtral-architecture Mixture-of-Experts language model trained from scratch on the Python
standard library: ExpertFlow's default `--model` and its CPU testbed for expert caches, routing
predictors, prefetching and token scheduling. Its routers are markedly skewed and predictable from
earlier layers (below), more so than the same weights at random initialisation. It writes
Python-flavoured text; it is not a useful assistant.

## Architecture
`MixtralForCausalLM` (transformers {report["versions"]["transformers"]}), {ev["total_params"]:,}
parameters, {ev["active_params"]:,} active per token; untied `lm_head`. bfloat16
`model.safetensors` with the hub's per-expert keys
`model.layers.{{l}}.block_sparse_moe.experts.{{e}}.w1/w2/w3.weight` and routers
`model.layers.{{l}}.block_sparse_moe.gate.weight`; {size_mib:.1f} MiB in all.

| hidden | intermediate / expert | layers | experts | top-k | heads | kv heads | vocab | rope theta | max positions |
|---|---|---|---|---|---|---|---|---|---|
| {cfg["hidden_size"]} | {cfg["intermediate_size"]} | {n_layers} | {n_experts} | {k} | {cfg["num_heads"]} | {cfg["num_kv_heads"]} | {cfg["vocab_size"]} | {cfg["rope_theta"]:g} | {cfg["max_position_embeddings"]} (trained on {cfg["seq_len"]}) |

Tokenizer: byte-level BPE trained with `tokenizers`. Special tokens (ids 0-5):
{", ".join(f"`{t}`" for t in SPECIAL_TOKENS)}.
BOS = `{BOS}` (0), EOS = end of turn = `{EOS}` (1), pad = `{PAD}` (5); plain encoding prepends BOS.
Chat template: BOS, then per message `<|role|>\\n{{content}}{EOS}\\n`; the generation prompt is
`<|assistant|>\\n`; roles other than system/user/assistant raise an error.

## Training
- Data: Python {report["versions"]["python"]}'s standard-library `.py` sources (without `test/`,
  `tests/`, `idle_test/`, `encodings/`) in sorted path order, each as `{BOS}` text `{EOS}`;
  pydoc's language-reference topics (`pydoc_data.topics`); chat samples built from both (a
  question about a public function, class or topic, answered with the start of its docstring).
  One file or topic in {cfg["heldout_one_in"]} (by crc32 of its path) is held out.
- {cfg["steps"]} AdamW steps of {cfg["batch_size"]} x {cfg["seq_len"]} tokens
  ({tr["train_tokens"]:,} tokens); peak lr {cfg["lr"]:g} after {cfg["warmup_steps"]} warmup steps,
  cosine to {cfg["min_lr_ratio"]:g}x; weight decay {cfg["weight_decay"]:g}; router aux loss
  coefficient {cfg["router_aux_loss_coef"]:g}; seed {cfg["seed"]}; {cfg["threads"]} torch threads.
- Command: `{tr["command"]}` (`make demo-model`).
- Time: on {tr["machine"]} shared with other jobs, the training loop took
  {tr["train_wall_s"] / 60:.0f} min wall and the whole script {tr["total_wall_s"] / 60:.0f} min.
  The fastest tenth of steps took {tr["step_s_p10"]:.2f} s (median {tr["step_s_median"]:.2f} s):
  about {idle_min:.0f} min for the loop on an idle machine.

## Held-out evaluation
{ev["heldout_tokens"]:,} held-out tokens ({cfg["eval_windows"]} windows of {cfg["seq_len"]}); the
saved bfloat16 weights run in float32. Loss **{ev["heldout_loss"]:.3f}** nats/token, perplexity
**{ev["heldout_ppl"]:.1f}**. Uniform over the vocabulary: ln V = {ev["uniform_loss"]:.2f}; the same
model at random initialisation: {rnd["heldout_loss"]:.2f}.

### Expert load
Share of each layer's top-{k} assignments per expert, in % (uniform = {100 / n_experts:.2f}%).
max/uniform = largest share x {n_experts}; entropy = load entropy / ln {n_experts}. At random
initialisation: max/uniform {min(rnd["load_max_over_uniform"]):.2f} to
{max(rnd["load_max_over_uniform"]):.2f}, entropy {min(rnd["load_entropy_ratio"]):.2f} to
{max(rnd["load_entropy_ratio"]):.2f}.

| layer | {" | ".join(str(e) for e in range(n_experts))} | max/uniform | entropy |
|---|{"---|" * (n_experts + 2)}
{load_rows}

### Pre-gate recall
Target layer l, horizon s: the residual stream entering layer l-s's MoE block (after that layer's
attention, before its `post_attention_layernorm`) goes through layer l's `post_attention_layernorm`
and router; recall@{k} is the fraction of layer l's actual top-{k} experts found in that predicted
top-{k}, averaged over held-out tokens. This is what ExpertFlow's `pregate` predictor computes
after layer l-s's router. Chance = {k}/{n_experts} = {100 * ev["chance_recall"]:.1f}%. "static"
predicts layer l's {k} most-loaded experts for every token (an oracle on these counts). "random
init" is the same model before training: its residual stream barely changes from layer to layer,
so its pre-gate recall is above chance too.

| target layer | {" | ".join(f"s={s}" for s in range(1, n_layers))} | static | random init, s=1 |
|---|{"---|" * (n_layers + 1)}
{recall_rows}

Written by `scripts/train_demo_model.py`; `--eval-only` recomputes the numbers; raw values in
`{REPORT}`.
"""
    (out / "README.md").write_text(card)
