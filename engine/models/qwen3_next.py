"""Qwen3-Next and Qwen3.5-MoE: Gated DeltaNet linear attention on three layers in four
(engine/models/gated_delta.py), gated attention on the rest, Qwen2-MoE's gated shared expert.

Qwen3-Next's checkpoints name each expert's weights, as Qwen3-MoE's do. Qwen3.5's releases are
vision-language checkpoints: the text model's weights sit under `model.language_model.`, beside a
vision tower we do not serve; their experts are one tensor per layer and part, already ours
(gate_up_proj [E, 2I, H], gate rows first; down_proj [E, H, I]), while transformers' own
`save_pretrained` of the text model writes them per expert. Both load. Multi-token-prediction
weights (`mtp.`) are skipped, as transformers does.
"""

from __future__ import annotations

from engine.models.family import FamilySpec

PER_EXPERT = dict(
    moe_attr="mlp",
    gate_proj="gate_proj",
    up_proj="up_proj",
    down_proj="down_proj",
    shared_attr="shared_expert",
)
QWEN3_NEXT = FamilySpec(**PER_EXPERT, ignored_prefixes=("mtp.",))
QWEN3_5_MOE = FamilySpec(
    **PER_EXPERT,
    fused_experts={
        "gate_up_proj": ("w13", lambda t: t),  # [E, 2I, H]
        "down_proj": ("w2", lambda t: t),  # [E, H, I]
    },
    hub_renames=(("model.language_model.", "model."),),
    ignored_prefixes=("model.visual.", "mtp."),
)
