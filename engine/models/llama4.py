"""Llama 4 (Scout, Maverick): see engine/llama4_config.py for the architecture.

Each layer's experts are one tensor per part on the hub, stored [E, in, out] with gate columns
before up columns: gate_up_proj [E, H, 2I] becomes our w13 [E, 2I, H], down_proj [E, I, H] our w2
[E, H, I]. The router is `feed_forward.router` on the hub and `feed_forward.gate` here, as in
every other family. Meta's releases are vision-language checkpoints: the text model sits under
`language_model.`, beside a vision tower and projector we do not serve.
"""

from __future__ import annotations

import torch

from engine.models.family import FamilySpec


def transposed(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


SPEC = FamilySpec(
    moe_attr="feed_forward",
    fused_experts={"gate_up_proj": ("w13", transposed), "down_proj": ("w2", transposed)},
    hub_renames=(
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        (".feed_forward.router.", ".feed_forward.gate."),
    ),
    ignored_prefixes=("vision_model.", "multi_modal_projector."),
    shared_attr="shared_expert",
)
