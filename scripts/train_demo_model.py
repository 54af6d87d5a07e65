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
import ast
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
)

log = logging.getLogger("train_demo_model")

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>", PAD)  # ids 0..5
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}{% endif %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SYSTEM_PROMPT = "You are a concise assistant for the Python standard library."
QUESTIONS = ("What does `{}` do?", "Explain `{}`.", "What is `{}` for?")
SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "encodings",
    "site-packages",
    "__pycache__",
    "pydoc_data",
}
REPORT = "training_report.json"
Chat = list[dict[str, str]]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that fixes the checkpoint: a budget in steps, not seconds, so reruns match."""

    vocab_size: int = 4096
    hidden_size: int = 192
    intermediate_size: int = 128
    num_layers: int = 6
    num_heads: int = 6
    num_kv_heads: int = 2
    num_experts: int = 16
    top_k: int = 2
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 500
    warmup_steps: int = 25
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    router_aux_loss_coef: float = 0.005  # light: learned, skewed routing that does not collapse
    heldout_one_in: int = 20  # files (and pydoc topics) whose crc32 % this == 0 are held out
    eval_windows: int = 64
    seed: int = 0
    threads: int = 2


@dataclass
class Corpus:
    train: list[str]  # raw documents: sources and pydoc topics
    train_chats: list[Chat]
    heldout: list[str]
    heldout_chats: list[Chat]
    heldout_files: list[str]


def _heldout(name: str, cfg: TrainConfig) -> bool:
    return zlib.crc32(name.encode()) % cfg.heldout_one_in == 0


def _lead(text: str, limit: int = 600) -> str:
    """The opening paragraphs (headings skipped) up to `limit` characters: a short, whole answer."""
    paras = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    paras = [p for p in paras if len(set(p.splitlines()[-1])) > 1]  # drop "Title\n*****"
    out = paras[0].strip()[:limit] if paras else ""
    for para in paras[1:]:
        if len(out) + 2 + len(para) > limit:
            break
        out += "\n\n" + para
    return out


def _chat(question: str, answer: str) -> Chat:
    """A system prompt on a deterministic quarter of the samples, so both shapes are seen."""
    system = (
        [{"role": "system", "content": SYSTEM_PROMPT}]
        if zlib.crc32(question.encode()) % 4 == 0
        else []
    )
    return [
        *system,
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]


def docstring_chats(source: str, module: str) -> list[Chat]:
    """Question/answer pairs from public docstrings: teaches the chat format and the end-of-turn."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    chats: list[Chat] = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if node.name.startswith("_"):
                    continue
                name = f"{prefix}.{node.name}"
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 20:
                    question = QUESTIONS[zlib.crc32(name.encode()) % len(QUESTIONS)].format(name)
                    chats.append(_chat(question, _lead(doc)))
                if isinstance(node, ast.ClassDef):
                    visit(node.body, name)

    visit(tree.body, module)
    return chats


def build_corpus(cfg: TrainConfig) -> Corpus:
    """The stdlib's own .py sources (minus tests and codec tables) plus pydoc's topic texts."""
    from pydoc_data.topics import topics

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])
    )
    corpus = Corpus([], [], [], [], [])
    for path in tqdm(files, desc="read stdlib", unit="file"):
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        held = _heldout(rel, cfg)
        (corpus.heldout if held else corpus.train).append(text)
        (corpus.heldout_chats if held else corpus.train_chats).extend(docstring_chats(text, module))
        if held:
            corpus.heldout_files.append(rel)
    for key in sorted(topics):
        held = _heldout(f"topic:{key}", cfg)
        (corpus.heldout if held else corpus.train).append(topics[key])
        title = topics[key].lstrip().splitlines()[0]
        chat = _chat(f"What does the language reference say about {title}?", _lead(topics[key]))
        (corpus.heldout_chats if held else corpus.train_chats).append(chat)
    log.info(
        "corpus: %d train docs + %d chats, %d held-out docs + %d chats (Python %s stdlib at %s)",
        len(corpus.train), len(corpus.train_chats), len(corpus.heldout),
        len(corpus.heldout_chats), sys.version.split()[0], root,
    )  # fmt: skip
    return corpus


def train_tokenizer(corpus: Corpus, cfg: TrainConfig) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any UTF-8 round-trips); the post-processor prepends BOS like Llama's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    log.info("training the %d-token BPE tokenizer", cfg.vocab_size)
    tok.train_from_iterator(corpus.train, trainer, length=len(corpus.train))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=cfg.max_position_embeddings,
    )


def encode_stream(tok: PreTrainedTokenizerFast, docs: list[str], chats: list[Chat]) -> torch.Tensor:
    """One token stream: BOS doc EOS for each document, then the rendered chats packed together."""
    chat_texts = [tok.apply_chat_template(c, tokenize=False) for c in chats]
    backend = tok.backend_tokenizer  # no per-call length warnings; documents exceed the context
    doc_ids = [e.ids for e in backend.encode_batch(docs, add_special_tokens=False)]
    chat_ids = [e.ids for e in backend.encode_batch(chat_texts, add_special_tokens=False)]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    flat = [t for ids in doc_ids for t in (bos, *ids, eos)] + [t for ids in chat_ids for t in ids]
    return torch.tensor(flat, dtype=torch.long)  # [N]


def save_tokenizer(tok: PreTrainedTokenizerFast, out: Path) -> None:
    """Keep the chat template inside tokenizer_config.json, where hub checkpoints carry it."""
    tok.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(chat_template=CHAT_TEMPLATE, tokenizer_class="PreTrainedTokenizerFast")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)


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
    bar = tqdm(range(cfg.steps), desc="train", unit="step")
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
    for chunk in tqdm(starts.split(8), desc="eval", unit="batch"):
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
