"""The demo model's data: its config, corpus and tokenizer, apart from the training loop.

Split out of train_demo_model.py so the benchmarks can rebuild the exact train / held-out split
without importing the trainer, and so each file keeps one job. Imports neither sibling script.
"""

from __future__ import annotations

import ast
import json
import logging
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from engine.progress import progress

log = logging.getLogger(__name__)

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
    for path in progress(files, desc="read stdlib", unit="file"):
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
