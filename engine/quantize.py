"""Block-wise FP8 copies of checkpoints (`expertflow quantize-fp8`), in the format of DeepSeek-V3's
and Qwen3's -FP8 releases, made from any supported 16 or 32-bit checkpoint (Mixtral, OLMoE, ...
have no such release). Every projection weight (the routed experts', and the attention's and
shared experts' `*_proj` and `*_proj_with_mqa`) becomes float8_e4m3fn with one float32 scale per
block; embeddings, norms, routers, gates and the LM head stay as they are, and are listed in
`modules_to_not_convert` so that transformers loads the copy too. Served, the routed experts then
stay FP8 on the host and over the link: half of bfloat16's bytes to hold and to copy.
`benchmarks/fp8_offload.py` measures what that saves and what the rounding costs.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from engine.checkpoint_fp8 import FP8_SCALE_SUFFIX
from engine.config import ConfigError
from engine.loader import safetensors_files
from engine.model_config import ModelConfig
from engine.models.model import FAMILIES
from engine.progress import progress
from kernels.fp8 import quantize_blocks

logger = logging.getLogger(__name__)
QUANTIZED_SUFFIXES = ("_proj.weight", "_proj_with_mqa.weight")


def quantize_checkpoint(source: Path, out: Path, block: tuple[int, int] = (128, 128)) -> int:
    """Writes the FP8 copy of checkpoint folder `source` to `out` (a new folder); returns the
    number of weights quantized."""
    cfg = ModelConfig.from_pretrained(source)  # refuses what we could not serve
    if cfg.fp8_block is not None or cfg.packed_int is not None:
        raise ConfigError(f"{source}: already quantized (block-wise FP8, GPTQ, AWQ or packed)")
    if out.exists():
        raise ConfigError(f"{out}: already exists")
    spec = FAMILIES[cfg.family]
    if spec.fused_experts:
        raise ConfigError(
            f"{source}: {cfg.family} checkpoints are not converted to FP8 (their experts are a "
            "tensor per layer); serve it with --expert-quantization fp8 instead"
        )
    parts = (spec.gate_proj, spec.up_proj, spec.down_proj)
    experts = {
        spec.expert_key(layer, e, part)
        for layer in cfg.moe_layers
        for e in range(cfg.num_experts)
        for part in parts
    }
    files = safetensors_files(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:  # written aside, renamed to `out` once whole: an interrupted run leaves no half a copy
        quantized = _write_fp8_copy(source, partial, files, experts, block)
        for path in [partial, *partial.rglob("*")]:  # readable by all, as a copied model is
            path.chmod(0o755 if path.is_dir() else 0o644)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("quantized %d weights of %s to FP8 in %s", quantized, source.name, out)
    return quantized


def _write_fp8_copy(
    source: Path, out: Path, files: list[Path], experts: set[str], block: tuple[int, int]
) -> int:
    """The copy's files into folder `out`; returns the number of weights quantized."""
    shutil.copytree(
        source,
        out,
        ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"),
        dirs_exist_ok=True,
    )
    weight_map, quantized, kept = {}, 0, set()
    for file in progress(files, desc="quantizing", unit="shard"):
        tensors = {}
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                tensor = f.get_tensor(key)
                matrix = tensor.dim() == 2 and key.endswith(".weight")
                if matrix and (key in experts or key.endswith(QUANTIZED_SUFFIXES)):
                    tensor, tensors[key + FP8_SCALE_SUFFIX] = quantize_blocks(tensor, block)
                    quantized += 1
                elif matrix:  # left as it is: router, gate, embeddings, LM head
                    kept.add(key.removesuffix(".weight"))
                tensors[key] = tensor
        save_file(tensors, out / file.name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file.name)
    if (source / "model.safetensors.index.json").is_file():
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        "modules_to_not_convert": sorted(kept),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return quantized
