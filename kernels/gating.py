"""The gated activation between an expert's two GEMMs, shared by the torch and Triton paths."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Gating:
    """act(gate) * (up + up_offset), act(g) = g * sigmoid(alpha * g): SiLU at alpha 1 (every
    family but gpt-oss, the defaults). gpt-oss clamps gate to <= limit and up to +-limit first,
    with alpha 1.702 and up + 1."""

    alpha: float = 1.0
    limit: float | None = None
    up_offset: float = 0.0

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gate, up [n, I] -> [n, I]; may reuse gate's storage."""
        if self == SILU:
            return F.silu(gate).mul_(up)
        if self.limit is not None:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return gate * torch.sigmoid(gate * self.alpha) * (up + self.up_offset)


SILU = Gating()
