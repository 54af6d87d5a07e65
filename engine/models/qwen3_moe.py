"""Qwen3-MoE: per-head RMSNorm on q and k before rotary; top-k renormalised by default."""

from engine.models.family import FamilySpec

SPEC = FamilySpec(moe_attr="mlp", gate_proj="gate_proj", up_proj="up_proj", down_proj="down_proj")
