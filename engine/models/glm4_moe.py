"""GLM-4.5 / 4.6 (`glm4_moe`): grouped-query attention with q/k/v biases, optional per-head q/k
norms and rotary over the leading half of each head; experts, shared experts and routing laid out
and computed as DeepSeek-V3's (`router.py`), the router's weight float32 as there; dense MLPs in
the first layers."""

from engine.models.family import FamilySpec

SPEC = FamilySpec(
    moe_attr="mlp",
    gate_proj="gate_proj",
    up_proj="up_proj",
    down_proj="down_proj",
    float32_suffixes=(".mlp.gate.weight",),  # transformers' _keep_in_fp32_modules_strict
)
