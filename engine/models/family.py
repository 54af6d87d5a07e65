"""What differs between families on disk: where the MoE block lives and how expert weights are named."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

# A fused hub tensor (one per layer and part) -> our part of every expert of that layer.
Convert = Callable[[torch.Tensor], torch.Tensor]
# A hub tensor that fills rows of one of our fused weights: (hub module name, our module name,
# its rows there, the conversion of the hub tensor or None).
StackedPart = tuple[str, str, slice, Convert | None]


@dataclass(frozen=True)
class FamilySpec:
    moe_attr: str  # module name of the MoE block (and of a dense layer's MLP) in a decoder layer
    gate_proj: str = ""  # per-expert weight names on the hub: gate (w1), up (w3), down (w2)
    up_proj: str = ""
    down_proj: str = ""
    # Families that store each layer's experts as one tensor per part (gpt-oss): hub name under
    # `experts.` -> (our part name, its conversion); then the per-expert names are unused.
    fused_experts: Mapping[str, tuple[str, Convert]] = field(default_factory=dict)
    fused_mxfp4_experts: Mapping[str, tuple[str, Convert]] = field(default_factory=dict)  # same
    # Families whose releases come both ways (Qwen3.5) name both: the checkpoint's keys decide.
    hub_renames: tuple[tuple[str, str], ...] = ()  # hub key fragment -> ours
    ignored_prefixes: tuple[str, ...] = ()  # weights we do not serve: a vision tower, MTP layers
    shared_attr: str = "shared_experts"  # the shared experts' module name in the MoE block
    # Resident weights stored in another shape on the hub: key suffix -> conversion (ERNIE 4.5's
    # correction bias is [1, E])
    resident_converts: Mapping[str, Convert] = field(default_factory=dict)
    float32_suffixes: tuple[str, ...] = ()  # resident weights kept float32, as transformers does

    def expert_key(self, layer: int, expert: int, proj: str) -> str:
        return f"model.layers.{layer}.{self.moe_attr}.experts.{expert}.{proj}.weight"

    def fused_expert_key(self, layer: int, hub_part: str) -> str:
        return f"model.layers.{layer}.{self.moe_attr}.experts.{hub_part}"

    def our_key(self, hub_key: str) -> str:
        for hub, ours in self.hub_renames:
            hub_key = hub_key.replace(hub, ours)
        return hub_key
