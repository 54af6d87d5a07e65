"""kernels/moe_config.py: tuned tables chosen by nearest M, in-code defaults otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kernels.moe_config import (
    CONFIG_KEYS,
    config_file_name,
    default_config,
    get_config,
    save_table,
)

CPU = torch.device("cpu")


def tuned(block_m: int) -> dict[str, int]:
    return dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=2)


def test_file_name_names_shapes_device_and_dtype():
    name = config_file_name(2048, 768, 8, torch.bfloat16, "NVIDIA_H100_80GB_HBM3")
    assert name == "H=2048,I=768,k=8,device_name=NVIDIA_H100_80GB_HBM3,dtype=bfloat16.json"


def test_defaults_without_a_table(tmp_path: Path):
    for m in (1, 64, 4096):
        config = get_config(m, 70, 46, 2, torch.float32, CPU, config_dir=tmp_path)
        assert config == default_config(m) and set(config) == set(CONFIG_KEYS)
        assert min(config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]) >= 16  # tl.dot minimum


def test_nearest_tuned_m_wins(tmp_path: Path):
    path = tmp_path / config_file_name(70, 46, 2, torch.float32, "cpu")
    save_table({1: tuned(16), 64: tuned(32), 1024: tuned(128)}, path)
    assert list(json.loads(path.read_text())) == ["1", "64", "1024"]
    pick = {
        m: get_config(m, 70, 46, 2, torch.float32, CPU, tmp_path)["BLOCK_M"] for m in (1, 20, 40)
    }
    assert pick == {1: 16, 20: 16, 40: 32}
    assert get_config(5000, 70, 46, 2, torch.float32, CPU, tmp_path) == tuned(128)
    assert get_config(5, 70, 46, 4, torch.float32, CPU, tmp_path) == default_config(5)  # other k
