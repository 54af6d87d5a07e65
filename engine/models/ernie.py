"""ERNIE 4.5 MoE: see engine/ernie_config.py for the architecture.

Its experts are named per expert as Qwen2-MoE's are. The router's correction bias sits beside
the router on the hub (`mlp.moe_statics.e_score_correction_bias`, [1, E]) and in it here ([E]),
as DeepSeek-V3's does; the router stays float32 in any serving dtype, as in transformers.
Multi-token-prediction weights (`mtp`) are skipped, as transformers does.
"""

from __future__ import annotations

from engine.models.family import FamilySpec

SPEC = FamilySpec(
    moe_attr="mlp",
    gate_proj="gate_proj",
    up_proj="up_proj",
    down_proj="down_proj",
    hub_renames=((".mlp.moe_statics.", ".mlp.gate."),),
    ignored_prefixes=("mtp", "model.mtp"),
    resident_converts={"e_score_correction_bias": lambda t: t.reshape(-1)},
    float32_suffixes=(".mlp.gate.weight",),  # the router, float32 whatever the serving dtype
)
