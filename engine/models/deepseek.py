"""DeepSeek-V2 / V3 (and their derivatives, e.g. Moonlight): latent attention (`mla.py`), experts under
`mlp` with ungated `shared_experts`, grouped routing (`router.py`), dense MLPs in the first layers.
The router's weight stays float32 in any serving dtype, as transformers keeps it."""

from engine.models.family import FamilySpec

SPEC = FamilySpec(
    moe_attr="mlp",
    gate_proj="gate_proj",
    up_proj="up_proj",
    down_proj="down_proj",
    float32_suffixes=(".mlp.gate.weight",),  # transformers' _keep_in_fp32_modules_strict
)
