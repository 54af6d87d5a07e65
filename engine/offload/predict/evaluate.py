"""recall@k of routing predictors on held-out traces, per MoE layer and per horizon, against two
baselines any cache could use for free: the experts the previous token took at that layer, and the
layer's most frequent experts (counted on the training split).

Every method is scored for each (source, target) pair: source "path" = before layer 0, source i =
after MoE layer i's router, target j > i; horizon = j - i. Pre-gate and hybrid are scored on the
traced pre-gate probabilities, which are what they compute live from the residual.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from engine.offload.predict.base import recall_at_k
from engine.offload.predict.hybrid import HybridNet
from engine.offload.predict.rpp import RPPNet, check_dims
from engine.offload.predict.trace import TraceSet

BASELINES = ("frequent", "previous")
PATH = -1  # source of a prediction made before layer 0
# weight of the layer's expert frequency in the previous-token baseline: it only breaks ties
PREVIOUS_TIE_BREAK = 1e-3

# source (PATH or MoE index), target MoE index -> [T, E] scores, or None where it cannot predict
Method = Callable[[int, int], torch.Tensor | None]


@dataclass(frozen=True)
class RecallTable:
    methods: tuple[str, ...]
    # method -> [L+1, L] recall by (source, target): row 0 = path, row i+1 = after MoE layer i;
    # NaN where the method cannot predict (target <= source, or no path)
    recall: dict[str, torch.Tensor]
    num_tokens: int
    num_documents: int
    top_k: int

    @property
    def num_layers(self) -> int:
        return self.recall[self.methods[0]].shape[1]

    def at(self, method: str, target: int, horizon: int | None) -> float:
        """recall@k for `target` predicted `horizon` MoE layers ahead (None: by the path)."""
        row = 0 if horizon is None else target - horizon + 1
        return float(self.recall[method][row, target]) if row >= 0 else math.nan

    def by_horizon(self, method: str, horizon: int | None) -> float:
        """Mean over target layers at this horizon (None: path), skipping what it cannot predict."""
        values = [self.at(method, j, horizon) for j in range(self.num_layers)]
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    def has_path(self, method: str) -> bool:
        return not math.isnan(self.by_horizon(method, None))

    def format(self) -> str:
        L = self.num_layers
        horizons = [h for h in (1, 2) if h < L]
        columns: list[tuple[str, int | None]] = []
        for m in self.methods:
            columns += [(m, None)] if self.has_path(m) else [(m, h) for h in horizons]
        names = [_label(m, h) for m, h in columns]
        lines = [
            f"recall@{self.top_k} on {self.num_tokens} held-out tokens of {self.num_documents} "
            f"documents; @h = predicted h MoE layers ahead, @path = before layer 0",
            "",
            _row(["layer", *names]),
        ]
        for j in range(L):
            lines.append(_row([str(j), *(_cell(self.at(m, j, h)) for m, h in columns)]))
        lines += ["", _row(["horizon", *self.methods])]
        for h in [None, *range(1, L)]:
            label = "path" if h is None else str(h)
            lines.append(_row([label, *(_cell(self.by_horizon(m, h)) for m in self.methods)]))
        return "\n".join(lines)


def evaluate(
    train: TraceSet, test: TraceSet, predictor: RPPNet | HybridNet | None = None
) -> RecallTable:
    """Score the baselines, pre-gate and (if given) a trained predictor on the `test` tokens."""
    if predictor is not None:
        check_dims(
            f"the {predictor.kind} predictor", asdict(predictor.cfg), test.meta.dims, "the traces"
        )
    methods: dict[str, Method] = {
        "frequent": _frequent(train, test),
        "previous": _previous(train, test),
        "pregate": _pregate(test),
    }
    if isinstance(predictor, RPPNet):
        methods["rpp"] = _rpp(predictor, test)
    elif isinstance(predictor, HybridNet):
        methods["hybrid"] = _hybrid(predictor, test)
    L = test.meta.num_layers
    actual = test.topk_ids.long()  # [T, L, k]
    recall = {}
    for name, method in methods.items():
        table = torch.full((L + 1, L), math.nan)
        for source in range(PATH, L - 1):
            for target in range(source + 1, L):
                scores = method(source, target)
                if scores is not None:
                    table[source + 1, target] = recall_at_k(scores, actual[:, target])
        recall[name] = table
    return RecallTable(
        methods=tuple(methods),
        recall=recall,
        num_tokens=len(test),
        num_documents=int(torch.unique(test.doc_ids).numel()),
        top_k=test.meta.top_k,
    )


def horizon_recall(net: RPPNet | HybridNet, test: TraceSet, horizon: int = 1) -> float:
    """A trained predictor's recall@k `horizon` MoE layers ahead, averaged over the layers it
    predicts at that distance (what `RecallTable.by_horizon` reports, without the baselines)."""
    actual = test.topk_ids.long()  # [T, L, k]
    rpp = _rpp(net, test) if isinstance(net, RPPNet) else None
    values = []
    for target in range(test.meta.num_layers):
        source = target - horizon
        if rpp is not None:
            scores = rpp(source, target) if source >= PATH else None
        else:  # only the guesses up to `target`, not every layer after `source`
            scores = _hybrid(net, test, last=target)(source, target) if source >= 0 else None
        if scores is not None:
            values.append(recall_at_k(scores, actual[:, target]))
    return sum(values) / len(values) if values else math.nan


def _frequent(train: TraceSet, test: TraceSet) -> Method:
    freq = train.routes().sum(dim=0)  # [L, E]
    return lambda source, target: freq[target].expand(len(test), -1)


def _previous(train: TraceSet, test: TraceSet) -> Method:
    """The previous token's experts at the target layer; the layer's frequency breaks ties and
    stands in at the start of a sequence."""
    freq = train.routes().mean(dim=0)  # [L, E]
    routes = test.routes()  # [T, L, E]
    prev = torch.cat([routes.new_zeros(1, *routes.shape[1:]), routes[:-1]])  # [T, L, E]
    prev = prev * (test.positions > 0)[:, None, None]
    scores = prev + PREVIOUS_TIE_BREAK * freq  # [T, L, E]
    return lambda source, target: scores[:, target]


def _pregate(test: TraceSet) -> Method:
    def method(source: int, target: int) -> torch.Tensor | None:
        if source == PATH:
            return None
        return test.pregate[:, test.pair_index(source, target)].float()  # [T, E]

    return method


@torch.no_grad()
def _rpp(net: RPPNet, test: TraceSet) -> Method:
    """The path is predicted once, before layer 0; `ahead` slices it: all sources score alike."""
    path = torch.sigmoid(
        net(test.token_ids.long(), test.context(net.cfg.context_window))
    )  # [T, L, E]
    return lambda source, target: path[:, target]


def _hybrid(net: HybridNet, test: TraceSet, last: int | None = None) -> Method:
    """Corrected pre-gate guesses of layers source+1..`last` (default: the last layer)."""
    ids, topk = test.token_ids.long(), test.topk_ids.long()
    end = test.meta.num_layers if last is None else last + 1
    corrected: dict[int, torch.Tensor] = {}  # source -> [end-1-source, T, E], as `ahead` returns

    def method(source: int, target: int) -> torch.Tensor | None:
        if source == PATH:
            return None
        if source not in corrected:
            rows = [test.pair_index(source, j) for j in range(source + 1, end)]
            guess = test.pregate[:, rows].float().transpose(0, 1)  # [h, T, E]
            corrected[source] = net.correct(source, guess, ids, topk[:, source])
        return corrected[source][target - source - 1]

    return method


def _label(method: str, horizon: int | None) -> str:
    if method in BASELINES:
        return method
    return f"{method}@path" if horizon is None else f"{method}@{horizon}"


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def _row(cells: list[str]) -> str:
    return "  ".join(f"{c:<{max(9, len(c))}}" for c in cells)
