"""MiniMax-M2: grouped-query attention with q/k norms over all heads and partial rotary;
Mixtral's expert layout (w1 gate, w3 up, w2 down) with a sigmoid router whose correction bias
sits beside the router on the hub (`block_sparse_moe.e_score_correction_bias`) and inside it here.
"""

from engine.models.family import FamilySpec

SPEC = FamilySpec(
    moe_attr="block_sparse_moe",
    gate_proj="w1",
    up_proj="w3",
    down_proj="w2",
    hub_renames=(
        (
            ".block_sparse_moe.e_score_correction_bias",
            ".block_sparse_moe.gate.e_score_correction_bias",
        ),
    ),
)
