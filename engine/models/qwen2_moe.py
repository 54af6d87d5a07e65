"""Qwen2-MoE / Qwen1.5-MoE: q/k/v bias, a sigmoid-gated shared expert, optional dense layers."""

from engine.models.family import FamilySpec

SPEC = FamilySpec(
    moe_attr="mlp",
    gate_proj="gate_proj",
    up_proj="up_proj",
    down_proj="down_proj",
    shared_attr="shared_expert",
)
