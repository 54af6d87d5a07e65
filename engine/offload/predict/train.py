"""Training the RPP and the hybrid predictor on routing traces: BCE against the 0/1 top-k routes,
Adam, shuffled mini-batches from a seeded generator, so a fixed seed gives the same weights.

A few thousand tokens of traces overfit a predictor within a few epochs, and when depends on the
model and corpus; so a slice of the training documents (`validation`) scores recall@k one layer
ahead after every epoch and the best epoch's weights are kept."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.config import flag
from engine.model_config import ModelConfig
from engine.offload.predict.documents import INFO_KEY, TrainedDocuments
from engine.offload.predict.evaluate import horizon_recall
from engine.offload.predict.hybrid import HybridConfig, HybridNet
from engine.offload.predict.rpp import (
    UNSEEN_ROW,
    RPPConfig,
    RPPNet,
    check_dims,
    model_dims,
    warn_if_other_model,
)
from engine.offload.predict.trace import TraceSet
from engine.progress import progress

logger = logging.getLogger(__name__)


# documents a trace needs for the default split: one held out, one to pick the epoch, one to train
MIN_DOCUMENTS = 3

# MLP width of each kind, picked on validation recall of the demo model's traces (400k tokens): the
# RPP gains little past 256 (0.887 vs 0.885 at 128 and 0.887 at 512), and on 60k tokens it overfit
# at 256, so a small trace wants --hidden-dim 128; the hybrid, one sample per layer pair, does best
# at 256.
HIDDEN_DIM = {"rpp": 256, "hybrid": 256}


@dataclass(frozen=True)
class TrainConfig:
    """The `expertflow train-predictor` flags (help from each field's metadata)."""

    epochs: int = flag(20, "passes over the data at most (the best by validation recall is kept)")
    batch_size: int = flag(256, "samples per step")
    lr: float = flag(3e-3, "Adam learning rate")
    seed: int = flag(0, "init, shuffling and split seed")
    holdout: float = flag(0.2, "fraction of documents held out for eval-predictor")
    validation: float = flag(
        0.1, "fraction of the training documents that picks the epoch (0: keep the last)"
    )
    embed_dim: int = flag(32, "token embedding size")
    hidden_dim: int | None = flag(
        None,
        "MLP hidden size (default: "
        + ", ".join(f"{size} for {kind}" for kind, size in HIDDEN_DIM.items())
        + ")",
    )
    # demo model, 400k traced tokens, width 256: validation recall 0.887 at 4, 0.894 at 8, 0.896 at 12
    context_window: int = flag(8, "rpp: previous token ids it sees")
    layer_dim: int = flag(16, "hybrid: size of the source-layer and distance embeddings")
    max_token_rows: int = flag(
        16384, "token embedding rows at most (the most frequent training tokens get one)"
    )

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "embed_dim", "hidden_dim", "layer_dim")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 < self.lr < math.inf or not 0.0 < self.holdout < 1.0:  # inf trained to NaNs
            raise ValueError(f"lr={self.lr} must be > 0 and holdout={self.holdout} in (0, 1)")
        if not 0.0 <= self.validation < 1.0:
            raise ValueError(f"validation={self.validation} must be in [0, 1)")
        if self.context_window < 0 or self.max_token_rows < 3:
            raise ValueError("context_window must be >= 0 and max_token_rows >= 3")


def token_rows(traces: TraceSet, max_rows: int) -> torch.Tensor:
    """Embedding row of every token id: the `max_rows - 2` most frequent tokens seen at least twice
    get rows 2.., every other id UNSEEN_ROW (rows 0 and 1 are "no token" and "unseen"). [V] int64.
    Tokens seen once train the unseen row, which serving gives every id the traces never held:
    without them it kept its random init whenever every traced token had a row of its own."""
    counts = torch.bincount(traces.token_ids.long(), minlength=traces.meta.vocab_size)
    recurring = int((counts > 1).sum())
    order = torch.argsort(counts, descending=True, stable=True)[: min(recurring, max_rows - 2)]
    rows = torch.full((traces.meta.vocab_size,), UNSEEN_ROW, dtype=torch.long)
    rows[order] = torch.arange(2, 2 + order.numel())
    return rows


def net_dims(traces: TraceSet, cfg: TrainConfig, kind: str) -> tuple[torch.Tensor, dict[str, int]]:
    """The token rows and the config fields both predictor kinds share, from traces and flags."""
    rows, meta = token_rows(traces, cfg.max_token_rows), traces.meta
    return rows, {
        "num_layers": meta.num_layers,
        "num_experts": meta.num_experts,
        "top_k": meta.top_k,
        "vocab_size": meta.vocab_size,
        "num_rows": int(rows.max()) + 1,
        "embed_dim": cfg.embed_dim,
        "hidden_dim": cfg.hidden_dim or HIDDEN_DIM[kind],
    }


@dataclass(frozen=True)
class FitReport:
    epoch: int  # the epoch whose weights were kept (1-based)
    validation_recall: list[float]  # recall@k one layer ahead after each epoch; empty without

    def as_info(self) -> dict[str, object]:
        return {"kept_epoch": self.epoch, "validation_recall": self.validation_recall}


def train_rpp(
    traces: TraceSet, cfg: TrainConfig, validation: TraceSet | None = None
) -> tuple[RPPNet, FitReport]:
    """Learn a token's routes at every layer from it and its `context_window` previous ids."""
    torch.manual_seed(cfg.seed)
    rows, dims = net_dims(traces, cfg, "rpp")
    net = RPPNet(RPPConfig(**dims, context_window=cfg.context_window))
    net.tokens.rows.copy_(rows)
    ids, context, routes = (
        traces.token_ids.long(),
        traces.context(cfg.context_window),
        traces.routes(),
    )

    def loss(batch: torch.Tensor) -> torch.Tensor:
        logits = net(ids[batch], context[batch])  # [B, L, E]
        return F.binary_cross_entropy_with_logits(logits, routes[batch])

    report = _fit(net, len(traces), loss, cfg, "training rpp", validation)
    return net.eval(), report


