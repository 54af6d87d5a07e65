"""The engine's tokenizer, read from a local folder (the checkpoint's, or --tokenizer's)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from engine.config import ConfigError


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer in folder `path`, never looked up on the Hub: a path that is no folder was
    taken for a repo id (retried over the network for a minute when offline), and a folder without
    tokenizer files raised transformers' multi-line message that names neither folder nor flag."""
    if not Path(path).is_dir():
        raise ConfigError(f"tokenizer {path}: no such folder")
    try:
        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except StrictDataclassError:
            # config.json has a field transformers 5's config class refuses (Llama 4's releases:
            # attn_temperature_tuning=4), read only to pick the tokenizer: pick it without.
            config = PretrainedConfig()
            return AutoTokenizer.from_pretrained(path, local_files_only=True, config=config)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        lines = str(exc).strip().splitlines()
        reason = lines[0].rstrip(" :") if lines else type(exc).__name__
        raise ConfigError(
            f"tokenizer {path}: cannot load it ({reason}); give a folder with tokenizer.json "
            "(or a slow tokenizer's files) with --tokenizer"
        ) from exc
