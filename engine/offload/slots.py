"""SlotPool: the device tensors that hold cached experts, one row per slot in the layout the kernel
reads, and how an expert's stored parts land in a row. Which expert sits in which slot, and when
one is evicted, is the ExpertCache's business (engine/offload/cache.py)."""

from __future__ import annotations

import torch

import kernels
from engine.offload.policy import Key
from engine.offload.store import ExpertStore
from engine.offload.transfer import Transfer, TransferEngine
from kernels.gating import Gating


class SlotPool:
    def __init__(self, store: ExpertStore, num_slots: int, device: torch.device) -> None:
        self.store, self.num_slots, self.device = store, num_slots, device
        # part name -> [S, ...]: w13 [S, 2I, H], w2 [S, H, I] (and gpt-oss's b13 [S, 2I], b2 [S, H];
        # packed MXFP4: w13 and w2 as blocks, with their scales)
        self.parts = {
            name: torch.empty((num_slots, *shape), dtype=dtype, device=device)
            for name, (shape, dtype) in store.slot_layout.items()
        }

    @property
    def w13(self) -> torch.Tensor:
        return self.parts["w13"]

    @property
    def w2(self) -> torch.Tensor:
        return self.parts["w2"]

    @property
    def kernel_extras(self) -> dict[str, torch.Tensor]:
        """The slot parts besides w13 and w2, by the names `fused_moe` takes them: biases (b13,
        b2), packed MXFP4's scales (w13_scale, w2_scale) and packed 4-bit zero points (w13_zero,
        w2_zero), where the experts have them."""
        return {name: t for name, t in self.parts.items() if name not in ("w13", "w2")}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts.values())

    def run(
        self,
        hidden: torch.Tensor,
        weights: torch.Tensor,
        slot_ids: torch.Tensor,
        gating: Gating,
        float32: bool = False,
    ) -> torch.Tensor:
        """hidden [T, H] through the experts in slots `slot_ids` [T, k], weighed by `weights`
        [T, k], in one kernel call -> [T, H]: in hidden's dtype, or unrounded float32 for a
        layer added up over several calls."""
        out = (
            torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
            if float32
            else None
        )
        return kernels.fused_moe(
            hidden,
            self.w13,
            self.w2,
            weights,
            slot_ids,
            out=out,
            gating=gating,
            **self.kernel_extras,
        )

    def load_now(self, key: Key, slot: int) -> None:
        """Copy `key` into `slot` before serving (quantized experts decoded on the device, as
        copies are)."""
        host = self.store.expert(*key)
        self.fill(slot, {name: t.to(self.device) for name, t in host.items()})

    def copy_in(self, key: Key, slot: int, transfers: TransferEngine, priority: int) -> Transfer:
        """Queue the copy of `key` into `slot`. FP8 experts cross the link as they are stored (half
        of bfloat16's bytes) into a staging buffer and are dequantized into the slot as they land,
        on the copy's own stream or worker: the kernel always reads the compute dtype."""
        host = self.store.expert(*key)
        if not self.store.quantized:
            pairs = [(self.parts[name][slot], t) for name, t in host.items()]
            return transfers.submit(pairs, priority)
        staging = {name: torch.empty_like(t, device=self.device) for name, t in host.items()}
        pairs = [(staging[name], t) for name, t in host.items()]
        return transfers.submit(pairs, priority, lambda: self.fill(slot, staging))

    def fill(self, slot: int, parts: dict[str, torch.Tensor]) -> None:
        """One expert's stored parts, on the device -> the slot, as it holds them."""
        for name, part in self.store.to_slot(parts).items():
            self.parts[name][slot].copy_(part)
