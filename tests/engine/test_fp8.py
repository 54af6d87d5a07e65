"""Block-wise FP8 checkpoints (DeepSeek-V3's format, Qwen3's -FP8 releases) load dequantized: the
same model as a float32 checkpoint holding the values the FP8 one represents, as transformers'
own dequantization computes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.finegrained_fp8 import Fp8Dequantize

from engine import LLM, ConfigError, SamplingParams, quantize
from engine.checkpoint_fp8 import dequantize_fp8
from kernels import fp8 as fp8_kernels
from kernels.fp8 import dequantize_blocks, widen
from server.cli import main
from tests.conftest import save_tiny_checkpoint

BLOCK = (8, 8)
PROMPTS = [[1, 17, 99, 240, 5], [1, *range(40, 75)]]


def dequantized(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """transformers' dequantization where it applies (whole blocks), else ours."""
    if q.shape[0] % block[0] or q.shape[1] % block[1]:
        return dequantize_blocks(q, scale, block)
    return Fp8Dequantize(None)._dequantize_one(q, scale, torch.float32)


def fp8_and_reference(
    source: Path, tmp_path: Path, block: tuple[int, int] = BLOCK
) -> tuple[Path, Path]:
    """An FP8 copy of `source` made by `expertflow quantize-fp8` (every projection quantized), and
    a float32 copy of the values it holds, dequantized by transformers."""
    fp8, reference = tmp_path / "fp8", tmp_path / "reference"
    assert (
        main(
            ["quantize-fp8", "--model", str(source), "--out", str(fp8), "--block", *map(str, block)]
        )
        == 0
    )
    shutil.copytree(source, reference)
    original, quantized = (
        load_file(source / "model.safetensors"),
        load_file(fp8 / "model.safetensors"),
    )
    weights = {
        key: dequantized(q, quantized[key + "_scale_inv"], block)
        if q.dtype == torch.float8_e4m3fn
        else q
        for key, q in quantized.items()
        if not key.endswith("_scale_inv")
    }
    assert weights.keys() == original.keys()
    assert any(not torch.equal(weights[k], original[k]) for k in original)  # it rounded
    save_file(weights, reference / "model.safetensors", metadata={"format": "pt"})
    return fp8, reference


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_fp8_checkpoints_load_as_their_dequantized_values(family: str, tmp_path: Path) -> None:
    fp8, reference = fp8_and_reference(save_tiny_checkpoint(family, tmp_path / "src"), tmp_path)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    ours, theirs = (
        LLM(model=str(p), max_model_len=64).generate(PROMPTS, params) for p in (fp8, reference)
    )
    for a, b in zip(ours, theirs, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [e and e.logprob for e in a.prompt_logprobs] == [
            e and e.logprob for e in b.prompt_logprobs
        ]


@pytest.mark.parametrize("chunk", [1 << 20, 7], ids=["one-lookup", "uneven-chunks"])
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_widening_through_a_table_gives_torchs_values(
    fp8: torch.dtype, dtype: torch.dtype, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every byte of each format, shaped [16, 4, 4], as torch converts it (NaNs stay NaN)."""
    monkeypatch.setattr(fp8_kernels, "WIDEN_CHUNK", chunk)
    every = torch.arange(256, dtype=torch.uint8).view(fp8).view(16, 4, 4)
    ours, theirs = widen(every, dtype), every.to(dtype)
    assert ours.dtype == dtype and ours.shape == theirs.shape
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())


def test_partial_blocks_at_the_edges() -> None:
    """Dimensions that are not multiples of the block (DeepSeek-V3's 576-row kv_a_proj at 128)."""
    weight = torch.randn(10, 13).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 4) + 0.5  # ceil(10/4), ceil(13/4)
    out = dequantize_fp8("w.weight", weight, {"w.weight_scale_inv": scale}, (4, 4))
    expected = torch.stack(
        [
            torch.stack([weight[r, c].float() * scale[r // 4, c // 4] for c in range(13)])
            for r in range(10)
        ]
    )
    assert torch.equal(out, expected)


def test_bad_fp8_checkpoints_are_named(tmp_path: Path) -> None:
    fp8, _ = fp8_and_reference(save_tiny_checkpoint("qwen3_moe", tmp_path / "src"), tmp_path)
    weights = load_file(fp8 / "model.safetensors")
    key = next(k for k in weights if k.endswith("o_proj.weight"))
    scale = weights.pop(key + "_scale_inv")
    save_file(weights, fp8 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=f"has no '{key}_scale_inv'"):
        LLM(model=str(fp8), max_model_len=64)
    weights[key + "_scale_inv"] = scale[:1]
    save_file(weights, fp8 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="blocks of a"):
        LLM(model=str(fp8), max_model_len=64)
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (fp8 / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="quant_method='bitsandbytes'"):
        LLM(model=str(fp8), max_model_len=64)
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (fp8 / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="weight_block_size=None"):
        LLM(model=str(fp8), max_model_len=64)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "offload",
    [
        {},
        {"expert_cache_ratio": 0.5, "predictor": "pregate", "cache_policy": "expertflow"},
        {"expert_cache_ratio": 0.25, "resident_first": True},
        {"expert_cache_ratio": 0.25, "cpu_expert_compute": True},
    ],
    ids=["resident", "offloaded-prefetched", "resident-first", "host-computed"],
)
def test_fp8_experts_stay_fp8_and_change_no_output(
    offload: dict, dtype: str, tmp_path: Path
) -> None:
    """The experts stay FP8 on the host and over the link (a quarter of float32's bytes, scales
    included) and are dequantized as they land: outputs equal the dequantized checkpoint's."""
    fp8, reference = fp8_and_reference(
        save_tiny_checkpoint("qwen3_moe", tmp_path / "src"), tmp_path
    )
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    llms = [LLM(model=str(p), max_model_len=64, dtype=dtype, **offload) for p in (fp8, reference)]
    stores = [llm.engine.offload.store for llm in llms]
    layer = stores[0].layers[0]
    assert (
        stores[0].parts[layer]["w13"].dtype == torch.float8_e4m3fn and stores[0].fp8_block == BLOCK
    )
    assert stores[0].expert_bytes < stores[1].expert_bytes / (3.5 if dtype == "float32" else 1.7)
    assert (
        llms[0].engine.offload.cache.slots.w13.dtype == llms[1].engine.offload.cache.slots.w13.dtype
    )
    ours, theirs = (llm.generate(PROMPTS, params) for llm in llms)
    # The host computes a missing expert when measured quicker than the link: a timing-dependent
    # choice that splits a layer's sum differently, so there logprobs agree to rounding only.
    tolerance = 1e-4 if offload.get("cpu_expert_compute") else 0.0
    for a, b in zip(ours, theirs, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert abs(x.logprob - y.logprob) <= tolerance
    stats = [llm.offload_stats() for llm in llms]
    if offload:
        assert stats[0]["transfers"] > 0
        assert stats[0]["transfer_bytes"] == stats[0]["transfers"] * stores[0].expert_bytes


def test_fp8_experts_fall_back_to_dequantizing_at_load(tmp_path: Path) -> None:
    """Experts stay FP8 only when all of them can: not with --no-fp8-experts, nor when blocks of
    24 rows would mix gate and up rows (I = 32), nor when one expert is not FP8. Outputs do not
    change."""
    source = save_tiny_checkpoint("qwen3_moe", tmp_path / "src")
    fp8, reference = fp8_and_reference(source, tmp_path / "a")
    straddling, _ = fp8_and_reference(source, tmp_path / "b", block=(24, 8))
    partly = tmp_path / "partly"
    shutil.copytree(fp8, partly)
    weights = load_file(partly / "model.safetensors")
    key = next(k for k in weights if k.endswith(".experts.3.down_proj.weight"))
    weights[key] = load_file(reference / "model.safetensors")[key]  # dequantized, no scale
    del weights[key + "_scale_inv"]
    save_file(weights, partly / "model.safetensors", metadata={"format": "pt"})
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = LLM(model=str(reference), max_model_len=64).generate(PROMPTS, params)
    for path, flags in ((fp8, {"fp8_experts": False}), (straddling, {}), (partly, {})):
        llm = LLM(model=str(path), max_model_len=64, expert_cache_ratio=0.5, **flags)
        assert llm.engine.offload.store.fp8_block is None
        if path != straddling:  # other blocks, other values
            outs = llm.generate(PROMPTS, params)
            assert [o.token_ids for o in outs] == [o.token_ids for o in expected]


def test_quantize_fp8_keeps_shards_and_refuses_to_overwrite(tmp_path: Path) -> None:
    """A sharded checkpoint stays sharded, each scale beside its weight in the index; an FP8
    checkpoint or an existing folder is refused."""
    source = save_tiny_checkpoint("mixtral", tmp_path / "src")
    weights = load_file(source / "model.safetensors")
    (source / "model.safetensors").unlink()
    keys = sorted(weights)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for name, part in shards.items():
        save_file({k: weights[k] for k in part}, source / name, metadata={"format": "pt"})
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    fp8 = tmp_path / "fp8"
    assert (
        main(["quantize-fp8", "--model", str(source), "--out", str(fp8), "--block", "8", "8"]) == 0
    )
    weight_map = json.loads((fp8 / "model.safetensors.index.json").read_text())["weight_map"]
    scaled = [k for k in weight_map if k.endswith("_scale_inv")]
    assert scaled and all(weight_map[k] == weight_map[k.removesuffix("_scale_inv")] for k in scaled)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert len(LLM(model=str(fp8), max_model_len=64).generate(PROMPTS, params)) == 2
    assert main(["quantize-fp8", "--model", str(source), "--out", str(fp8)]) == 2  # exists
    again = ["quantize-fp8", "--model", str(fp8), "--out", str(tmp_path / "twice")]
    assert main(again) == 2  # already FP8


def test_quantize_fp8_refuses_an_out_it_cannot_make_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An --out under a file (its folder cannot be made) raised FileExistsError with a
    traceback, exit 1; it is one line naming --out, exit 2."""
    source = save_tiny_checkpoint("mixtral", tmp_path / "src")
    out = source / "config.json" / "fp8"
    assert main(["quantize-fp8", "--model", str(source), "--out", str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"--out {out}" in errors[0]


def test_an_interrupted_quantize_fp8_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written aside and renamed once whole: an interrupted run leaves neither the output folder
    (which a rerun would refuse, and a server would half-load) nor its partial copy; a whole one
    is readable by all, as the Docker image's user needs."""
    source, fp8 = save_tiny_checkpoint("mixtral", tmp_path / "src"), tmp_path / "out" / "fp8"

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(quantize, "save_file", interrupted)
        with pytest.raises(KeyboardInterrupt):
            main(["quantize-fp8", "--model", str(source), "--out", str(fp8), "--block", "8", "8"])
    assert list(fp8.parent.iterdir()) == []
    assert main(["quantize-fp8", "--model", str(source), "--out", str(fp8)]) == 0
    assert {p.stat().st_mode & 0o777 for p in fp8.iterdir()} == {0o644}


def test_quantize_fp8_names_what_it_kept(tmp_path: Path) -> None:
    """DeepSeek's kv_a_proj_with_mqa is quantized, as in DeepSeek's own release; every matrix left
    as it is (routers, embeddings, the LM head) is listed for transformers' FP8 loader."""
    source = save_tiny_checkpoint("deepseek_v3", tmp_path / "src")
    fp8 = tmp_path / "fp8"
    assert (
        main(["quantize-fp8", "--model", str(source), "--out", str(fp8), "--block", "8", "8"]) == 0
    )
    weights = load_file(fp8 / "model.safetensors")
    assert (
        weights["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.float8_e4m3fn
    )
    kept = json.loads((fp8 / "config.json").read_text())["quantization_config"][
        "modules_to_not_convert"
    ]
    assert {"lm_head", "model.embed_tokens", "model.layers.1.mlp.gate"} <= set(kept)
    floats = {
        k.removesuffix(".weight")
        for k, t in weights.items()
        if t.dim() == 2 and t.dtype != torch.float8_e4m3fn and not k.endswith("_scale_inv")
    }
    assert floats == set(kept)
