"""Turns last-position logits into next tokens: penalties, logit bias, a structured output's
grammar, temperature, min-p/top-k/top-p, seeded draws."""

from __future__ import annotations

import torch

from engine.guided import mask_disallowed
from engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """OpenAI presence/frequency penalties over each sequence's generated tokens; the repetition
    penalty (vLLM, transformers) over its prompt and generated tokens; and, below min_tokens, no
    stop token. logits [B, V]."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(seq.token_ids, device=logits.device).unique()
            values = logits[row, seen]
            # Kept in the logits' normal range, where it never rounds to 0 or inf (1e-300 did:
            # x / 0; 1e300 made a zero logit 0 * inf, NaN). A positive logit may still
            # overflow to +inf, which `probabilities` reads as its limit.
            finfo = torch.finfo(logits.dtype)
            penalty = min(max(p.repetition_penalty, finfo.tiny), finfo.max)
            logits[row, seen] = torch.where(values > 0, values / penalty, values * penalty)
        if len(seq.output_token_ids) < p.min_tokens and seq.stop_token_ids:
            logits[row, list(seq.stop_token_ids)] = float("-inf")
        if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
            ids, counts = torch.tensor(seq.output_token_ids, device=logits.device).unique(
                return_counts=True
            )
            logits[row, ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
    return logits


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """OpenAI logit_bias: each request's per-token bias added to its row before sampling. logits [B, V]."""
    for row, seq in enumerate(seqs):
        bias = seq.params.logit_bias
        if bias and seq.logit_bias is None:
            ids = torch.tensor(list(bias), device=logits.device)
            seq.logit_bias = ids, torch.tensor(list(bias.values()), device=logits.device)
        if seq.logit_bias is not None:
            ids, values = seq.logit_bias
            logits[row, ids] += values.to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Temperature-scaled logits [V] -> logits with everything below min_p times the likeliest
    token's probability, outside the top-k or outside the nucleus set to -inf (vLLM's order)."""
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = (
            cum - torch.softmax(sorted_logits, dim=-1) >= top_p
        )  # keep the first token crossing top_p
        # and always the likeliest: a top_p that rounds to 0 in float32 (1e-300) dropped all
        drop[0] = False
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """softmax of logits [V], or its limit where some are +inf (a repetition penalty near 0, a
    tiny temperature): those share all of it evenly, where softmax gives NaN, which the draw
    refuses, failing the whole step and every request in it."""
    top = torch.isposinf(logits)
    limit = top.to(logits.dtype) / top.sum().clamp(min=1)
    return torch.where(top.any(), limit, torch.softmax(logits, dim=-1))  # no device sync


NO_TOKEN_ALLOWED = (
    "The structured output allows no token at this point of the answer (with min_tokens, EOS "
    "is not allowed either): its grammar cannot be completed."
)


def sample(
    logits: torch.Tensor, seqs: list[Sequence], default: torch.Generator
) -> list[int | None]:
    """logits [B, V] float32 (raw) -> one token per sequence; None where nothing may follow (a
    structured output's grammar, with min_tokens' masks, excludes every token)."""
    logits = apply_logit_bias(apply_penalties(logits.clone(), seqs), seqs)
    mask_disallowed(logits, [s.guide for s in seqs])
    tokens: list[int | None] = logits.argmax(dim=-1).tolist()
    blocked = torch.isneginf(logits).all(dim=-1).tolist()  # [B] (NaN rows are the model's fault)
    for row, seq in enumerate(seqs):
        p = seq.params
        if blocked[row]:
            tokens[row] = None
        if p.greedy or blocked[row]:
            continue
        row_logits = filter_logits(logits[row] / p.temperature, p.top_k, p.top_p, p.min_p)
        probs = probabilities(row_logits)
        gen = seq.generator or default
        tokens[row] = int(torch.multinomial(probs.cpu(), 1, generator=gen).item())
    return tokens


# the token's log-probability, its rank in the vocabulary (1 = the likeliest; ties take the
# worst), the top k (id, lp)
Logprob = tuple[float, int, list[tuple[int, float]]]


def scored(logits: torch.Tensor, tokens: list[int], k: int) -> list[Logprob]:
    """The raw model log-probability of each row's token, its rank, and the row's k best.
    logits [R, V]."""
    logp = torch.log_softmax(logits, dim=-1)  # [R, V]
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])  # [R, 1]
    ranks = (logp >= chosen).sum(dim=-1).tolist()  # ties share the worst rank, as in vLLM
    values = chosen[:, 0].tolist()
    if not k:
        return [(c, r, []) for c, r in zip(values, ranks, strict=True)]
    top = torch.topk(logp, k, dim=-1)
    ids, best = top.indices.tolist(), top.values.tolist()
    return [
        (c, r, list(zip(i, v, strict=True)))
        for c, r, i, v in zip(values, ranks, ids, best, strict=True)
    ]


def token_logprobs(
    logits: torch.Tensor, tokens: list[int], seqs: list[Sequence]
) -> list[Logprob | None]:
    """OpenAI logprobs of each sampled token, for the sequences that asked. logits [B, V]."""
    result: list[Logprob | None] = [None] * len(seqs)
    for row, seq in enumerate(seqs):
        k = seq.params.logprobs
        if k is not None:
            result[row] = scored(logits[row : row + 1], [tokens[row]], k)[0]
    return result