def train_hybrid(
    traces: TraceSet, cfg: TrainConfig, validation: TraceSet | None = None
) -> tuple[HybridNet, FitReport]:
    """Learn to correct each traced pre-gate guess (source i -> target j) toward j's actual routes.
    One sample per (token, layer pair): N * L(L-1)/2 samples."""
    meta = traces.meta
    if meta.num_layers < 2:
        raise ValueError("the hybrid predictor needs a model with at least 2 MoE layers")
    torch.manual_seed(cfg.seed)
    rows, dims = net_dims(traces, cfg, "hybrid")
    net = HybridNet(HybridConfig(**dims, layer_dim=cfg.layer_dim))
    net.tokens.rows.copy_(rows)
    pairs = torch.tensor(meta.pairs)  # [P, 2]
    num_pairs = pairs.shape[0]
    ids, routes = traces.token_ids.long(), traces.routes()  # [N], [N, L, E]

    def loss(batch: torch.Tensor) -> torch.Tensor:
        n, p = batch // num_pairs, batch % num_pairs
        source, target = pairs[p, 0], pairs[p, 1]
        logits = net(
            traces.pregate[n, p].float(), routes[n, source], ids[n], source, target - source
        )  # [B, E]
        return F.binary_cross_entropy_with_logits(logits, routes[n, target])

    report = _fit(net, len(traces) * num_pairs, loss, cfg, "training hybrid", validation)
    return net.eval(), report


def _fit(
    net: RPPNet | HybridNet,
    num_samples: int,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    cfg: TrainConfig,
    desc: str,
    validation: TraceSet | None,
) -> FitReport:
    """Adam over shuffled mini-batches; with `validation`, ends on the best epoch's weights."""
    if num_samples == 0:
        raise ValueError("no training samples: the training split of the traces is empty")
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    steps_per_epoch = -(-num_samples // cfg.batch_size)
    recalls: list[float] = []
    best_state: dict[str, torch.Tensor] = {}
    net.train()
    with progress(total=cfg.epochs * steps_per_epoch, desc=desc, unit="batch") as bar:
        for epoch in range(cfg.epochs):
            order = torch.randperm(num_samples, generator=generator)
            total = 0.0
            for start in range(0, num_samples, cfg.batch_size):
                batch = order[start : start + cfg.batch_size]
                loss = loss_of(batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * batch.numel()
                bar.update(1)
            bar.set_postfix(epoch=epoch + 1, bce=f"{total / num_samples:.4f}")
            logger.debug("%s: epoch %d, mean BCE %.4f", desc, epoch + 1, total / num_samples)
            if validation is not None:
                net.eval()
                recalls.append(horizon_recall(net, validation))
                net.train()
                if recalls[-1] > max(recalls[:-1], default=-1.0):  # ties keep the earlier
                    best_state = copy.deepcopy(net.state_dict())
                bar.set_postfix(epoch=epoch + 1, val_recall=f"{recalls[-1]:.4f}")
    net.eval()
    if not recalls:
        return FitReport(cfg.epochs, [])
    net.load_state_dict(best_state)
    return FitReport(recalls.index(max(recalls)) + 1, recalls)


def train_predictor(
    kind: str,
    traces_path: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    model: str | None = None,
) -> None:
    """Train a `kind` predictor on the training split of a trace file and write it to `out`; the
    file records which documents it saw, so evaluation holds out only the others. With `model` (a
    checkpoint folder), first check that the traces are of a model with the same routing dims."""
    traces = TraceSet.load(traces_path)
    if model is not None:
        check_dims(
            f"trace {traces_path}",
            traces.meta.dims,
            model_dims(ModelConfig.from_pretrained(model)),
            model,
        )
        warn_if_other_model(f"trace {traces_path}", traces.meta.model, model)
    trainer = {"rpp": train_rpp, "hybrid": train_hybrid}.get(kind)
    if trainer is None:
        raise ValueError(f"cannot train a {kind!r} predictor; choose rpp or hybrid")
    train, held_out = traces.split(cfg.holdout, cfg.seed)
    trained = TrainedDocuments.of(train)  # validation documents too: they pick the epoch
    validation = None
    if cfg.validation > 0:
        num_docs = int(torch.unique(train.doc_ids).numel())
        if num_docs < 2:
            raise ValueError(
                f"picking the epoch needs at least 2 training documents, the split left "
                f"{num_docs}: trace more corpus files, or pass --validation 0 to keep the last epoch"
            )
        train, validation = train.split(cfg.validation, cfg.seed + 1)
    logger.info(
        "training %s on %d tokens (%d to pick the epoch, %d held out for evaluation)",
        kind,
        len(train),
        len(validation) if validation is not None else 0,
        len(held_out),
    )
    net, report = trainer(train, cfg, validation)
    if report.validation_recall:
        logger.info(
            "kept epoch %d of %d: validation recall@%d one layer ahead %.4f",
            report.epoch,
            cfg.epochs,
            traces.meta.top_k,
            max(report.validation_recall),
        )
    info = {"traces": str(traces_path), "model": traces.meta.model, "train_tokens": len(train)}
    info |= {INFO_KEY: trained.as_info(), "training": asdict(cfg), **report.as_info()}
    net.save(out, info)
    size_bytes = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    logger.info("wrote %s predictor to %s (%.2f MB)", kind, out, size_bytes / 1e6)
