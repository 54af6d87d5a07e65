"""OLMoE: RMSNorm over the whole q and k projections (all heads at once), optional clip_qkv."""

from engine.models.family import FamilySpec

SPEC = FamilySpec(moe_attr="mlp", gate_proj="gate_proj", up_proj="up_proj", down_proj="down_proj")
