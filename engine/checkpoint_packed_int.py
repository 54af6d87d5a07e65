"""GPTQ, AWQ and compressed-tensors' pack-quantized checkpoints as they lie on disk: each
quantized linear layer's integer weights packed 32 // bits to an int32, with a scale and an
integer zero point per group of `group_size` input channels. engine/loader.py dequantizes them
as they load, into the serving dtype, so every family and path serves them unchanged; 4-bit
routed experts in whole groups of consecutive channels are instead repacked into the host layout
of kernels/int4.py (`PackedWeights.keeps_packed`, `copy_grouped`) and stay 4-bit.

The formats differ in layout and names, not in arithmetic, w = (q - zero) * scale:
- GPTQ (AutoGPTQ, GPTQModel): `qweight` [in / p, out] packs input channels, value j of a word in
  bits j*b..j*b+b-1; `qzeros` [groups, out / p] packs output channels alike and, in the original
  ("gptq") checkpoint format, stores each zero point minus one ("gptq_v2" does not); `g_idx` [in]
  gives each input channel's group (act-order checkpoints permute them).
- AWQ (AutoAWQ's GEMM layout): `qweight` [in, out / 8] and `qzeros` [groups, out / 8] both pack
  output channels, interleaved: value j of a word is column AWQ_ORDER[j] of its eight; the groups
  are consecutive input channels.
- compressed-tensors' "pack-quantized" (llm-compressor's W4A16 releases, Kimi-K2-Thinking's
  experts): `weight_packed` [out, in / p] packs input channels as GPTQ's words do, the values
  stored plus 2^(bits-1); `weight_scale` [out, groups]; symmetric layers have no zero point (so
  2^(bits-1)), asymmetric ones a `weight_zero_point` [out / p, groups] packed along output
  channels, also stored plus 2^(bits-1) (so the two offsets cancel); `weight_g_idx` [in] where
  act-order permuted the groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine.config import ConfigError
from kernels.int4 import pack_int4

# method -> suffixes of (the packed weight, its zero points, scales, groups); the last three are
# read first (a shard may hold them apart from their weight), with compressed-tensors' shape
NAMES = {
    "gptq": (".qweight", ".qzeros", ".scales", ".g_idx"),
    "awq": (".qweight", ".qzeros", ".scales", ".g_idx"),
    "compressed-tensors": (
        ".weight_packed",
        ".weight_zero_point",
        ".weight_scale",
        ".weight_g_idx",
    ),
}
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ_ORDER[j]: the column word value j holds
AWQ_COLUMNS = tuple(AWQ_ORDER.index(c) for c in range(8))  # word value holding column c


@dataclass(frozen=True)
class PackedIntFormat:
    method: str  # "gptq", "awq" or "compressed-tensors"
    bits: int
    group_size: int  # input channels per scale; 0: one group for all of them (GPTQ's -1)
    # added to stored zero points (GPTQ's original format stores zero - 1); compressed-tensors:
    # the zero point of symmetric layers, which store none
    zero_offset: int

    @property
    def packed_suffix(self) -> str:
        return NAMES[self.method][0]

    @property
    def side_suffixes(self) -> tuple[str, ...]:
        extra = (".weight_shape",) if self.method == "compressed-tensors" else ()
        return (*NAMES[self.method][1:], *extra)


def packed_int_format(quant: dict[str, Any]) -> PackedIntFormat:
    """config.json's `quantization_config` of a GPTQ, AWQ or pack-quantized checkpoint -> its
    format; what we cannot read is refused by field."""
    method = quant.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors_format(quant)
    bits, group = quant.get("bits", quant.get("w_bit")), quant.get("group_size")
    group = quant.get("q_group_size") if group is None else group
    if method == "gptq":
        if bits not in (2, 4, 8):
            raise ConfigError(f"config.json: quantization_config.bits={bits!r}: GPTQ 2, 4 or 8")
        layout = quant.get("checkpoint_format") or "gptq"
        if layout not in ("gptq", "gptq_v2"):
            raise ConfigError(
                f"config.json: quantization_config.checkpoint_format={layout!r} is not supported "
                "(gptq or gptq_v2)"
            )
        offset = 1 if layout == "gptq" else 0
        if quant.get("is_marlin_format") or quant.get("dynamic"):
            raise ConfigError(
                "config.json: quantization_config: Marlin-repacked GPTQ weights and per-module "
                "`dynamic` overrides are not supported"
            )
    else:
        if bits != 4:
            raise ConfigError(f"config.json: quantization_config.bits={bits!r}: AWQ is 4-bit")
        version = str(quant.get("version") or "gemm").lower()
        if version != "gemm":
            raise ConfigError(
                f"config.json: quantization_config.version={version!r}: AWQ's gemm layout only"
            )
        if quant.get("zero_point") is False:
            raise ConfigError("config.json: quantization_config.zero_point=false is not supported")
        offset = 0
    if not isinstance(group, int) or group == 0 or group < -1 or (group == -1 and method == "awq"):
        raise ConfigError(f"config.json: quantization_config.group_size={group!r} is not supported")
    return PackedIntFormat(method, bits, max(group, 0), offset)


def _compressed_tensors_format(quant: dict[str, Any]) -> PackedIntFormat:
    """Every config group's weights must share one integer scheme (the `ignore`d layers are
    stored unquantized and load as such); activations stay unquantized (W4A16, W8A16)."""
    if quant.get("format") != "pack-quantized":
        raise ConfigError(
            f"config.json: quantization_config.format={quant.get('format')!r}: of "
            "compressed-tensors, only pack-quantized is supported"
        )
    groups = list((quant.get("config_groups") or {}).values())
    schemes = {
        (w.get("type"), w.get("num_bits"), w.get("strategy"), w.get("group_size"))
        for w in (g.get("weights") or {} for g in groups)
    }
    activations = [g.get(k) for g in groups for k in ("input_activations", "output_activations")]
    if len(schemes) != 1 or any(a is not None for a in activations):
        raise ConfigError(
            "config.json: quantization_config.config_groups: one integer weight scheme and "
            f"unquantized activations are supported, not {sorted(map(str, schemes))}"
        )
    [(kind, bits, strategy, group)] = schemes
    if kind != "int" or bits not in (2, 4, 8) or strategy not in ("group", "channel"):
        raise ConfigError(
            f"config.json: quantization_config.config_groups weights type={kind!r}, "
            f"num_bits={bits!r}, strategy={strategy!r}: int 2, 4 or 8-bit, group or channel"
        )
    if strategy == "group" and not (isinstance(group, int) and group > 0):
        raise ConfigError(f"config.json: quantization_config group_size={group!r}")
    offset = 1 << (bits - 1)  # values and zero points are stored plus this
    return PackedIntFormat("compressed-tensors", bits, group if strategy == "group" else 0, offset)


class PackedWeights:
    """A checkpoint's side tensors, read before its packed weights (1/16 of their bytes at
    128-channel groups), and each packed weight dequantized, or repacked, as it loads. Layers are
    named by their prefix as the model names them (`rename`: the family's hub -> ours)."""

    def __init__(
        self, fmt: PackedIntFormat, files: list[Path], rename: Callable[[str], str]
    ) -> None:
        self.fmt = fmt
        self.side: dict[str, torch.Tensor] = {}  # our key -> qzeros, scales or g_idx
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    if key.endswith(fmt.side_suffixes):
                        self.side[rename(key)] = f.get_tensor(key)
        scales = NAMES[fmt.method][2]
        self.packed = {k.removesuffix(scales) for k in self.side if k.endswith(scales)}

    def dequantize(self, prefix: str, qweight: torch.Tensor) -> torch.Tensor:
        """Layer `prefix`'s packed weight -> float32 [out, in]."""
        weight = dequantize_packed(prefix, qweight, self.side, self.fmt)
        self._forget(prefix)
        return weight

    def holds(self, prefix: str) -> bool:
        """Whether layer `prefix` is (or was) packed: its scales were read."""
        return prefix in self.packed

    def _forget(self, prefix: str) -> None:
        """Drop a landed layer's side tensors (10 GB of scales for a DeepSeek-V3 checkpoint)."""
        for suffix in self.fmt.side_suffixes:
            self.side.pop(prefix + suffix, None)

    def keeps_packed(self, prefixes: set[str], channels: tuple[int, ...]) -> torch.dtype | None:
        """Whether the linear layers `prefixes` (the routed experts, whose input channels are
        `channels`) can stay 4-bit on the host (kernels/int4.py): all packed in 4 bits, in whole
        groups of consecutive input channels (no act-order permutation). If so, the dtype their
        scales keep there (the checkpoint's); else None."""
        fmt = self.fmt
        _, _, scales, groups = NAMES[fmt.method]
        if fmt.bits != 4 or not fmt.group_size or any(c % fmt.group_size for c in channels):
            return None
        dtypes = set()
        for prefix in prefixes:
            if prefix + scales not in self.side:
                return None
            dtypes.add(self.side[prefix + scales].dtype)
            g_idx = self.side.get(prefix + groups)
            if g_idx is not None and fmt.method != "awq":
                ordered = torch.arange(g_idx.shape[0]) // fmt.group_size
                if not torch.equal(g_idx.long(), ordered):
                    return None
        return dtypes.pop() if len(dtypes) == 1 else torch.float32  # float32 holds both

    def copy_grouped(
        self, prefix: str, qweight: torch.Tensor, dest: dict[str, torch.Tensor]
    ) -> None:
        """A routed expert's `qweight` into its host rows, repacked (see `keeps_packed`):
        dest["weight"] [out, in/2] uint8, dest["scale"] [out, groups] (as `keeps_packed` says),
        dest["zero"] [out, groups] uint8."""
        q, zeros, scales, _ = integers(prefix, qweight, self.side, self.fmt)
        self._forget(prefix)
        weight = pack_int4(q.T)  # [out, in/2]
        for name, tensor in (("weight", weight), ("scale", scales.T), ("zero", zeros.T)):
            if tuple(tensor.shape) != tuple(dest[name].shape):
                raise ConfigError(
                    f"weight {prefix + self.fmt.packed_suffix!r}: its packed {name} has shape "
                    f"{tuple(tensor.shape)}, config implies {tuple(dest[name].shape)}"
                )
            dest[name].copy_(tensor)


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> int32 values, 32 // bits per word laid out along `dim` (0 or 1), the first
    in each word's lowest bits."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)  # [p]
    mask = (1 << bits) - 1
    if dim == 0:  # [n, m] -> [n, p, m] -> [n * p, m]
        values = words[:, None, :] >> shifts[None, :, None]
    else:  # [n, m] -> [n, m, p] -> [n, m * p]
        values = words[:, :, None] >> shifts[None, None, :]
    return (values & mask).flatten(dim, dim + 1)


def integers(
    prefix: str, packed: torch.Tensor, side: dict[str, torch.Tensor], fmt: PackedIntFormat
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The linear layer `prefix`'s packed weight and its side tensors -> its integers q [in, out],
    zero points [groups, out] (int32), scales [groups, out] (as stored) and the group of each
    input channel [in] (int64)."""
    packed_suffix, zeros_suffix, scales_suffix, groups_suffix = NAMES[fmt.method]
    zeros_key, scales_key = prefix + zeros_suffix, prefix + scales_suffix
    symmetric = fmt.method == "compressed-tensors" and zeros_key not in side
    if (zeros_key not in side and not symmetric) or scales_key not in side:
        raise ConfigError(
            f"weight {prefix + packed_suffix!r} has no {zeros_key!r} or {scales_key!r}"
        )
    for key, words in ((prefix + packed_suffix, packed), (zeros_key, side.get(zeros_key))):
        if words is not None and (words.dtype != torch.int32 or words.dim() != 2):
            raise ConfigError(f"{key!r} should be 2-D int32 words, not {words.dtype}")
    scales = side[scales_key]  # [groups, out]
    if fmt.method == "gptq":
        q = unpack(packed, fmt.bits, dim=0)  # [in, out]
        zeros = unpack(side[zeros_key], fmt.bits, dim=1) + fmt.zero_offset  # [groups, out]
    elif fmt.method == "awq":
        q = _awq_columns(unpack(packed, fmt.bits, dim=1))
        zeros = _awq_columns(unpack(side[zeros_key], fmt.bits, dim=1))
    else:  # stored [out, ...]: turned to [in, out] like the others
        shape = side.get(prefix + ".weight_shape")
        q = unpack(packed, fmt.bits, dim=1).T  # [in (padded to a word), out]
        if shape is not None:
            q = q[: int(shape[1])]
        scales = scales.T
        zeros = torch.full(scales.shape, fmt.zero_offset, dtype=torch.int32)  # signed 0
        if not symmetric:  # stored as values are: the offsets cancel
            words = side[zeros_key]  # [ceil(out / p), groups]
            if words.shape[0] != -(-q.shape[1] * fmt.bits // 32):
                raise ConfigError(f"{zeros_key!r} should pack {q.shape[1]} rows of zero points")
            zeros = unpack(words, fmt.bits, dim=0)[: q.shape[1]].T
    channels, out = q.shape
    group = fmt.group_size or channels
    g_idx = side.get(prefix + groups_suffix)
    if g_idx is None or fmt.method == "awq":
        g_idx = torch.arange(channels) // group
    groups = -(-channels // group)
    if (
        tuple(scales.shape) != (groups, out)
        or tuple(zeros.shape) != (groups, out)
        or tuple(g_idx.shape) != (channels,)
    ):
        raise ConfigError(
            f"{prefix!r}: {fmt.method} scales {tuple(scales.shape)}, zero points "
            f"{tuple(zeros.shape)} and group index {tuple(g_idx.shape)} do not fit a "
            f"{channels} x {out} weight in groups of {group}"
        )
    return q, zeros, scales, g_idx.long()


def dequantize_packed(
    prefix: str, qweight: torch.Tensor, side: dict[str, torch.Tensor], fmt: PackedIntFormat
) -> torch.Tensor:
    """The linear layer `prefix`'s packed weight -> float32 [out, in], as nn.Linear keeps it."""
    q, zeros, scales, g_idx = integers(prefix, qweight, side, fmt)
    return ((q - zeros[g_idx]).float() * scales.float()[g_idx]).T  # [out, in]


def _awq_columns(values: torch.Tensor) -> torch.Tensor:
    """[rows, out] values in AWQ's interleaved word order -> in column order."""
    rows, out = values.shape
    return values.view(rows, out // 8, 8)[:, :, list(AWQ_COLUMNS)].reshape(rows, out)
