"""EF-24's routing-path predictor (RPP): every MoE layer's experts for a token, from the token and
the ids before it, predicted once per step before layer 0 so that the whole path can be prefetched.

EF-24 used a T5 encoder-decoder (7 MB); ours is lighter: embeddings of the token and of each of the
W previous tokens, concatenated, through a two-layer MLP to [L, E] logits, trained with BCE against
the 0/1 top-k routes. A trained predictor (rpp or hybrid) is one safetensors file: the weights plus,
under the metadata key "expertflow_predictor", JSON {format, kind, config (dims), info (provenance:
traces, model, training settings and the documents it was trained on)}.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.model_config import ModelConfig
from engine.offload.predict.files import read_header, reading

logger = logging.getLogger(__name__)

PREDICTOR_FORMAT = 1
METADATA_KEY = "expertflow_predictor"
NONE_ROW, UNSEEN_ROW = 0, 1  # embedding rows: "no token" (context before the sequence), "unseen id"


class TokenEmbedding(nn.Module):
    """Embeddings for the token ids seen in training only: `rows` maps every id of the vocabulary to
    a row (UNSEEN_ROW for the rest), so a 150k vocabulary costs a [V] index, not [V, D] weights."""

    def __init__(self, vocab_size: int, num_rows: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("rows", torch.full((vocab_size,), UNSEEN_ROW, dtype=torch.long))
        self.embed = nn.Embedding(num_rows, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] (-1 = no token) -> [..., D]."""
        rows = torch.where(ids >= 0, self.rows[ids.clamp(min=0)], NONE_ROW)
        return self.embed(rows)


@dataclass(frozen=True)
class RPPConfig:
    num_layers: int  # MoE layers
    num_experts: int
    top_k: int
    vocab_size: int
    num_rows: int  # token embedding rows
    context_window: int
    embed_dim: int
    hidden_dim: int


class PredictorNet(nn.Module):
    """A trained predictor network: `kind`, a frozen-dataclass `cfg` of `config_type`, and weights,
    saved together in one predictor file and rebuilt from it."""

    kind: ClassVar[str]
    config_type: ClassVar[type]
    cfg: Any

    def save(self, path: str | Path, info: dict[str, Any]) -> None:
        save_predictor_file(path, self.kind, asdict(self.cfg), self.state_dict(), info)

    @classmethod
    def load(cls, path: str | Path) -> Self:
        header, state = read_predictor_file(path, cls.kind)
        with reading(path, "predictor"):  # a hand-edited config or weights that do not fit it
            net = cls(cls.config_type(**header["config"]))
            net.load_state_dict(state)
        return net.eval()


class RPPNet(PredictorNet):
    kind = "rpp"
    config_type = RPPConfig

    def __init__(self, cfg: RPPConfig) -> None:
        super().__init__()
        self.cfg: RPPConfig = cfg
        self.tokens = TokenEmbedding(cfg.vocab_size, cfg.num_rows, cfg.embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear((cfg.context_window + 1) * cfg.embed_dim, cfg.hidden_dim),
            nn.GELU(),
            nn.Linear(cfg.hidden_dim, cfg.num_layers * cfg.num_experts),
        )

    def forward(self, token_ids: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """token_ids [T], context [T, W] (-1 = none) -> route logits [T, L, E]."""
        ids = torch.cat([token_ids[:, None], context], dim=1)  # [T, W+1]
        x = self.tokens(ids).flatten(1)  # [T, (W+1)*D]
        return self.mlp(x).view(-1, self.cfg.num_layers, self.cfg.num_experts)


class RPPPredictor:
    """The runtime calls `path` once per step before layer 0 and `ahead` after each MoE layer;
    `ahead` only slices the step's path, so both moments cost one small MLP per token."""

    kind = "rpp"

    def __init__(self, net: RPPNet) -> None:
        self.net = net.eval()
        self.context_window = net.cfg.context_window
        self._path: torch.Tensor | None = None  # [L, T, E] of the current step

    @torch.no_grad()
    def path(self, token_ids: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if context.shape != (token_ids.shape[0], self.context_window):
            wanted = (token_ids.shape[0], self.context_window)
            raise ValueError(f"rpp: context must be [T, W] = {wanted}, got {tuple(context.shape)}")
        logits = self.net(token_ids, context)  # [T, L, E]
        self._path = torch.sigmoid(logits).transpose(0, 1).contiguous()  # [L, T, E]
        return self._path

    def ahead(
        self,
        moe_index: int,
        residual: torch.Tensor,
        token_ids: torch.Tensor,
        topk_ids: torch.Tensor,
        horizon: int,
    ) -> torch.Tensor:
        if self._path is None:
            raise RuntimeError(
                "rpp: ahead() before path(); call path() once per step before layer 0"
            )
        if self._path.shape[1] != topk_ids.shape[0]:
            raise RuntimeError(
                f"rpp: ahead() got {topk_ids.shape[0]} tokens but this step's path() had "
                f"{self._path.shape[1]}; call path() with the step's tokens first"
            )
        return self._path[moe_index + 1 : moe_index + 1 + max(horizon, 0)]  # [h, T, E]


def save_predictor_file(
    path: str | Path,
    kind: str,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    info: dict[str, Any],
) -> None:
    header = {"format": PREDICTOR_FORMAT, "kind": kind, "config": config, "info": info}
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(header)})


def read_predictor_header(path: str | Path) -> dict[str, Any]:
    make_one = "train one: expertflow train-predictor"
    header = read_header(path, "predictor", METADATA_KEY, PREDICTOR_FORMAT, make_one, "retrain it")
    if not all(isinstance(header.get(key), dict) for key in ("config", "info")):
        raise ValueError(f"{path}: its header's config and info must be JSON objects")
    return header


def read_predictor_file(
    path: str | Path, kind: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, weights) of a predictor file that must hold a `kind` predictor."""
    header = read_predictor_header(path)
    if header.get("kind") != kind:
        raise ValueError(f"{path} holds a {header.get('kind')!r} predictor, not {kind!r}")
    with reading(path, "predictor"), safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    return header, state


def routing_dims(num_layers: int, num_experts: int, top_k: int, vocab_size: int) -> dict[str, int]:
    """What a predictor, a trace and a model must agree on."""
    return {
        "num_layers": num_layers,
        "num_experts": num_experts,
        "top_k": top_k,
        "vocab_size": vocab_size,
    }


def model_dims(model: ModelConfig) -> dict[str, int]:
    return routing_dims(len(model.moe_layers), model.num_experts, model.top_k, model.vocab_size)


def check_dims(what: str, have: dict[str, Any], wanted: dict[str, int], other: str) -> None:
    """A predictor or trace of one model is meaningless on another: compare the routing dims."""
    wrong = [f"{k}={have[k]} ({other}: {v})" for k, v in wanted.items() if have[k] != v]
    if wrong:
        raise ValueError(f"{what} belongs to another model: {', '.join(wrong)}")


def model_name(model: str) -> str:
    """How traces and predictors record their model: a folder by its resolved path, so that one
    folder reached by two relative paths is one model."""
    return str(Path(model).resolve()) if Path(model).is_dir() else model


def warn_if_other_model(what: str, recorded: Any, model: str) -> None:
    """Two models with the same routing dims pass `check_dims` yet route differently: a predictor
    or trace of another one is allowed (outputs never depend on the predictor), with a warning."""
    if isinstance(recorded, str) and model_name(recorded) != model_name(model):
        logger.warning(
            "%s was recorded on model %s, not %s: its routing may not match", what, recorded, model
        )
