"""ExpertFlow's engine: offline `LLM`, server-side `AsyncLLM`, and their configs."""

from engine.async_llm import AsyncLLM
from engine.config import ConfigError, EngineConfig
from engine.llm import LLM
from engine.model_config import ModelConfig
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling import GuidedDecoding, RequestError, SamplingParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "ConfigError",
    "CompletionOutput",
    "EngineConfig",
    "GuidedDecoding",
    "ModelConfig",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
]
