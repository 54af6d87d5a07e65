"""The decoder every supported family shares; family files only say where weights live on disk."""

from __future__ import annotations

import torch
from torch import nn

from engine.attention import AttentionBatch
from engine.model_config import ModelConfig
from engine.models import (
    deepseek,
    ernie,
    glm4_moe,
    gpt_oss,
    llama4,
    minimax_m2,
    mixtral,
    olmoe,
    qwen2_moe,
    qwen3_moe,
    qwen3_next,
)
from engine.models.family import FamilySpec
from engine.models.gated_delta import GatedDeltaNet
from engine.models.layers import (
    MLP,
    Attention,
    MoEBlock,
    PositionTables,
    RMSNorm,
    Rotary,
    RoutedExperts,
    RoutingObserver,
)
from engine.models.mla import MLAttention

FAMILIES: dict[str, FamilySpec] = {
    "mixtral": mixtral.SPEC,
    "qwen2_moe": qwen2_moe.SPEC,
    "qwen3_moe": qwen3_moe.SPEC,
    "olmoe": olmoe.SPEC,
    "deepseek_v2": deepseek.SPEC,
    "deepseek_v3": deepseek.SPEC,
    "glm4_moe_lite": deepseek.SPEC,
    "glm4_moe": glm4_moe.SPEC,
    "gpt_oss": gpt_oss.SPEC,
    "minimax_m2": minimax_m2.SPEC,
    "qwen3_next": qwen3_next.QWEN3_NEXT,
    "qwen3_5_moe": qwen3_next.QWEN3_5_MOE,
    "llama4": llama4.SPEC,
    "ernie4_5_moe": ernie.SPEC,
}


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, spec: FamilySpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.linear = cfg.linear_attention is not None and layer in cfg.linear_attention.layers
        if self.linear:  # Qwen3-Next: no KV cache, a recurrent state per sequence
            self.linear_attn = GatedDeltaNet(cfg, layer)
        else:
            self.self_attn = MLAttention(cfg, layer) if cfg.mla else Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.moe_attr = spec.moe_attr
        if layer in cfg.dense_layers:
            setattr(self, spec.moe_attr, MLP(cfg.hidden_size, cfg.dense_intermediate_size))
        else:
            setattr(self, spec.moe_attr, MoEBlock(cfg, layer, spec.shared_attr))

    @property
    def ffn(self) -> nn.Module:
        return getattr(self, self.moe_attr)

    def forward(
        self,
        x: torch.Tensor,
        rope: PositionTables,
        batch: AttentionBatch,
        experts: RoutedExperts,
        observer: RoutingObserver | None,
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + (self.linear_attn(h, batch) if self.linear else self.self_attn(h, rope, batch))
        h = self.post_attention_layernorm(x)
        ffn = self.ffn
        return x + (ffn(h, experts, x, observer) if isinstance(ffn, MoEBlock) else ffn(h))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: FamilySpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, spec) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MoECausalLM(nn.Module):
    """Embeddings, decoder layers and LM head; routed experts are called through `experts`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.spec = FAMILIES[cfg.family]
        self.model = Decoder(cfg, self.spec)
        self.rotary = Rotary(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        experts: RoutedExperts,
        observer: RoutingObserver | None = None,
    ) -> torch.Tensor:
        """input_ids/positions [T] -> final hidden states [T, H]."""
        x = self.model.embed_tokens(input_ids)  # [T, H]
        rope = self.rotary(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, rope, batch, experts, observer)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] -> float32 logits [B, V]."""
        return self.lm_head(hidden).float()
