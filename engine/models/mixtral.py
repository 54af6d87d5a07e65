"""Mixtral: experts under `block_sparse_moe`, named w1 (gate), w3 (up), w2 (down); top-k renormalised."""

from engine.models.family import FamilySpec

SPEC = FamilySpec(moe_attr="block_sparse_moe", gate_proj="w1", up_proj="w3", down_proj="w2")
