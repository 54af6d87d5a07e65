"""Routing predictors: `pregate` (no training), `rpp` (EF-24) and `hybrid` (EF-25), trained on traces."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from engine.models.model import MoECausalLM
from engine.offload.predict.base import RoutingPredictor, recall_at_k
from engine.offload.predict.hybrid import HybridNet, HybridPredictor
from engine.offload.predict.pregate import PreGatePredictor
from engine.offload.predict.rpp import (
    RPPNet,
    RPPPredictor,
    check_dims,
    model_dims,
    read_predictor_header,
    warn_if_other_model,
)

PREDICTORS = ("none", "pregate", "rpp", "hybrid")
TRAINED_PREDICTORS = ("rpp", "hybrid")


def make_predictor(
    kind: str, model: MoECausalLM, path: str | Path | None, model_path: str | None = None
) -> RoutingPredictor | None:
    """The predictor named by `--predictor`; trained kinds load their weights from `path`, with a
    warning if they were trained on another model than `model_path`."""
    if kind == "none":
        return None
    if kind == "pregate":
        return PreGatePredictor(model)
    if kind not in TRAINED_PREDICTORS:
        raise ValueError(f"unknown predictor {kind!r}; choose one of {', '.join(PREDICTORS)}")
    if path is None:
        raise ValueError(
            f"predictor {kind!r} needs a predictor path (--predictor-path): a file written by "
            f"`expertflow train-predictor --kind {kind}`"
        )
    net = RPPNet.load(path) if kind == "rpp" else HybridNet.load(path)
    check_dims(f"predictor {path}", asdict(net.cfg), model_dims(model.cfg), "the model")
    if model_path is not None:
        trained_on = read_predictor_header(path)["info"].get("model")
        warn_if_other_model(f"predictor {path}", trained_on, model_path)
    net.to(model.lm_head.weight.device)
    return RPPPredictor(net) if kind == "rpp" else HybridPredictor(model, net)


__all__ = [
    "PREDICTORS",
    "TRAINED_PREDICTORS",
    "HybridPredictor",
    "PreGatePredictor",
    "RPPPredictor",
    "RoutingPredictor",
    "make_predictor",
    "recall_at_k",
]
