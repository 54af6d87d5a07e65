"""What differs between families on disk: where the MoE block lives and how expert weights are named."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilySpec:
    moe_attr: str  # module name of the MoE block inside a decoder layer
    gate_proj: str  # per-expert weight names on the hub: gate (w1), up (w3), down (w2)
    up_proj: str
    down_proj: str

    def expert_key(self, layer: int, expert: int, proj: str) -> str:
        return f"model.layers.{layer}.{self.moe_attr}.experts.{expert}.{proj}.weight"
