"""gpt-oss: grouped-query attention with biases, a learned sink logit per head and a sliding
window on every other layer; a router with a bias; experts with biases and a clamped SwiGLU.

On the hub each layer's experts are one tensor per part, stored transposed ([E, in, out]) with
the gate and up columns interleaved (gate, up, gate, up, ...); they become our w13 [E, 2I, H]
(gate rows, then up rows), w2 [E, H, I] and biases b13 [E, 2I], b2 [E, H]; OpenAI's MXFP4
release stores w13 and w2 as blocks and scales, kept so on the host (kernels/mxfp4.py). The router is
`mlp.router` on the hub and `mlp.gate` here, as in every other family.
"""

from __future__ import annotations

import torch

from engine.models.family import FamilySpec


def gate_then_up(t: torch.Tensor) -> torch.Tensor:
    """[E, 2I, ...] with gate and up rows interleaved -> gate rows 0..I-1, up rows I..2I-1."""
    return torch.cat((t[:, 0::2], t[:, 1::2]), dim=1)


BIASES = {
    "gate_up_proj_bias": ("b13", gate_then_up),  # [E, 2I]
    "down_proj_bias": ("b2", lambda t: t),  # [E, H]
}
SPEC = FamilySpec(
    moe_attr="mlp",
    fused_experts={
        "gate_up_proj": ("w13", lambda t: gate_then_up(t.transpose(1, 2))),  # [E, H, 2I]
        "down_proj": ("w2", lambda t: t.transpose(1, 2)),  # [E, I, H]
        **BIASES,
    },
    fused_mxfp4_experts={  # OpenAI's release: MXFP4 blocks, already [E, out, in/32, 16]
        "gate_up_proj_blocks": ("w13", gate_then_up),  # [E, 2I, H/32, 16]
        "gate_up_proj_scales": ("w13_scale", gate_then_up),  # [E, 2I, H/32]
        "down_proj_blocks": ("w2", lambda t: t),  # [E, H, I/32, 16]
        "down_proj_scales": ("w2_scale", lambda t: t),  # [E, H, I/32]
        **BIASES,
    },
    hub_renames=((".mlp.router.", ".mlp.gate."),),
)
