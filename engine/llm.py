"""The offline API, like vLLM's: `LLM(model=..., **flags).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, TokenLogprob
from engine.progress import progress
from engine.sampling import RequestError, SamplingParams


@dataclass
class GenerationResult:
    """One prompt's result; `text`/`token_ids` are the first choice's, `outputs` has all n."""

    prompt: str | list[int]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with SamplingParams.prompt_logprobs
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI message as chat templates read it: `developer` is OpenAI's new name for
    `system`, and text content parts are one string (other parts are refused)."""
    content = message.get("content")
    if isinstance(content, list):
        if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            raise ValueError("only text content parts are supported")
        content = "\n".join(p["text"] for p in content)
    role = "system" if message.get("role") == "developer" else message.get("role")
    return {**message, "role": role, "content": "" if content is None else content}


Prompt = (
    str | list[int] | dict[str, Any]
)  # text, token ids, or vLLM's {"prompt"|"prompt_token_ids": ...}


def _unwrap(prompt: Prompt) -> str | list[int]:
    """A prompt's text or token ids; a vLLM-style dict gives exactly one of the two."""
    if not isinstance(prompt, dict):
        return prompt
    given = [key for key in ("prompt", "prompt_token_ids") if key in prompt]
    if len(given) != 1 or set(prompt) - {"prompt", "prompt_token_ids"}:
        raise ValueError(
            "a dict prompt takes exactly one of 'prompt' (text) and 'prompt_token_ids', "
            f"got keys {sorted(prompt)}"
        )
    return prompt[given[0]]


class LLM:
    def __init__(self, model: str | None = None, **flags: Any) -> None:
        if model is not None:
            flags["model"] = model
        unknown = set(flags) - set(EngineConfig.field_names())
        if unknown:
            raise TypeError(f"unknown LLM arguments: {', '.join(sorted(unknown))}")
        self.engine = LLMEngine(EngineConfig(**flags))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[GenerationResult]:
        """Run every prompt through continuous batching; results come back in prompt order.
        A prompt is text, token ids, or (as vLLM's TextPrompt / TokensPrompt) a dict with
        `prompt` or `prompt_token_ids`. `sampling_params` is one SamplingParams for all prompts
        or a list with one per prompt (as in vLLM). As in vLLM, a completion stops where the
        context ends (finish reason "length"); only a prompt that fills the context is refused."""
        if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        order: list[str] = []
        results: dict[str, GenerationResult] = {}
        try:
            for prompt, prompt_params in zip(prompts, params, strict=True):
                prompt = _unwrap(prompt)  # type: ignore[arg-type]
                ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
                request_id = f"offline-{next(self._ids)}"
                self.engine.add_request(request_id, ids, prompt_params, fit_to_context=True)
                order.append(request_id)
                results[request_id] = GenerationResult(prompt, ids, [])
        except Exception:
            for request_id in order:  # a refused prompt refuses the whole batch
                self.engine.abort(request_id)
            raise
        try:
            with progress(total=len(order), desc="generating", disable=not use_tqdm) as bar:
                while self.engine.has_unfinished():
                    for out in self.engine.step():
                        if out.error is not None:
                            raise RequestError(out.error)
                        if out.finished:
                            results[out.request_id].outputs = out.outputs
                            results[out.request_id].prompt_logprobs = out.prompt_logprobs
                            results[out.request_id].num_cached_tokens = out.num_cached_tokens
                            bar.update(1)
        except BaseException:  # a failed step, a request's error, ^C: the call's requests all go
            for request_id in order:  # (else the next call runs them and finds no result slot)
                self.engine.abort(request_id)
            raise
        return [results[r] for r in order]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[GenerationResult]:
        """vLLM's `LLM.chat`: one conversation (a list of OpenAI-style messages) or a list of
        them, each rendered by the checkpoint's chat template (or `chat_template`) and generated
        as `generate` does; the template writes its own special tokens. As on the server,
        `developer` is rendered as `system` and text content parts are joined."""
        if not messages:
            return []
        conversations = messages if isinstance(messages[0], list) else [messages]
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the model has no chat template: pass chat_template=...")
        prompts = []
        for conversation in conversations:
            if continue_final_message and conversation[-1].get("role") != "assistant":  # type: ignore[union-attr]
                raise ValueError(
                    "continue_final_message needs the last message to be the assistant's"
                )
            text = self.tokenizer.apply_chat_template(
                [_template_message(m) for m in conversation],  # type: ignore[arg-type]
                tools=tools,
                chat_template=chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}),
            )
            prompts.append(self.tokenizer.encode(text, add_special_tokens=False))
        return self.generate(prompts, sampling_params, use_tqdm)

    def offload_stats(self) -> dict[str, float]:
        """Expert cache and transfer statistics since start (keys in DESIGN §6)."""
        return self.engine.offload.stats()
