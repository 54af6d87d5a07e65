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

from dataclasses import replace

from engine.models import qwen2_moe

QWEN3_NEXT = replace(qwen2_moe.SPEC, ignored_prefixes=("mtp.",))  # Qwen2-MoE's names
QWEN3_5_MOE = replace(
    QWEN3_NEXT,
    fused_experts={
        "gate_up_proj": ("w13", lambda t: t),  # [E, 2I, H]
        "down_proj": ("w2", lambda t: t),  # [E, H, I]
    },
    hub_renames=(("model.language_model.", "model."),),
    ignored_prefixes=("model.visual.", "mtp."),
)
