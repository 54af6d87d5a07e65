"""GPTQ, AWQ and compressed-tensors checkpoints written for tests and benchmarks, word by word
from the formats' definitions (AutoGPTQ's, AutoAWQ's and compressed-tensors' packers), not by the
loader's code: a packed copy of a float checkpoint and a float32 copy of the values it holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's packer: word value j <- column order[j]


def words(values: torch.Tensor, bits: int, along: int, order: tuple[int, ...] = ()) -> torch.Tensor:
    """Pack int values [n, m] 32 // bits to an int32 along dim `along`, value j of each word in
    bits j*bits.., taking element order[j] of each run of 32 // bits (default: element j)."""
    per_word = 32 // bits
    order = order or tuple(range(per_word))
    values = values.long() if along == 0 else values.long().T
    packed = torch.zeros(values.shape[0] // per_word, values.shape[1], dtype=torch.long)
    for j in range(per_word):
        packed |= values[order[j] :: per_word] << (bits * j)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
    return packed if along == 0 else packed.T.contiguous()


def quantize(
    weight: torch.Tensor,
    bits: int,
    group_of: torch.Tensor,
    groups: int,
    min_zero: int,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] -> q [in, out], zeros [groups, out], float16 scales [groups, out], and
    the float32 values they represent [out, in]; input channel i is in group group_of[i].
    `symmetric`: every zero point is 2^(bits-1), the middle of the range."""
    top = (1 << bits) - 1
    w = weight.T.float()  # [in, out]
    lo = torch.stack([w[group_of == g].amin(0) for g in range(groups)]).clamp(max=0)
    hi = torch.stack([w[group_of == g].amax(0) for g in range(groups)]).clamp(min=0)
    if symmetric:
        lo, hi = -torch.maximum(-lo, hi), torch.maximum(-lo, hi)
    scales = ((hi - lo) / top).clamp_min(1e-6).half()  # [groups, out]
    zeros = torch.round(-lo / scales.float()).clamp(min_zero, top).long()
    if symmetric:
        zeros = torch.full_like(zeros, 1 << (bits - 1))
    q = (torch.round(w / scales.float()[group_of]) + zeros[group_of]).clamp(0, top).long()
    values = ((q - zeros[group_of]).float() * scales.float()[group_of]).T
    return q, zeros, scales, values


LINEAR = ("_proj.weight", "_mqa.weight", ".w1.weight", ".w2.weight", ".w3.weight", "lm_head.weight")


def quantized_names(tensors: dict[str, torch.Tensor], group: int) -> list[str]:
    """Every projection and expert weight (not the routers, norms or embeddings), and the LM
    head, as GPTQ and AWQ quantize them; with `group` > 0, those of whole groups only."""
    return [
        k
        for k, t in tensors.items()
        if k.endswith(LINEAR)
        and t.dim() == 2
        and t.shape[0] % 8 == 0
        and (group < 1 or t.shape[1] % group == 0)
    ]


def packed_and_reference(
    source: Path,
    tmp_path: Path,
    method: str,
    group: int,
    act_order: bool = False,
    bits: int = 4,
    symmetric: bool = False,
    layout: str = "gptq",
) -> tuple[Path, Path]:
    """A GPTQ (`layout`: "gptq" stores zero points minus one, "gptq_v2" does not), AWQ (GEMM,
    4-bit) or compressed-tensors (pack-quantized) copy of `source`, and a float32 copy of the
    values it holds. GPTQ's `group` may be -1 (one group a layer) or leave a partial last group."""
    packed_dir, reference = tmp_path / method, tmp_path / "reference"
    shutil.copytree(source, packed_dir)
    shutil.copytree(source, reference)
    tensors = load_file(source / "model.safetensors")
    out, values = {}, dict(tensors)
    generator = torch.Generator().manual_seed(0)
    for name in quantized_names(tensors, group if method != "gptq" else 0):
        channels = tensors[name].shape[1]
        size = channels if group == -1 else group
        group_of = torch.arange(channels) // size
        if act_order:  # channels quantized in a permuted order: groups are not contiguous
            group_of = group_of[torch.randperm(channels, generator=generator)]
        q, zeros, scales, values[name] = quantize(
            tensors[name], bits, group_of, -(-channels // size), int(method == "gptq"), symmetric
        )
        prefix = name.removesuffix(".weight")
        if method == "gptq":
            out[prefix + ".qweight"] = words(q, bits, along=0)
            out[prefix + ".qzeros"] = words(zeros - int(layout == "gptq"), bits, along=1)
            out[prefix + ".g_idx"] = group_of.to(torch.int32)
            out[prefix + ".scales"] = scales
        elif method == "awq":
            out[prefix + ".qweight"] = words(q, 4, along=1, order=AWQ_PACK_ORDER)
            out[prefix + ".qzeros"] = words(zeros, 4, along=1, order=AWQ_PACK_ORDER)
            out[prefix + ".scales"] = scales
        else:  # [out, ...]: values and zero points stored as the signed q - 2^(bits-1), plus it
            out[prefix + ".weight_packed"] = words(q.T, bits, along=1)
            scales = scales.to(torch.bfloat16)  # as llm-compressor writes them
            values[name] = ((q - zeros[group_of]).float() * scales.float()[group_of]).T
            out[prefix + ".weight_scale"] = scales.T.contiguous()
            out[prefix + ".weight_shape"] = torch.tensor(tensors[name].shape)
            if not symmetric:
                out[prefix + ".weight_zero_point"] = words(zeros.T, bits, along=0)
            if act_order:
                out[prefix + ".weight_g_idx"] = group_of.to(torch.int32)
        del tensors[name]
    assert len(out) > 10
    save_file({**tensors, **out}, packed_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(values, reference / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    scheme = {"type": "int", "num_bits": bits, "strategy": "group", "group_size": group}
    config["quantization_config"] = {
        "gptq": {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group,
            "desc_act": act_order,
            "checkpoint_format": layout,
        },
        "awq": {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm"},
        "compressed-tensors": {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {**scheme, "symmetric": symmetric},
                    "input_activations": None,
                }
            },
            "ignore": [],
        },
    }[method]
    (packed_dir / "config.json").write_text(json.dumps(config))
    return packed_dir, reference
